"""Load test for `compress serve`: N concurrent streaming clients x T generated tokens each.

Reports aggregate generated tokens/s, p50/p99 time to first token (TTFT), p50/p99 inter-token
latency (ITL: the gap between successive streamed chunks of one request; one chunk is one token
without a draft model) and errors. Every request asks for exactly T tokens (`ignore_eos`) at
temperature 0, so runs are comparable.

Against a server you started:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 32 --max-tokens 64

Or let the script start `compress serve` itself, once with continuous batching and once serving
the same requests one at a time (--max-batch-size 1), and compare:
    python benchmarks/serve_load.py --artifact /work/artifacts/smollm2-w4g64 --clients 32 --max-tokens 64 \\
        --compare --json benchmarks/results/serve_load.json

The one-at-a-time run can use a subset of the requests (--sequential-requests) to save time:
tokens/s of a server that runs one request at a time does not depend on how many are queued.

Or compare two ways of running the same artifact, both batched, in one run (the second server
gets the --baseline-arg arguments), e.g. the CPU kernels against the float cache:
    python benchmarks/serve_load.py --artifact runs/smollm2-w4g64 --clients 32 --max-tokens 64 \\
        --baseline-arg=--cache-dequantized --json benchmarks/results/serve_load_cpu_kernels.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from compressor.artifacts.directory import write_json

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(x):",
    "Once upon a time, in a small village,",
    "Write a haiku about the sea:",
    "class Stack:\n    def __init__(self):",
    "The three laws of thermodynamics are",
    "SELECT name, COUNT(*) FROM orders",
    "def is_prime(n: int) -> bool:",
    "Photosynthesis is the process by which",
    "# Sort a list of dictionaries by key\n",
    "The quick brown fox",
    "for i in range(10):",
    "A good README should contain",
    "import asyncio\n\nasync def main():",
    "In 1969, the Apollo 11 mission",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunk_times.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - counted and reported
        return {"error": f"{type(exc).__name__}: {exc}"[:300], "sent": sent}
    if tokens != max_tokens:
        return {"error": f"got {tokens} tokens, expected {max_tokens}", "sent": sent}
    return {"sent": sent, "chunk_times": chunk_times, "tokens": tokens, "done": time.perf_counter()}


async def run_load(url: str, model: str, clients: int, max_tokens: int, requests: int | None = None) -> dict:
    """`clients` concurrent clients share `requests` requests (default: one each)."""
    total = requests or clients
    clients = min(clients, total)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(total)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600,
                                  http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:  # fmt: skip

        async def worker():
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, model, prompt, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    ttft = [r["chunk_times"][0] - r["sent"] for r in ok if r["chunk_times"]]
    itl = [b - a for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": total,
        "max_tokens": max_tokens,
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r["error"] for r in results if "error" in r})[:5],
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`compress serve ARTIFACT ...` as a subprocess on a free port; SIGTERM on exit."""

    def __init__(self, artifact: str, extra: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in __exit__
        cmd = [sys.executable, "-m", "compressor.cli", "serve", artifact, "--port", str(self.port), *extra]
        print("starting:", " ".join(cmd[2:]), file=sys.stderr)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise SystemExit("the server did not start within 300 s")

    def model(self) -> str:
        return httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def fmt(value, unit="s") -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if unit == "s" else f"{value:.1f}"


def markdown(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| mode | clients | requests x tokens | completed | errors | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['clients']} | {r['requests']} x {r['max_tokens']} | {r['completed']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
            f"{fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p99_s'])} | {fmt(r['itl_p50_s'])} | {fmt(r['itl_p99_s'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--artifact", help="Start `compress serve ARTIFACT` (and stop it afterwards)")
    ap.add_argument("--model", help="Model name to send (default: the server's first model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--compare", action="store_true", help="With --artifact: also serve the requests one at a time (--max-batch-size 1)")
    ap.add_argument("--sequential-requests", type=int, default=None, help="Requests for the one-at-a-time run (default: --clients)")
    ap.add_argument("--max-model-len", type=int, default=512, help="Passed to compress serve (KV cache size)")
    ap.add_argument("--serve-arg", action="append", default=[], help="Extra `compress serve` argument (repeatable), e.g. --serve-arg=--draft=PATH")
    ap.add_argument("--baseline-arg", action="append", default=[],
                    help="With --artifact: also serve batched with these extra arguments (repeatable) and compare, e.g. --baseline-arg=--cache-dequantized")  # fmt: skip
    ap.add_argument("--json", type=Path, help="Write the results here")
    args = ap.parse_args()

    rows: list[tuple[str, dict]] = []
    if args.url:
        model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
        rows.append(("as served", asyncio.run(run_load(args.url, model, args.clients, args.max_tokens))))
    else:
        log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        common = ["--max-model-len", str(args.max_model_len), *args.serve_arg]
        batched = ["--max-batch-size", str(args.clients), "--max-queue", str(4 * args.clients), *common]
        with Server(args.artifact, batched, log_dir / "serve_load_batched.log") as server:
            model = args.model or server.model()
            asyncio.run(run_load(server.url, model, 2, 4))  # warm-up (first-call allocations)
            rows.append(("continuous batching", asyncio.run(run_load(server.url, model, args.clients, args.max_tokens))))
        if args.baseline_arg:
            with Server(args.artifact, [*batched, *args.baseline_arg], log_dir / "serve_load_baseline.log") as server:
                model = args.model or server.model()
                asyncio.run(run_load(server.url, model, 2, 4))
                rows.append((f"continuous batching, {' '.join(args.baseline_arg)}",
                             asyncio.run(run_load(server.url, model, args.clients, args.max_tokens))))  # fmt: skip
        if args.compare:
            single = ["--max-batch-size", "1", "--max-queue", str(4 * args.clients), *common]
            with Server(args.artifact, single, log_dir / "serve_load_single.log") as server:
                model = args.model or server.model()
                asyncio.run(run_load(server.url, model, 1, 4))
                n = args.sequential_requests or args.clients
                rows.append(("one at a time", asyncio.run(run_load(server.url, model, args.clients, args.max_tokens, requests=n))))
    result = {
        "url": args.url,
        "artifact": args.artifact,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": {name: r for name, r in rows},
    }
    by_name = dict(rows)
    if "one at a time" in by_name:
        result["speedup"] = rows[0][1]["tokens_per_s"] / by_name["one at a time"]["tokens_per_s"]
    if args.baseline_arg:
        result["speedup_over_baseline"] = rows[0][1]["tokens_per_s"] / rows[1][1]["tokens_per_s"]
    print(markdown(rows))
    if "speedup" in result:
        print(f"\ncontinuous batching / one at a time: {result['speedup']:.2f}x aggregate tokens/s")
    if "speedup_over_baseline" in result:
        print(f"\ncontinuous batching / {rows[1][0]}: {result['speedup_over_baseline']:.2f}x aggregate tokens/s")
    if args.json:
        write_json(args.json, result)
    if any(r["errors"] for _, r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
