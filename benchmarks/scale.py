"""Compressing models of real size on this machine: wall time and peak memory against model size.

For one model (a synthetic checkpoint from make_synthetic.py, made here if missing, or any model
source), one `compress run` in a child process with W4 g128 GPTQ (--group-size) on 8 x 256 calibration tokens
and perplexity on one 2048-token window (dense and compressed, block by block), then the artifact
loaded by `compressor.runtime.load` generating 8 tokens (`compress generate`) in a second child.
Peak resident memory of each child is sampled every 0.2 s from outside (psutil, the process and
its children); the run's own report adds the peak of each phase and the time of every block.

With --layers N the synthetic model has only the first N blocks of the size's widths (the same
weights as the full model's first N): a run whose per-block time is then extrapolated to the full
depth and marked as such (`extrapolated_seconds`); its peak memory is the full model's, which is
one block's plus the embeddings.

    python benchmarks/scale.py --params 8B --workdir /work/scale --json benchmarks/results/scale_8b.json
    python benchmarks/scale.py --params 14B --layers 6 --workdir /work/scale --json benchmarks/results/scale_14b_6l.json
    python benchmarks/scale.py --source smollm2-135m --load whole --group-size 64 --json benchmarks/results/scale_135m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_synthetic  # noqa: E402 - the sibling script: SIZES


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; wall seconds, exit code, peak RSS (MB) of it and its children, output tail."""
    peak = 0
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            parent = psutil.Process(proc.pid)
            while not stop.wait(0.2):
                try:
                    procs = [parent, *parent.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in procs))
                except psutil.Error:
                    pass

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        code = proc.wait()
        stop.set()
        thread.join()
        seconds = time.perf_counter() - start
        log.seek(0)
        tail = log.read()[-3000:]
    return {"cmd": cmd, "exit_code": code, "seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20, 1), "output_tail": tail}


def recipe_text(source: str, output: Path, load: str, eval_windows: int, group_size: int) -> str:
    return f"""model: {{source: {json.dumps(source)}}}
data:
  calibration: {{samples: 8, seq_len: 256}}
  evaluation: {{seq_len: 2048, max_windows: {eval_windows}}}
stages:
  - quantize: {{method: gptq, bits: 4, group_size: {group_size}}}
compute: {{load: {load}}}
output: {json.dumps(str(output))}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", choices=[s for s in make_synthetic.SIZES if s != "tiny"], help="a synthetic model of this size")
    what.add_argument("--source", help="any model source instead (a directory, smollm2-135m, ...)")
    parser.add_argument("--layers", type=int, help="synthetic: only the first N blocks (time extrapolated to the full depth)")
    parser.add_argument("--workdir", type=Path, default=Path("/work/scale"), help="where models and artifacts go")
    parser.add_argument("--load", default="blockwise", choices=["blockwise", "whole", "auto"], help="compute.load of the run")
    parser.add_argument("--eval-windows", type=int, default=1, help="2048-token perplexity windows")
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ group size (SmolLM2's widths need 64)")
    parser.add_argument("--keep-artifact", action="store_true", help="keep the artifact (default: deleted after the generate check)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    result: dict = {"machine": {"cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}}

    if args.params:
        full_layers = make_synthetic.SIZES[args.params]["num_hidden_layers"]
        layers = args.layers or full_layers
        name = f"synthetic-{args.params.lower()}" + (f"-{layers}l" if layers != full_layers else "")
        model_dir = args.workdir / name
        if not (model_dir / "model.safetensors.index.json").is_file():
            cmd = [python, str(HERE / "make_synthetic.py"), "--params", args.params, "--out", str(model_dir), "--no-progress"]
            made = run_measured(cmd + (["--layers", str(layers)] if args.layers else []))
            if made["exit_code"]:
                raise SystemExit(f"make_synthetic failed:\n{made['output_tail']}")
            result["make_synthetic"] = {k: v for k, v in made.items() if k != "output_tail"}
        source = str(model_dir)
        result.update(params=args.params, layers=layers, full_layers=full_layers)
        result["checkpoint_bytes"] = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    else:
        source, name = args.source, Path(args.source).name or args.source
    result["source"] = source

    artifact = args.workdir / f"{name}-w4g{args.group_size}"
    recipe = args.workdir / f"{name}-w4g{args.group_size}.yaml"
    recipe.write_text(recipe_text(source, artifact, args.load, args.eval_windows, args.group_size))
    print(f"compress run {recipe} ...", file=sys.stderr)
    run = run_measured([python, "-m", "compressor.cli", "run", str(recipe), "--overwrite", "--no-progress"])
    result["run"] = run
    if run["exit_code"]:
        print(run["output_tail"], file=sys.stderr)
        raise SystemExit(f"compress run failed (exit {run['exit_code']})")
    report = json.loads((artifact / "report.json").read_text())
    result["report"] = {k: report[k] for k in ("model", "environment", "perplexity", "size", "timings", "total_seconds")}
    stage = report["stages"][0]
    result["stage"] = {"measurement": stage["measurement"], "seconds_per_block": stage.get("seconds_per_block")}
    blocks = stage.get("seconds_per_block") or []
    if args.params and blocks:
        per_block = sum(blocks) / len(blocks)
        result["seconds_per_block_mean"] = round(per_block, 1)
        if layers != full_layers:
            result["extrapolated_seconds"] = round(run["seconds"] + per_block * (full_layers - layers), 1)

    print(f"compress generate {artifact} ...", file=sys.stderr)
    gen = run_measured([python, "-m", "compressor.cli", "generate", str(artifact), "The capital of France is", "--max-new-tokens", "8"])
    result["generate"] = gen
    if gen["exit_code"]:
        print(gen["output_tail"], file=sys.stderr)
    result["artifact_bytes"] = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
    if not args.keep_artifact:
        import shutil

        shutil.rmtree(artifact, ignore_errors=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    t = report["timings"]
    print(f"\n{name}: {report['model']['parameters'] / 1e9:.2f}B parameters, compress run {run['seconds']:.0f} s, "
          f"peak RSS {run['peak_rss_mb'] / 1024:.2f} GiB; generate 8 tokens: {gen['seconds']:.0f} s, peak RSS "
          f"{gen['peak_rss_mb'] / 1024:.2f} GiB, exit {gen['exit_code']}")  # fmt: skip
    for phase, m in t.items():
        print(f"  {phase}: {m['seconds']:.1f} s, peak {m['peak_rss_mb'] / 1024:.2f} GiB")
    if "extrapolated_seconds" in result:
        print(f"  extrapolated to {full_layers} blocks: {result['extrapolated_seconds']:.0f} s ({result['seconds_per_block_mean']:.1f} s per block)")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
