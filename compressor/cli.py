"""The `compress` command line.

Exit codes: 0 success, 2 bad input (recipe, paths, options), 1 internal failure. Errors print as
one line on stderr; `compress --debug ...` shows the traceback as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from pathlib import Path

import click

from compressor.errors import UserError

log = logging.getLogger("compressor")


class _Group(click.Group):
    """Turns exceptions into one line and the documented exit code."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        argv = kwargs.get("args") or (args[0] if args else None) or sys.argv[1:]
        debug = "--debug" in argv
        try:
            rv = super().main(*args, **kwargs)
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)  # usage errors exit 2
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except UserError as exc:
            if debug:  # the traceback as well, and still the documented exit code
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - the documented exit 1
            if debug:
                traceback.print_exc()
                sys.exit(1)
            click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with `compress --debug ...` for the traceback)", err=True)
            sys.exit(1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
def main(debug: bool, verbose: bool) -> None:
    """compressor: shrink an open LLM (GPTQ) and produce a serving-ready artifact.

    \b
    Typical use:
      compress validate recipes/smollm2-w4g64.yaml
      compress run recipes/smollm2-w4g64.yaml
      compress eval runs/smollm2-w4g64
      compress generate runs/smollm2-w4g64 "def fibonacci(n):"
    """
    _setup_logging(verbose)


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a recipe value, e.g. --set stages[0].quantize.bits=3 (repeatable; values are YAML).",
)  # fmt: skip


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_set_option
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory once the new artifact is complete.")
@click.option("--resume", is_flag=True, help="Continue a distill stage from its latest checkpoint (after a crash or kill).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(recipe: Path, overrides: tuple[str, ...], overwrite: bool, resume: bool, no_progress: bool) -> None:
    """Run RECIPE: load the model, run its stages, evaluate, export the artifact.

    The artifact directory (recipe key `output`) receives the checkpoint, report.json,
    report.md, a per-layer error plot, the resolved recipe and a manifest of sha256 sums.
    """
    from compressor.pipeline import run as run_pipeline
    from compressor.recipe import load_recipe

    r = load_recipe(recipe, list(overrides))
    result = run_pipeline(r, str(recipe), overwrite=overwrite, progress=not no_progress, resume=resume)
    ppl, size = result.report.perplexity, result.report.size
    click.echo(f"artifact: {result.output}")
    if ppl.dense and ppl.compressed:
        click.echo(
            f"perplexity: dense {ppl.dense['perplexity']:.4f} -> compressed "
            f"{ppl.compressed['perplexity']:.4f} ({100 * ppl.increase:+.2f}%)"
        )
    elif ppl.compressed:
        click.echo(f"perplexity: compressed {ppl.compressed['perplexity']:.4f}")
    if size is not None:
        click.echo(
            f"size: {size.artifact_weights_bytes / 1e6:.1f} MB "
            f"({size.artifact_over_dense_fp16:.3f}x of dense fp16, {size.artifact_over_ideal:.3f}x of ideal)"
        )
    click.echo(f"report: {result.output / 'report.md'}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", required=True, metavar="KEY.PATH", help="The recipe value to vary, e.g. stages[0].prune.sparsity.")
@click.option("--values", "values_text", required=True, metavar="V1,V2,...", help="Comma-separated values (parsed as YAML; N:M patterns stay text).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for one artifact per value, sweep.json and sweep.png.")
@_set_option
@click.option("--overwrite", is_flag=True, help="Replace a previous sweep in --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def sweep(recipe: Path, key: str, values_text: str, out: Path, overrides: tuple[str, ...], overwrite: bool, no_progress: bool) -> None:
    """Run RECIPE once per value of KEY and plot perplexity against it and against size.

    \b
    Example: perplexity of SparseGPT over sparsity
      compress sweep recipes/smollm2-sparsegpt50.yaml --key stages[0].prune.sparsity \\
        --values 0.3,0.5,0.7 --out runs/sweep-sparsegpt
    """
    from compressor.recipe import parse_value
    from compressor.sweep import sweep as run_sweep

    values = [parse_value(v, "--values") for v in values_text.split(",") if v.strip()]
    summary = run_sweep(recipe, key, values, out, list(overrides), overwrite, progress=not no_progress)
    dense = summary["dense"]
    if dense:
        click.echo(f"dense: perplexity {dense['perplexity']:.4f}")
    for p in summary["points"]:
        click.echo(f"{key}={p['value']}: perplexity {p['perplexity']:.4f}, {p['artifact_mb']:.1f} MB")
    click.echo(f"plot: {out / 'sweep.png'}")


def _runtime_options(command):
    """--dtype and --cache-dequantized: how a GPTQ artifact (or model) is run (models.load_any)."""
    from compressor.models import DTYPES

    command = click.option("--cache-dequantized", is_flag=True,
                           help="GPTQ artifacts: keep a dequantized float copy of every quantized layer and use it instead of "
                                "the kernels (the float model's speed and memory).")(command)  # fmt: skip
    return click.option("--dtype", default="auto", type=click.Choice(DTYPES), show_default=True,
                        help="Compute dtype; auto: float32 on CPU (the CPU kernels' arithmetic), float16 on CUDA.")(command)  # fmt: skip


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_set_option
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE without running it: schema, model source, group sizes against the model's shapes."""
    from compressor.pipeline import validate as validate_recipe
    from compressor.recipe import load_recipe

    r = load_recipe(recipe, list(overrides))
    from compressor.stages import stage_kind

    checked = validate_recipe(r, str(recipe))
    stages = ", ".join(f"{kind}({stage_kind(kind).summary(opts)})" for kind, opts in r.stage_list())
    reshaped = any(stage_kind(kind).reshapes_model(opts) for kind, opts in r.stage_list())
    click.echo(
        f"{recipe}: ok: model {checked.source.label} ({checked.config.model_type}), "
        f"stages [{stages}], {checked.linears_to_compress} linears to compress"
        f"{' (counted before structured pruning)' if reshaped else ''}, "
        f"output {r.output}"
    )
    for warning in checked.warnings:
        click.echo(f"warning: {warning}", err=True)


@main.command(name="eval")
@click.argument("model_or_artifact")
@click.option("--data", "source", default="python-docs", show_default=True,
              help="python-docs, wikitext2, c4, a Hub dataset id, or a .txt/.jsonl/.parquet file.")  # fmt: skip
@click.option("--config", "config", default=None, help="Hub dataset configuration.")
@click.option("--split", default=None, help="Dataset split (default: test; validation for c4).")
@click.option("--text-field", default="text", show_default=True, help="Text column for datasets and files.")
@click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(8), help="Window length (capped by the model).")
@click.option("--max-windows", default=None, type=click.IntRange(1), help="Evaluate only the first N windows.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model_or_artifact, source, config, split, text_field, seq_len, max_windows, device, dtype, cache_dequantized, as_json) -> None:
    """Perplexity of MODEL_OR_ARTIFACT (a GPTQ or ONNX artifact directory, or any model source).

    Protocol: the evaluation text is tokenized once and cut into non-overlapping windows of
    --seq-len tokens; ppl = exp(mean NLL of every next-token prediction inside the windows).
    """
    from compressor.data import evaluation_tokens
    from compressor.evaluation.perplexity import perplexity
    from compressor.recipe import EvaluationData

    spec = EvaluationData(source=source, config=config, split=split, text_field=text_field, seq_len=seq_len, max_windows=max_windows)
    from compressor.models import load_any

    model, tokenizer = load_any(model_or_artifact, device, dtype=dtype, cache_dequantized=cache_dequantized)  # ONNX: onnxruntime
    result = perplexity(model, evaluation_tokens(tokenizer, spec), spec.seq_len, 1, spec.max_windows)
    if as_json:
        click.echo(json.dumps({"model": model_or_artifact, "data": source, **result.to_dict()}))
    else:
        click.echo(
            f"perplexity {result.perplexity:.4f} on {source} ({result.windows} windows x {result.seq_len} tokens, "
            f"{result.tokens} predicted tokens)"
        )


@main.command()
@click.argument("model_or_artifact")
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 8192))
@click.option("--chat", is_flag=True, help="Wrap PROMPT in the tokenizer's chat template.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 is greedy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@_runtime_options
def generate(model_or_artifact, prompt, max_new_tokens, chat, temperature, seed, device, dtype, cache_dequantized) -> None:
    """Print a completion of PROMPT by MODEL_OR_ARTIFACT (greedy unless --temperature > 0).

    MODEL_OR_ARTIFACT may also be an ONNX artifact (`compress export --format onnx`), run by onnxruntime.
    The completion runs through `compress serve`'s engine, so greedy outputs are the server's.
    """
    from compressor.models import load_any
    from compressor.serve import complete_text

    model, tokenizer = load_any(model_or_artifact, device, dtype=dtype, cache_dequantized=cache_dequantized)
    with _engine_options_as_flags():
        completion = complete_text(model, tokenizer, prompt, max_new_tokens, chat, temperature, seed, where=model_or_artifact)
    click.echo(completion if chat else prompt + completion)


@contextlib.contextmanager
def _engine_options_as_flags():
    """The serving engine names its options as EngineConfig fields (max_model_len); here they are
    flags (--max-model-len), so its errors are spelled that way."""
    from compressor.serve.engine import EngineConfigError

    try:
        yield
    except EngineConfigError as exc:
        flags = {name: "--" + name.replace("_", "-") for name in ("max_model_len", "kv_cache_gb", "max_batch_size", "draft")}
        raise UserError(exc.spelled(flags)) from None


@main.command()
@click.argument("path", required=False)
def info(path: str | None) -> None:
    """Describe PATH (an artifact or a recipe), or, without PATH, this installation.

    An artifact is verified against its manifest first (exit 2 on any mismatch).
    """
    from compressor.describe import describe

    description = describe(path)
    for warning in description.warnings:
        click.echo(f"warning: {warning}", err=True)
    for line in description.lines:
        click.echo(line)


EXPORT_FORMATS = ("onnx", "gguf", "compressed-tensors")


@main.command(name="export")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, metavar="FORMAT", help=f"Target format: {', '.join(EXPORT_FORMATS)}.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Directory to write (all or nothing); for gguf a file name ending in .gguf.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output once the new one is complete.")
@click.option("--accuracy-level", default=0, show_default=True, type=int,
              help="onnx: MatMulNBits accuracy_level; 0 computes in float32, 4 quantizes activations to int8 (faster on CPU, less exact).")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def export_cmd(artifact: Path, fmt: str, output: Path, overwrite: bool, accuracy_level: int, no_progress: bool) -> None:
    """Convert the GPTQ ARTIFACT into another FORMAT at --output, re-expressing its weights exactly.

    \b
    onnx: a decoder with past key/values for onnxruntime; each GPTQ linear becomes a
    com.microsoft MatMulNBits node holding the artifact's own codes, scales and zero points.
      compress export runs/smollm2-w4g64 --format onnx --output runs/smollm2-w4g64-onnx
      compress generate runs/smollm2-w4g64-onnx "def fibonacci(n):"
    gguf: one file for llama.cpp, Ollama and LM Studio (Q4_0/Q8_0/Q4_1 blocks, bit for bit).
      compress export runs/smollm2-w4g64 --format gguf --output smollm2-w4g64.gguf
    compressed-tensors: vLLM's pack-quantized checkpoint (what llm-compressor writes).
      compress export runs/smollm2-w4g64 --format compressed-tensors --output runs/smollm2-w4g64-ct
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format: {fmt!r} is not supported; supported: {', '.join(EXPORT_FORMATS)}")
    if accuracy_level not in (0, 4):
        raise UserError(f"--accuracy-level: {accuracy_level} is not allowed: 0 (float32) or 4 (int8 activations)")
    if fmt == "gguf":
        from compressor.export.gguf import export_gguf

        facts = export_gguf(artifact, output, overwrite=overwrite, progress=not no_progress)
        types = ", ".join(f"{n} {t}" for t, n in sorted(facts["tensor_types"].items()))
        click.echo(f"gguf file: {output} ({facts['gguf_bytes'] / 1e6:.1f} MB; {types} linears)")
        return
    if fmt == "compressed-tensors":
        from compressor.export.compressed_tensors import export_compressed_tensors

        out = export_compressed_tensors(artifact, output, overwrite=overwrite, progress=not no_progress)
        size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
        click.echo(f"compressed-tensors artifact: {out} ({size / 1e6:.1f} MB of weights)")
        return
    from compressor.export.onnx import export_onnx, onnx_bytes

    out = export_onnx(artifact, output, overwrite=overwrite, accuracy_level=accuracy_level, progress=not no_progress)
    click.echo(f"onnx artifact: {out} ({onnx_bytes(out) / 1e6:.1f} MB model.onnx)")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Hugging Face Hub model repository.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--overwrite", is_flag=True, help="Allow committing to a repository that already exists.")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card; upload nothing.")
def push(artifact: Path, repo_id: str, private: bool, revision: str | None, overwrite: bool, dry_run: bool) -> None:
    """Upload ARTIFACT to the Hugging Face Hub with a generated model card (README.md), in one commit.

    The token comes from HF_TOKEN or `hf auth login`. The artifact's manifest is verified first.
    """
    from compressor.hub import push as push_artifact

    if dry_run:
        click.echo(f"dry run: would upload to {repo_id}:")
    result = push_artifact(artifact, repo_id, private=private, revision=revision, overwrite=overwrite, dry_run=dry_run, echo=click.echo)
    if not dry_run:
        click.echo(f"pushed: {result}")


@main.command()
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "onnx"]), show_default=True,
              help="onnx: run an ONNX artifact (`compress export --format onnx`) with onnxruntime; auto picks it for one.")
@click.option("--draft", default=None, metavar="DRAFT_ARTIFACT", help="A smaller model (same tokenizer) for speculative decoding of greedy requests.")
@click.option("--num-speculative-tokens", default=4, show_default=True, type=click.IntRange(1, 16), help="Draft tokens proposed per step (k).")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1, 1024), help="Sequences decoding together.")
@click.option("--max-model-len", default=None, type=click.IntRange(2), help="Prompt + completion tokens per request [default: the model's context, at most 2048].")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1), help="Longest prompt accepted [default: max-model-len - 1].")
@click.option("--max-tokens", "max_tokens_limit", default=None, type=click.IntRange(1), help="Largest max_tokens a request may ask [default: max-model-len - 1].")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(0), help="Requests waiting for a slot before new ones get 429.")
@click.option("--prefill-chunk", default=256, show_default=True, type=click.IntRange(1), help="Prompt tokens read per engine step (long prompts interleave with decoding).")
@click.option("--kv-cache-gb", default=4.0, show_default=True, type=click.FloatRange(0, min_open=True), help="KV cache budget (served model and draft); caps the batch size.")
@click.option("--served-model-name", default=None, help="The model name clients send [default: the artifact directory's name].")
@click.option("--shutdown-timeout", default=60.0, show_default=True, type=click.FloatRange(0), help="Seconds SIGTERM waits for in-flight requests.")
@click.option("--max-request-bytes", default=2 * 2**20, show_default=True, type=click.IntRange(1),
              help="Largest request body; larger ones get HTTP 413 (the default, 2 MiB, fits a 128k-token prompt).")
@_runtime_options
def serve(artifact, host, port, device, backend, draft, num_speculative_tokens, max_batch_size, max_model_len, max_prompt_tokens,
          max_tokens_limit, max_queue, prefill_chunk, kv_cache_gb, served_model_name, shutdown_timeout, max_request_bytes, dtype,
          cache_dequantized) -> None:  # fmt: skip
    """Serve ARTIFACT (an artifact directory or any model source) with an OpenAI-compatible API.

    \b
    Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
    Example:
      compress serve runs/smollm2-w4g64 --port 8000
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-w4g64", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'
    """
    from compressor.serve import serve as run_server

    with _engine_options_as_flags():
        run_server(
            artifact, host=host, port=port, device=device, backend=backend, draft=draft, served_model_name=served_model_name,
            dtype=dtype, cache_dequantized=cache_dequantized,
            shutdown_timeout=shutdown_timeout, num_speculative_tokens=num_speculative_tokens, max_batch_size=max_batch_size,
            max_model_len=max_model_len, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_limit, max_queue=max_queue,
            prefill_chunk=prefill_chunk, kv_cache_gb=kv_cache_gb, max_request_bytes=max_request_bytes,
        )  # fmt: skip


if __name__ == "__main__":
    main()
