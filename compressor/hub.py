"""Publish an artifact directory to the Hugging Face Hub, with a generated model card.

`push` checks the artifact (config.json, a manifest whose sha256 sums all match), writes the
card, and uploads the files plus README.md as ONE commit from a staging directory, so a failed
upload never leaves a half-published model. `dry_run` shows what would be uploaded, offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from compressor.artifacts.formats import GGUF_CONFIG, ONNX_CONFIG
from compressor.errors import ArtifactError, UserError
from compressor.hub_ids import is_repo_id
from compressor.report import read_report
from compressor.artifacts.directory import MANIFEST_NAME, verify_manifest

CARD_NAME = "README.md"
# The embedded models and the Hub repositories they were converted from.
EMBEDDED_BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing or unreadable (the card says less)."""
    from compressor.artifacts.checkpoint import read_json

    try:
        return read_json(path)
    except ArtifactError:
        return {}


def check_repo_id(repo_id: str) -> str:
    if not is_repo_id(repo_id):
        raise UserError(f"--repo: {repo_id!r} is not a Hub repository id; expected OWNER/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def base_model(source: str | None) -> str | None:
    """The Hub id the artifact was made from, or None for local directories and GGUF files."""
    if not source:
        return None
    if source in EMBEDDED_BASE_MODELS:
        return EMBEDDED_BASE_MODELS[source]
    if source.startswith(("/", ".", "~")) or source.endswith(".gguf") or Path(source).expanduser().exists():
        return None
    return source if is_repo_id(source) else None


def _license(config: dict, source: str | None) -> str | None:
    if config.get("license"):
        return str(config["license"])
    if source:
        path = Path(source).expanduser()
        if path.is_dir():
            src_config = _read_json(path / "config.json")
            if src_config.get("license"):
                return str(src_config["license"])
            readme = path / CARD_NAME
            if readme.is_file():
                text = readme.read_text(errors="replace")
                if text.startswith("---"):
                    try:
                        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                    except yaml.YAMLError:
                        meta = {}
                    if isinstance(meta, dict) and meta.get("license"):
                        return str(meta["license"])
    return None


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def model_card(artifact_dir: Path, repo_id: str) -> str:
    """README.md for the Hub: YAML metadata, the recipe, the metrics, and how to load the model."""
    artifact_dir = Path(artifact_dir)
    config = _read_json(artifact_dir / "config.json")
    report = read_report(artifact_dir)  # None: no report.json (an artifact from elsewhere)
    source = report.model.source if report else None
    onnx_config = _read_json(artifact_dir / ONNX_CONFIG)  # {} unless an ONNX artifact
    # an ONNX artifact's config.json drops quantization_config; onnx_config.json keeps the source's
    qc = config.get("quantization_config") or onnx_config.get("quantization_config") or {}
    gguf_config = _read_json(artifact_dir / GGUF_CONFIG)  # {} unless a GGUF artifact
    qc = qc or gguf_config.get("quantization_config") or {}
    gptq = qc.get("quant_method") == "gptq"
    compressed_tensors = qc.get("quant_method") == "compressed-tensors"
    sparsity = config.get("compressor_sparsity")

    tags = ["compressor"] + (["onnx", "MatMulNBits"] if onnx_config else [])
    if gguf_config:
        tags += ["gguf", "llama.cpp"] + sorted(gguf_config.get("tensor_types", {}))
    if gptq:
        tags += ["gptq", f"{qc.get('bits', 4)}-bit", "quantized"]
    if compressed_tensors:
        group = next(iter((qc.get("config_groups") or {}).values()), {})
        bits = (group.get("weights") or {}).get("num_bits", "?")
        tags += ["compressed-tensors", f"W{bits}A16", "quantized"]
    if sparsity:
        tags += ["pruned", "sparse"] if sparsity.get("structure") != "structured" else ["pruned"]
    meta: dict = {}
    base = base_model(source)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "onnx" if onnx_config else "gguf" if gguf_config else "transformers"
    lic = _license(config, source)
    if lic:
        meta["license"] = lic
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {repo_id.split('/', 1)[1]}", ""]
    what = []
    if gguf_config:
        types = ", ".join(f"{n} {t}" for t, n in sorted(gguf_config.get("tensor_types", {}).items()))
        what.append(f"one GGUF file for llama.cpp whose {types} linears hold the GPTQ weights bit for bit")
    if compressed_tensors:
        what.append(f"a compressed-tensors `{qc.get('format')}` checkpoint (GPTQ weights re-packed, not re-quantized)")
    if gptq:
        what.append(f"GPTQ {qc.get('bits')}-bit, group size {qc.get('group_size')}, "
                    f"{'symmetric' if qc.get('sym') else 'asymmetric'}, desc_act={qc.get('desc_act')}"
                    + (" (quantized in act-order with static groups)" if (qc.get("meta") or {}).get("act_order") and not qc.get("desc_act") else ""))  # fmt: skip
    if sparsity:
        what.append(f"{sparsity.get('structure')} pruning ({sparsity.get('method')}), "
                    f"sparsity {float(sparsity.get('global_sparsity', 0)):.3f} of the block linears")  # fmt: skip
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{source or 'unknown'}`"
    summary = "; ".join(what) or "see the recipe below"
    lines += [f"A compressed version of {origin} ({config.get('model_type', '?')}), made with `compressor`: {summary}.", ""]

    recipe = artifact_dir / "recipe.yaml"
    if recipe.is_file():
        lines += ["## Recipe", "", "```yaml", recipe.read_text().rstrip(), "```", ""]

    ppl = report.perplexity if report else None
    size = report.size if report else None
    if (ppl and (ppl.dense or ppl.compressed)) or size:
        lines += ["## Metrics", ""]
    if ppl and (ppl.dense or ppl.compressed):
        lines += [f"Perplexity on `{ppl.source or '?'}` (lower is better):", "",
                  "| model | perplexity | windows | seq_len | tokens |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in (("dense", ppl.dense), ("compressed", ppl.compressed)):
            if r:
                lines.append(f"| {name} | {r['perplexity']:.4f} | {r.get('windows', '?')} | {r.get('seq_len', '?')} | {r.get('tokens', '?')} |")
        if ppl.increase is not None:
            lines += ["", f"Perplexity change: {100 * ppl.increase:+.2f}%."]
        lines.append("")
    if size:
        lines += ["| size | bytes | |", "|---|---:|---:|",
                  f"| artifact weights | {size.artifact_weights_bytes} | {_fmt_bytes(size.artifact_weights_bytes)} |",
                  f"| dense fp16 | {size.dense_fp16_bytes} | {_fmt_bytes(size.dense_fp16_bytes)} |",
                  "", f"The weights are {size.artifact_over_dense_fp16:.3f}x the size of the dense fp16 model.", ""]  # fmt: skip

    name = repo_id.split("/", 1)[1]
    serve_lines = ["### compress serve (OpenAI-compatible API)", "", "```bash",
                   f'compress serve "$(huggingface-cli download {repo_id})" --served-model-name {name}', "```", "",
                   "```python", "from openai import OpenAI", "",
                   'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")',
                   f'print(client.completions.create(model="{name}", prompt="def fibonacci(n):", max_tokens=64).choices[0].text)',
                   "```", ""]  # fmt: skip
    download = ["from huggingface_hub import snapshot_download", "", f'path = snapshot_download("{repo_id}")']
    lines += ["## Usage", ""]
    if gguf_config:
        gguf_file = gguf_config.get("file", "model.gguf")
        lines += ["One GGUF file: llama.cpp, Ollama, LM Studio and llama-cpp-python run it as they run any "
                  "Q4_0/Q8_0/Q4_1 file, with GPTQ's weights instead of round-to-nearest ones.", "",
                  "### llama.cpp", "", "```bash", f"llama-cli -hf {repo_id} -p \"def fibonacci(n):\" -n 64",
                  f"llama-server -hf {repo_id}   # OpenAI-compatible API on :8080", "```", "",
                  "### Ollama", "", "```bash", f"ollama run hf.co/{repo_id}", "```", "",
                  "### llama-cpp-python", "", "```python", "from llama_cpp import Llama", "",
                  f'llm = Llama.from_pretrained("{repo_id}", filename="{gguf_file}")',
                  'print(llm("def fibonacci(n):", max_tokens=64)["choices"][0]["text"])', "```", ""]  # fmt: skip
    elif compressed_tensors:
        lines += ["A compressed-tensors checkpoint (what llm-compressor writes): vLLM serves it with its "
                  "W4A16/W8A16 kernels; transformers loads it with `compressed-tensors` installed.", "",
                  "### vLLM", "", "```bash", f"vllm serve {repo_id}", "```", "",
                  "### transformers", "", "Needs `pip install compressed-tensors`.", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", ""]  # fmt: skip
    elif onnx_config:
        lines += ["An ONNX decoder (past key/values in and out) whose quantized linears are onnxruntime "
                  "`com.microsoft` `MatMulNBits` nodes; needs onnxruntime >= 1.23.", "",
                  "### onnxruntime (through compressor)", "", "```python", *download,
                  "from compressor.runtime import onnx as onnx_runtime", "",
                  "model = onnx_runtime.load(path)  # checks manifest.json; CPU EP, or device=\"cuda\" with onnxruntime-gpu",
                  "```", "", "```bash", f'compress generate "$(huggingface-cli download {repo_id})" "def fibonacci(n):"',
                  f'compress eval "$(huggingface-cli download {repo_id})"', "```", "", *serve_lines]  # fmt: skip
    else:
        lines += ["### transformers", ""]
        if gptq:
            lines += ["Needs a GPTQ backend: `pip install gptqmodel optimum`.", ""]
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
                  'ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids.to(model.device)',
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))", "```", "",
                  "### vLLM", "", "```bash", f"vllm serve {repo_id}", "```", "",
                  *serve_lines, "### compressor", "", "```python", *download]  # fmt: skip
        if gptq:
            lines += ["from compressor import runtime", "",
                      "model = runtime.load(path)  # checks manifest.json, CPU or CUDA kernels",
                      "tokenizer = runtime.load_tokenizer(path)"]  # fmt: skip
        lines += ["```", "", "```bash", f'compress generate "$(huggingface-cli download {repo_id})" "def fibonacci(n):"',
                  f'compress eval "$(huggingface-cli download {repo_id})"', "```", ""]  # fmt: skip
    lines += ["`manifest.json` lists the sha256 of every file; `report.json` holds the full measurements.", ""]
    return "\n".join(lines)


