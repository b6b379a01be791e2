"""The recipe schema: the single source of truth for every option.

A recipe is a YAML file validated by the pydantic models below, composed of the sections' options
models: `data.*` from compressor.data, each stage kind's options from the stage table
(compressor.stages). Field descriptions are the documentation: README's option table is
generated from them (`python -m compressor.recipe`).

Loading goes: YAML -> `--set key.path=value` overrides applied to the raw mapping -> pydantic
validation -> checks that need the model's shapes (each stage kind's `check`, called by
`pipeline.validate`). Every failure becomes a `RecipeError` naming the file, the key path
(`stages[0].quantize.group_size`), the bad value and what is allowed."""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, PlainValidator, ValidationError, create_model, field_validator
from pydantic_core import PydanticCustomError

from compressor.data import CalibrationData, EvaluationData
from compressor.errors import RecipeError, UserError
from compressor.options import Options as _Strict
from compressor.stages import StageKind, stage_kind, stage_kinds


# --------------------------------------------------------------------------------------- model
class ModelSpec(_Strict):
    source: str = Field(
        "smollm2-135m",
        description="The embedded default `smollm2-135m`, a local Hugging Face directory, a "
        "`.gguf` file, or a Hub id (`owner/name`, needs network).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a Hub id.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute dtype: `auto` is float32 on CPU and float16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where compression runs: `auto` picks CUDA when available."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the Hub repository (off unless you trust it)."
    )


# ---------------------------------------------------------------------------------------- data
class DataSection(_Strict):
    calibration: CalibrationData = Field(default_factory=CalibrationData)
    evaluation: EvaluationData = Field(default_factory=EvaluationData)


# -------------------------------------------------------------------------------------- stages
# A stage is a mapping with one key, the kind (`- quantize: {bits: 4}`), whose options model comes
# from the stage table (compressor.stages): the list is validated against the table as it is at
# validation time, so a kind registered later (a plug-in, a test's toy kind) is a recipe stage too.
_ENTRY_MODELS: dict[StageKind, type[BaseModel]] = {}


def entry_model(kind: StageKind) -> type[BaseModel]:
    """The model of `{kind.name: options}`, made once per registered kind."""
    if kind not in _ENTRY_MODELS:
        _ENTRY_MODELS[kind] = create_model(f"{kind.name.title()}Entry", __base__=_Strict, **{kind.name: (kind.options, ...)})
    return _ENTRY_MODELS[kind]


def _stage_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if key in stage_kinds() else None
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


def _validate_stage(value: Any) -> BaseModel:
    name = _stage_kind(value)
    kinds = stage_kinds()
    if name not in kinds:
        raise PydanticCustomError("stage", "each stage is a mapping with exactly one key, one of: " + ", ".join(kinds))
    model = entry_model(kinds[name])
    return value if isinstance(value, model) else model.model_validate(value if isinstance(value, dict) else value.model_dump())


Stage = Annotated[Any, PlainValidator(_validate_stage)]


def default_stages() -> list[BaseModel]:
    """One quantize stage with its defaults."""
    quantize = stage_kind("quantize")
    return [entry_model(quantize)(quantize=quantize.options())]


# ----------------------------------------------------------------------------- evaluate/export
class EvaluateSection(_Strict):
    perplexity: bool = Field(True, description="Measure perplexity of the compressed model.")
    dense: bool = Field(True, description="Also measure the dense model first, for the comparison.")


