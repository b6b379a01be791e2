"""Speculative decoding at temperature 0: acceptance rate and speed-up of a draft model.

The same prompts run through the serving engine one request at a time (batch 1), first without
a draft, then with the draft proposing k tokens per step. Greedy outputs must be identical (the
script counts and reports any that are not), the draft's acceptance rate is accepted / proposed
tokens, and the speed-up is the ratio of generated tokens per second.

    python benchmarks/speculative.py --target /work/artifacts/smollm2-w4g64 \\
        --draft /work/artifacts/smollm2-draft -k 2 -k 4 --json benchmarks/results/speculative.json

Without a trained draft, `--draft-layers N` builds a stand-in: the target keeping N of its
layers (evenly spaced, no training). It shows the machinery works; its acceptance is low.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPTS

from compressor.artifacts.directory import write_json
from compressor.serve import load_for_serving
from compressor.serve.engine import Engine, EngineConfig
from compressor.serve.sampling import SamplingParams


def keep_layers(model, n: int):
    """A copy of `model` with n of its decoder layers, evenly spaced (first and last kept)."""
    draft = copy.deepcopy(model)
    layers = draft.get_decoder().layers
    total = len(layers)
    keep = sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [0]
    draft.get_decoder().layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(draft.get_decoder().layers):
        layer.self_attn.layer_idx = new_index  # the cache is indexed by position in the stack
    draft.config.num_hidden_layers = len(keep)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = [draft.config.layer_types[i] for i in keep]
    return draft


def run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """Serve `prompts` one after another; the engine runs on this (main) thread as under `compress
    serve` (see Engine.run), a client thread submits and waits."""
    outputs, times = [], []

    def client() -> None:
        try:
            started = time.perf_counter()
            for ids in prompts:
                tokens, _, _ = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
                outputs.append(tokens)
            times.append(time.perf_counter() - started)
        finally:
            engine.shutdown()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run()
    thread.join()
    if len(outputs) != len(prompts):
        raise SystemExit("a request failed; see the log above")
    return outputs, times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="The served model (artifact directory or model source)")
    draft_arg = ap.add_mutually_exclusive_group(required=True)
    draft_arg.add_argument("--draft", help="The draft model (same tokenizer)")
    draft_arg.add_argument("--draft-layers", type=int, help="Stand-in draft: the target with this many of its layers")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, action="append", help="Draft tokens per step (repeatable; default 4)")
    ap.add_argument("--prompts", type=int, default=8, help=f"How many prompts (at most {len(PROMPTS)})")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ks = args.num_speculative_tokens or [4]

    target, tokenizer = load_for_serving(args.target, args.device)
    if args.draft:
        draft, _ = load_for_serving(args.draft, args.device)
        draft_name = args.draft
    else:
        draft = keep_layers(target, args.draft_layers)
        draft_name = f"{args.target} keeping {args.draft_layers} of {target.config.num_hidden_layers} layers (untrained stand-in)"
    prompts = [tokenizer(p).input_ids for p in PROMPTS[: args.prompts]]
    max_len = max(len(p) for p in prompts) + args.max_tokens + 1
    warm = prompts[:1]

    def engine(**options) -> Engine:
        return Engine(target, tokenizer, EngineConfig(max_model_len=max_len, max_batch_size=1, **options), draft=draft if "num_speculative_tokens" in options else None)

    run(engine(), warm, 8)  # warm-up
    reference, plain_s = run(engine(), prompts, args.max_tokens)
    # the draft alone as the served model: how much one draft step costs against a target step
    draft_alone = Engine(draft, tokenizer, EngineConfig(max_model_len=max_len, max_batch_size=1))
    _, draft_s = run(draft_alone, prompts, args.max_tokens)
    generated = sum(len(t) for t in reference)
    rows = []
    for k in ks:
        run(engine(num_speculative_tokens=k), warm, 8)  # warm-up
        spec = engine(num_speculative_tokens=k)
        outputs, spec_s = run(spec, prompts, args.max_tokens)
        rows.append({
            "k": k,
            "acceptance_rate": spec.spec_accepted / max(spec.spec_proposed, 1),
            "proposed": spec.spec_proposed,
            "accepted": spec.spec_accepted,
            "tokens_per_s": generated / spec_s,
            "speedup": plain_s / spec_s,
            "identical_outputs": sum(a == b for a, b in zip(outputs, reference)),
        })  # fmt: skip
    result = {
        "target": args.target,
        "draft": draft_name,
        "backend": spec.backend,  # onnxruntime provider or torch device
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "baseline_tokens_per_s": generated / plain_s,
        "draft_alone_tokens_per_s": generated / draft_s,
        "draft_step_cost_vs_target": draft_s / plain_s,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "runs": rows,
    }
    print(f"target {args.target}\ndraft {draft_name}\n{len(prompts)} prompts x {args.max_tokens} tokens, temperature 0, batch 1")
    print(f"without draft: {result['baseline_tokens_per_s']:.1f} tokens/s; the draft alone: {result['draft_alone_tokens_per_s']:.1f} "
          f"tokens/s (a draft step costs {result['draft_step_cost_vs_target']:.2f}x a target step)\n")
    print("| k | acceptance rate | tokens/s | speed-up | identical outputs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['acceptance_rate']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['identical_outputs']}/{len(prompts)} |")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
