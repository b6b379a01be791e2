"""Prometheus metrics of one server, in their own registry (never the process-global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("compressor_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.finished = Counter("compressor_sequences_finished", "Generations by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("compressor_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("compressor_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("compressor_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("compressor_running_sequences", "Sequences in the running batch", registry=r)
        self.kv_cache_bytes = Gauge("compressor_kv_cache_bytes", "Bytes allocated for the KV cache (target and draft)", registry=r)
        self.batch_size = Histogram(
            "compressor_decode_batch_size", "Sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.prefill_tokens_per_step = Histogram(
            "compressor_prefill_tokens_per_step", "Prompt tokens per prefill step", buckets=(1, 16, 64, 128, 256, 512, 1024, 2048), registry=r
        )
        self.ttft = Histogram("compressor_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("compressor_inter_token_latency_seconds", "Time between tokens of one sequence", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("compressor_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("compressor_engine_step_seconds", "One engine iteration (prefill and decode)", buckets=_LATENCY_BUCKETS, registry=r)
        self.spec_proposed = Counter("compressor_spec_proposed_tokens", "Draft tokens proposed for verification", registry=r)
        self.spec_accepted = Counter("compressor_spec_accepted_tokens", "Draft tokens the served model accepted", registry=r)
        self.spec_acceptance = Gauge("compressor_spec_acceptance_rate", "Accepted / proposed draft tokens since start", registry=r)