class ExportSection(_Strict):
    format: Literal["gptq", "dense", "onnx", "gguf", "compressed-tensors"] = Field(
        "gptq",
        description="`gptq` (GPTQ v1 safetensors; needs a quantize stage), `dense` (fp16 safetensors, e.g. after "
        "pruning), `onnx` (an ONNX decoder with past key/values whose quantized linears are onnxruntime "
        "`MatMulNBits` holding the GPTQ weights; needs a quantize stage with bits 2, 4 or 8; run it with "
        "`compress generate`, `compress eval` or `compress serve`), `gguf` (one `model.gguf` for llama.cpp/Ollama: "
        "the GPTQ weights as Q4_0/Q8_0 (symmetric) or Q4_1 (asymmetric 4-bit) blocks, bit for bit; needs bits 4 or 8, "
        "a group size that is a multiple of 32 and static groups with act-order) or `compressed-tensors` "
        "(vLLM's `pack-quantized` checkpoint, as llm-compressor writes it; 2:4 sparsity is recorded for vLLM).",
    )
    checkpoint_format: Literal["gptq", "gptq_v2"] = Field(
        "gptq",
        description="For format gptq: `gptq` (v1, qzeros store zero - 1: what AutoGPTQ, transformers and vLLM read) "
        "or `gptq_v2` (the zero points as they are: GPTQModel's own format; `GPTQModel.load` refuses asymmetric "
        "v1 checkpoints it did not write, and vLLM reads v1 only).",
    )
    max_shard_size: str = Field("2GB", description="Split safetensors into shards above this size.")
    overwrite: bool = Field(
        False,
        description="Replace an existing output directory (only after success) when it is a compressor artifact "
        "(its manifest lists every file) or empty; anything else is refused, never deleted.",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class PushSection(_Strict):
    repo: str = Field(..., description="Hub repository `owner/name` to publish the artifact to after a successful run.")
    private: bool = Field(False, description="Create the repository as private.")
    revision: str | None = Field(None, description="Branch to upload to (created if missing).")
    overwrite: bool = Field(False, description="Allow uploading to a repository that already exists.")
    dry_run: bool = Field(False, description="Print the files and the model card instead of uploading.")

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        from compressor.hub_ids import is_repo_id

        if not is_repo_id(v):
            raise ValueError("must be a Hub repository id like owner/name (letters, digits, '-', '_', '.'; no '..' or '--')")
        return v


class ComputeSection(_Strict):
    calibration_batch_size: int = Field(
        0,
        ge=0,
        description="Calibration samples per forward through a block; 0 sends all at once when "
        "they fit `max_activation_gb`, which lets one pass per block quantize true-sequentially.",
    )
    max_activation_gb: float = Field(
        6.0, gt=0, description="Memory budget for one block's calibration activations (auto batching)."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")
    load: Literal["auto", "whole", "blockwise"] = Field(
        "auto",
        description="How the model is held. whole: loaded into memory before the stages. blockwise: "
        "read from its safetensors files one decoder block at a time, compressed, written and freed "
        "(peak memory ~ one block, for models larger than memory; one quantize or prune stage; "
        "perplexity is computed block by block). auto: blockwise when the model in the compute dtype "
        "would take more than half the available memory and the recipe allows it, else whole.",
    )


class Recipe(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec, description="A string is shorthand for `{source: ...}`.")
    data: DataSection = Field(default_factory=DataSection)
    stages: list[Stage] = Field(default_factory=default_stages)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection = Field(default_factory=ExportSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    output: str = Field("runs/compressed", description="The artifact directory to write.")
    push: PushSection | None = Field(None, description="Publish the artifact to the Hugging Face Hub after the run.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    def stage_list(self) -> list[tuple[str, BaseModel]]:
        """(kind, options) for each stage, in order."""
        return [(kind, getattr(entry, kind)) for entry in self.stages for kind in [_stage_kind(entry)]]


# ----------------------------------------------------------------------------------- helpers
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size like '500MB' or '2GB'")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _dedupe_loc(loc: tuple) -> tuple:
    """A discriminated union repeats its tag as the next key: drop the repeat."""
    out: list = []
    for item in loc:
        if out and not isinstance(item, int) and out[-1] == item:
            continue
        out.append(item)
    return tuple(out)


def format_loc(loc: tuple) -> str:
    """('stages', 0, 'quantize', 'quantize', 'bits') -> 'stages[0].quantize.bits'."""
    return "".join(f"[{i}]" if isinstance(i, int) else f".{i}" for i in _dedupe_loc(loc)).lstrip(".")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (to list the keys allowed there)."""
    stage_models = {name: kind.options for name, kind in stage_kinds().items()}
    keys = [k for k in loc[:-1] if not isinstance(k, int)]
    model: type[BaseModel] | None = Recipe
    while keys and model is not None:
        key = keys.pop(0)
        if key == "stages" and model is Recipe:
            model = stage_models.get(keys.pop(0)) if keys else None
            continue
        field = model.model_fields.get(key)
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _allowed_text(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        model = _model_at(_dedupe_loc(err["loc"]))
        keys = f"; allowed keys: {', '.join(model.model_fields)}" if model else ""
        return "unknown key" + keys
    if err["type"] == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def _raise_first(exc: ValidationError, file: str) -> None:
    errors = exc.errors()
    err = errors[0]
    extra = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    raise RecipeError(file, format_loc(err["loc"]), err.get("input"), _allowed_text(err) + extra) from None


_KEY_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\d+")


def split_key_path(path: str) -> list[str | int]:
    """'stages[0].quantize.bits' or 'stages.0.quantize.bits' -> ['stages', 0, 'quantize', 'bits']."""
    keys: list[str | int] = []
    for piece in path.split("."):
        tokens = _KEY_PATH.findall(piece)
        if not piece or "".join(tokens) != piece:
            raise UserError(f"--set {path}: malformed key path (use e.g. stages[0].quantize.bits)")
        for tok in tokens:
            keys.append(int(tok.strip("[]")) if tok.strip("[]").isdigit() else tok)
    return keys


def parse_value(text: str, where: str) -> Any:
    """A value given on the command line (--set, sweep --values): YAML, except that an N:M
    pattern stays text (YAML 1.1 reads 2:4 as the base-60 integer 124)."""
    if re.fullmatch(r"\s*\d+:\d+\s*", text):
        return text.strip()
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: {text!r} is not a valid YAML value: {getattr(exc, 'problem', exc)}") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `key.path=value` to the raw recipe mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY.PATH=VALUE")
    path, text = assignment.split("=", 1)
    keys = split_key_path(path.strip())
    value = parse_value(text, f"--set {path}")
    # Missing keys are filled from the defaults, so `--set stages[0].quantize.bits=3` works on a
    # recipe that never wrote `stages`.
    node: Any = raw
    default: Any = Recipe().model_dump(mode="json")
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise UserError(f"--set {path}: index [{key}] is out of range")
            node = node[key]
            default = default[key] if isinstance(default, list) and key < len(default) else None
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {path}: {key!r} is below a value that is not a mapping")
        sub_default = default.get(key) if isinstance(default, dict) else None
        child = node.get(key)
        if key == "model" and isinstance(child, str):
            child = node[key] = {"source": child}  # string shorthand becomes a mapping
        if child is None:
            child = node[key] = copy.deepcopy(sub_default) if sub_default is not None else ([] if isinstance(nxt, int) else {})
        node, default = child, sub_default
    last = keys[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise UserError(f"--set {path}: index [{last}] is out of range")
    elif not isinstance(node, dict):
        raise UserError(f"--set {path}: {'.'.join(map(str, keys[:-1]))} is not a mapping")
    node[last] = value


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a megabyte is a wrong file
MAX_RECIPE_VALUES = 100_000  # values after YAML aliases are expanded (a real recipe has a few hundred)


def _read_recipe_file(p: Path, file: str) -> dict:
    """The recipe file as a mapping, or a one-line UserError: missing, too big, not UTF-8 text,
    not YAML, empty, not a mapping, or aliases that expand past MAX_RECIPE_VALUES."""
    if not p.is_file():
        raise UserError(f"{file}: recipe file not found")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise UserError(f"{file}: {size} bytes is too big for a recipe (at most {MAX_RECIPE_BYTES} bytes); is this the right file?")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); a recipe is a YAML file") from None
    if "\x00" in text:
        raise UserError(f"{file}: holds NUL bytes, so it is not a text file; a recipe is a YAML file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise UserError(f"{file}: the recipe is empty (it would run every default); write the sections you want, "
                        "e.g. `model: smollm2-135m` (README lists every option)")  # fmt: skip
    if not isinstance(raw, dict):
        raise UserError(f"{file}: a recipe is a mapping of sections (model, data, stages, ...)")
    _check_expanded_size(raw, file)
    return raw


def _check_expanded_size(raw: Any, file: str) -> None:
    """YAML aliases share one object per anchor, so nine nested anchors in a few hundred bytes
    make a value of 10^9 items for whatever walks it (validation, error messages): count the
    values as a walk would see them and stop at the limit."""
    seen, stack = 0, [raw]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise UserError(f"{file}: the recipe expands to more than {MAX_RECIPE_VALUES} values "
                            "(YAML aliases nested into each other?); write the values out")  # fmt: skip
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. `path=None` starts from the defaults."""
    file = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        raw = _read_recipe_file(Path(path), file)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        _raise_first(exc, file)
        raise  # unreachable


def schema_markdown() -> str:
    """The option table for README, generated from the models above."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = f"{prefix}{name}"
            options = typing.get_args(ann) or (ann,)  # `X | None` -> (X, NoneType)
            sub = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is not None:
                walk(sub, key + ".")
                continue
            if name == "stages":
                for kind in stage_kinds().values():
                    walk(kind.options, f"stages[i].{kind.name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            tname = str(ann).replace("typing.", "").replace(" | ", " or ").replace("|", " or ")
            tname = getattr(ann, "__name__", tname) if "[" not in tname and " or " not in tname else tname
            lines.append(f"| `{key}` | {tname} | `{default}` | {field.description or ''} |")

    walk(Recipe, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())
