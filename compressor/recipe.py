"""The recipe schema: the single source of truth for every option.

A recipe is a YAML file validated by the pydantic models below. Field descriptions are the
documentation: README's option table is generated from them (`python -m compressor.recipe`).

Loading goes: YAML -> `--set key.path=value` overrides applied to the raw mapping -> pydantic
validation -> checks that need the model's shapes (`check_against_model`). Every failure becomes a
`RecipeError` naming the file, the key path (`stages[0].quantize.group_size`), the bad value and
what is allowed.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from compressor.errors import RecipeError, UserError


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
class TextSource(_Strict):
    source: str = Field(
        "python-docs",
        description="`python-docs` (embedded CPython docs), `wikitext2`, `c4`, a Hub dataset id, "
        "or a local `.txt` / `.jsonl` / `.parquet` file.",
    )
    config: str | None = Field(None, description="Hub dataset configuration name (e.g. `wikitext-2-raw-v1`).")
    split: str | None = Field(
        None, description="Dataset split; default `train` for calibration and `test` for evaluation."
    )
    text_field: str = Field("text", description="Column holding the text in datasets and .jsonl/.parquet files.")


class CalibrationData(TextSource):
    samples: int = Field(64, ge=1, description="Number of calibration sequences.")
    seq_len: int = Field(512, ge=8, description="Tokens per calibration sequence.")
    seed: int = Field(0, ge=0, description="Seed for choosing the calibration windows.")


class EvaluationData(TextSource):
    seq_len: int = Field(
        2048, ge=8, description="Perplexity window length, capped by the model's context length."
    )
    max_windows: int | None = Field(
        None, ge=1, description="Evaluate only the first N windows (default: all of them)."
    )
    batch_size: int = Field(1, ge=1, description="Windows per forward pass during evaluation.")


class DataSection(_Strict):
    calibration: CalibrationData = Field(default_factory=CalibrationData)
    evaluation: EvaluationData = Field(default_factory=EvaluationData)


# -------------------------------------------------------------------------------------- stages
class QuantizeStage(_Strict):
    method: Literal["gptq", "rtn"] = Field(
        "gptq", description="`gptq` (Hessian-aware) or `rtn` (round to nearest, a baseline)."
    )
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(
        64,
        description="Input rows sharing one scale/zero: -1 (one group per output) or a positive "
        "divisor of every quantized layer's input width.",
    )
    sym: bool = Field(True, description="Symmetric quantization (zero point fixed at 2^(bits-1)).")
    desc_act: bool = Field(
        True, description="Act-order: quantize columns by decreasing Hessian diagonal (the biggest quality lever)."
    )
    static_groups: bool = Field(
        True,
        description="Fix each group's grid before reordering, so g_idx stays k // group_size and "
        "act-order costs nothing at inference; false forms groups in act-order (g_idx permuted).",
    )
    damp_percent: float = Field(
        0.01, gt=0, lt=1, description="Damping added to the Hessian diagonal, as a fraction of its mean."
    )
    max_damp_percent: float = Field(
        1.0, gt=0, le=10, description="Damping escalates (x2, logged) up to this when the Hessian is not positive definite."
    )
    mse: bool = Field(
        True, description="Choose each group's range by searching shrink factors (100%..80%) for the least error."
    )
    block_size: int = Field(128, ge=1, description="GPTQ lazy-update block width (columns).")
    true_sequential: bool = Field(
        True,
        description="Quantize a block's linears in execution order (q/k/v, o, gate/up, down), each "
        "calibrated on the outputs of those already quantized.",
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (glob patterns, e.g. `*.down_proj`) left unquantized.",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be -1 or a positive integer")
        return v

    @model_validator(mode="after")
    def _static_needs_act_order(self) -> "QuantizeStage":
        if self.static_groups and self.group_size == -1:
            raise ValueError("static_groups needs a group_size other than -1")
        if self.max_damp_percent < self.damp_percent:
            raise ValueError("max_damp_percent must be >= damp_percent")
        return self


class QuantizeEntry(_Strict):
    quantize: QuantizeStage = Field(default_factory=QuantizeStage)


UNSTRUCTURED_METHODS = ("magnitude", "wanda", "sparsegpt")


class PruneStage(_Strict):
    method: Literal["magnitude", "wanda", "sparsegpt", "structured"] = Field(
        ..., description="`magnitude`, `wanda`, `sparsegpt` (per-weight or N:M) or `structured` (removes channels/heads/layers)."
    )
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="Unstructured: fraction of each linear's weights set to zero (per output row)."
    )
    pattern: str | None = Field(
        None,
        description="Semi-structured N:M, e.g. `2:4`: every 4 consecutive inputs keep at most 2 weights "
        "(`sparsity` may be given too, and must then equal (M-N)/M).",
    )
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict,
        description="Per-layer overrides of `sparsity`: glob pattern of module names -> sparsity (first match wins).",
    )
    target: Literal["mlp_channels", "heads", "layers"] | None = Field(
        None, description="Structured: what to remove."
    )
    ratio: float | None = Field(
        None, gt=0, lt=1, description="Structured mlp_channels/heads: fraction to remove (uniform across layers)."
    )
    count: int | None = Field(None, ge=1, description="Structured layers: how many decoder layers to remove.")
    heads_mode: Literal["query", "groups"] = Field(
        "query",
        description="Structured heads with GQA: `query` drops the same number of query heads inside every "
        "key/value group; `groups` drops whole key/value groups with their query heads.",
    )
    block_size: int = Field(128, ge=1, description="SparseGPT: columns per mask-selection block.")
    damp_percent: float = Field(0.01, gt=0, lt=1, description="SparseGPT: Hessian damping (fraction of the mean diagonal).")
    joint_quantize: bool = Field(
        False,
        description="SparseGPT only: quantize the kept weights in the same pass with the settings of the "
        "quantize stage that must directly follow (SparseGPT+GPTQ in one pass).",
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (glob patterns) left dense; embeddings are never pruned.",
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_is_text(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124.
            raise ValueError("must be a quoted 'N:M' string, e.g. pattern: \"2:4\" (unquoted, YAML reads 2:4 as the number 124)")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(v))
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError("must be 'N:M' with 0 < N < M, e.g. '2:4' or '4:8'")
        return f"{int(m.group(1))}:{int(m.group(2))}"

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_sparsity(cls, v: dict[str, float]) -> dict[str, float]:
        for key, value in v.items():
            if not 0 <= value < 1:
                raise ValueError(f"sparsity for {key!r} must be in [0, 1), got {value}")
        return v

    @model_validator(mode="after")
    def _method_fields(self) -> "PruneStage":
        if self.method in UNSTRUCTURED_METHODS:
            if self.sparsity is None and self.pattern is None:
                raise ValueError(f"method {self.method} needs `sparsity` or an N:M `pattern`")
            if self.pattern is not None and self.sparsity is not None:
                n, m = self.nm()
                if abs(self.sparsity - (m - n) / m) > 1e-9:
                    raise ValueError(f"pattern {self.pattern} means sparsity {(m - n) / m:g}, not {self.sparsity:g}")
            if self.pattern is not None and self.layer_sparsity:
                raise ValueError("layer_sparsity applies to `sparsity`, not to an N:M `pattern`")
            if self.target or self.ratio or self.count:
                raise ValueError("`target`, `ratio` and `count` belong to method: structured")
            if self.joint_quantize and self.method != "sparsegpt":
                raise ValueError("joint_quantize needs method: sparsegpt")
        else:
            if self.target is None:
                raise ValueError("method structured needs `target`: mlp_channels, heads or layers")
            if self.target == "layers" and (self.count is None or self.ratio is not None):
                raise ValueError("target layers needs `count` (number of layers to remove), not `ratio`")
            if self.target != "layers" and (self.ratio is None or self.count is not None):
                raise ValueError(f"target {self.target} needs `ratio` (fraction to remove), not `count`")
            if self.sparsity is not None or self.pattern is not None or self.joint_quantize:
                raise ValueError("`sparsity`, `pattern` and `joint_quantize` belong to unstructured methods")
        return self

    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


class PruneEntry(_Strict):
    prune: PruneStage


class DistillStage(_Strict):
    teacher: str = Field(
        "input",
        description="`input` (the model as it entered the pipeline, before any stage) or any model source.",
    )
    student: str = Field(
        "current",
        description="`current` (the model as the previous stages left it), or any model source "
        "(a smaller model), or `keep_layers` (the teacher with only `keep_layers` kept).",
    )
    keep_layers: list[int] | None = Field(None, description="With student: keep_layers, the teacher layers to keep.")
    loss: Literal["forward_kl", "reverse_kl"] = Field(
        "forward_kl", description="Logit distillation loss (Minitron: forward KL on logits works best)."
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models; the KL is scaled by T^2.")
    lm_weight: float = Field(
        0.0, ge=0, le=1, description="Mix with the ordinary next-token loss: (1-w) * KD + w * LM (1 = plain fine-tuning)."
    )
    hidden_loss: Literal["none", "mse", "cosine"] = Field("none", description="Optional hidden-state loss.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state loss.")
    layer_map: dict[int, int] = Field(
        default_factory=dict, description="Hidden-state loss pairs: student layer -> teacher layer (outputs of those blocks)."
    )
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, ge=0, description="Seed for data order and anything random.")
    eval_every: int = Field(50, ge=0, description="Perplexity on the evaluation data every N steps (0: only at the end).")
    eval_windows: int | None = Field(2, ge=1, description="Windows used by the periodic evaluations (None: all).")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: never); `compress run --resume` continues.")
    checkpoint_dir: str | None = Field(None, description="Where checkpoints go (default: `<output>.distill-ckpt`).")

    @model_validator(mode="after")
    def _consistent(self) -> "DistillStage":
        if self.student == "keep_layers" and not self.keep_layers:
            raise ValueError("student: keep_layers needs a non-empty `keep_layers` list")
        if self.keep_layers and self.student != "keep_layers":
            raise ValueError("`keep_layers` needs student: keep_layers")
        if self.hidden_loss != "none" and (not self.layer_map or self.hidden_weight <= 0):
            raise ValueError("a hidden_loss needs a `layer_map` and a positive `hidden_weight`")
        return self


class DistillEntry(_Strict):
    distill: DistillStage = Field(default_factory=DistillStage)


STAGE_KINDS = ("quantize", "prune", "distill")


def _stage_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if key in STAGE_KINDS else None
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


Stage = Annotated[
    Union[
        Annotated[QuantizeEntry, Tag("quantize")],
        Annotated[PruneEntry, Tag("prune")],
        Annotated[DistillEntry, Tag("distill")],
    ],
    Discriminator(
        _stage_kind,
        custom_error_type="stage",
        custom_error_message="each stage is a mapping with exactly one key, one of: " + ", ".join(STAGE_KINDS),
    ),
]


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
    overwrite: bool = Field(False, description="Replace an existing output directory (only after success).")

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
    stages: list[Stage] = Field(default_factory=lambda: [QuantizeEntry()])
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
    stage_models = {"quantize": QuantizeStage, "prune": PruneStage, "distill": DistillStage}
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


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `key.path=value` to the raw recipe mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY.PATH=VALUE")
    path, text = assignment.split("=", 1)
    keys = split_key_path(path.strip())
    value = yaml.safe_load(text) if text.strip() else ""
    if re.fullmatch(r"\s*\d+:\d+\s*", text):
        value = text.strip()  # an N:M pattern, not YAML 1.1's base-60 integer
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


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. `path=None` starts from the defaults."""
    file = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{file}: recipe file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{file}: a recipe is a mapping of sections (model, data, stages, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        _raise_first(exc, file)
        raise  # unreachable


def check_against_model(recipe: Recipe, layer_in_features: dict[str, int], file: str = "") -> None:
    """Checks that need the model: every group size divides every quantized input width."""
    widths = sorted(set(layer_in_features.values()))
    for i, (kind, stage) in enumerate(recipe.stage_list()):
        if kind != "quantize" or stage.group_size == -1:
            continue
        bad = [w for w in widths if w % stage.group_size]
        if bad:
            common = sorted({d for d in range(1, min(widths) + 1) if all(w % d == 0 for w in widths) and d >= 16})
            raise RecipeError(
                file,
                f"stages[{i}].quantize.group_size",
                stage.group_size,
                f"must be -1 or divide every quantized layer's input width {widths} "
                f"(e.g. {', '.join(map(str, common[-4:]))})",
            )


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
                walk(QuantizeStage, "stages[i].quantize.")
                walk(PruneStage, "stages[i].prune.")
                walk(DistillStage, "stages[i].distill.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            tname = str(ann).replace("typing.", "").replace(" | ", " or ").replace("|", " or ")
            tname = getattr(ann, "__name__", tname) if "[" not in tname and " or " not in tname else tname
            lines.append(f"| `{key}` | {tname} | `{default}` | {field.description or ''} |")

    walk(Recipe, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())