def _check_artifact(artifact_dir: Path) -> Path:
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise UserError(f"{artifact_dir}: no such artifact directory")
    if not (artifact_dir / "config.json").is_file() and not (artifact_dir / GGUF_CONFIG).is_file():
        raise UserError(f"{artifact_dir}: no config.json (or gguf_config.json); not a model or artifact directory")
    if not verify_manifest(artifact_dir):  # ArtifactError (a UserError) when a file does not match
        raise UserError(f"{artifact_dir}: no {MANIFEST_NAME}; only artifacts written by `compress run` can be pushed")
    return artifact_dir


def _artifact_files(artifact_dir: Path) -> list[Path]:
    return sorted(p for p in artifact_dir.rglob("*") if p.is_file() and p.relative_to(artifact_dir).as_posix() != CARD_NAME)


def plan_upload(artifact_dir, repo_id) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file that would be uploaded, README.md (the card) included."""
    artifact_dir = Path(artifact_dir)
    card = model_card(artifact_dir, repo_id)
    plan = [(p.relative_to(artifact_dir).as_posix(), p.stat().st_size) for p in _artifact_files(artifact_dir)]
    plan.append((CARD_NAME, len(card.encode())))
    return sorted(plan)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _token() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no login is the same as no token
        return None


def push(artifact_dir, repo_id, private=False, revision=None, overwrite=False, dry_run=False, api=None, echo=print) -> str:
    """Upload the artifact and its card to `repo_id` in one commit; returns the repo URL (dry run: the card)."""
    check_repo_id(repo_id)
    artifact_dir = _check_artifact(Path(artifact_dir))
    card = model_card(artifact_dir, repo_id)
    plan = plan_upload(artifact_dir, repo_id)
    if dry_run:
        for name, size in plan:
            echo(f"{size:>14,d}  {name}")
        echo(card)
        return card

    token = _token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        exists = api.repo_exists(repo_id, token=token)
    except Exception as exc:  # noqa: BLE001 - network or auth failure: one line
        raise UserError(f"{repo_id}: could not reach the Hugging Face Hub ({_one_line(exc)})") from None
    if exists and not overwrite:
        raise UserError(f"{repo_id}: the repository already exists; pass --overwrite to upload a new commit to it")
    with tempfile.TemporaryDirectory(prefix="compressor-push-") as tmp:
        staging = Path(tmp) / "upload"
        staging.mkdir()
        for p in _artifact_files(artifact_dir):
            dst = staging / p.relative_to(artifact_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, dst)
            except OSError:
                shutil.copy2(p, dst)
        (staging / CARD_NAME).write_text(card)
        try:
            url = api.create_repo(repo_id, token=token, private=private, exist_ok=overwrite)
            if revision:
                api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id, folder_path=str(staging), token=token, revision=revision,
                commit_message=f"Upload {artifact_dir.name} (compressor artifact)",
            )  # fmt: skip
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - network, auth, quota: one line
            raise UserError(f"{repo_id}: upload failed ({_one_line(exc)}); no files were committed") from None
    for name, size in plan:
        echo(f"{size:>14,d}  {name}")
    return str(url or f"https://huggingface.co/{repo_id}")
