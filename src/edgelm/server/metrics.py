"""What the running service has done, for ``/openai/status`` (JSON) and ``/metrics``
(Prometheus text format).

Each app has its own prometheus registry (no process-wide globals), so several services or
tests in one process never mix their counts. Pool state (queue depth, loaded models, memory)
is read at scrape time rather than copied on every change.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from edgelm.bench.resources import tree_rss
from edgelm.engines.base import Fold

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)


@dataclass
class ModelCounters:
    requests: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    total_s: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    decode_tps: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class _PoolCollector(Collector):
    """Gauges read from the pool when Prometheus scrapes."""

    def __init__(self, pool_info: Callable[[], list[dict[str, Any]]]):
        self.pool_info = pool_info

    def collect(self) -> Iterator[Metric]:
        loaded = self.pool_info()
        queue = GaugeMetricFamily(
            "edgelm_queue_depth", "Requests waiting per model", labels=["model"]
        )
        active = GaugeMetricFamily(
            "edgelm_active_requests", "Requests generating per model", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "edgelm_model_memory_bytes", "Estimated memory per loaded model", labels=["model"]
        )
        threads = GaugeMetricFamily(
            "edgelm_model_threads",
            "CPU threads a local model computes with now (adapted to other processes' load "
            "when compute.threads is auto)",
            labels=["model", "mode"],
        )
        for info in loaded:
            queue.add_metric([str(info["id"])], float(info["waiting"]))
            active.add_metric([str(info["id"])], float(info["active"]))
            memory.add_metric([str(info["id"])], float(info["memory_bytes"]))
            runtime = info.get("runtime") or {}
            if isinstance(runtime, dict) and isinstance(runtime.get("threads"), int):
                mode = str(runtime.get("threads_mode", "fixed"))
                threads.add_metric([str(info["id"]), mode], float(runtime["threads"]))
        yield queue
        yield active
        yield memory
        yield from _replica_metrics(loaded)
        yield threads
        yield GaugeMetricFamily("edgelm_loaded_models", "Models loaded", value=len(loaded))
        yield GaugeMetricFamily(
            "edgelm_process_resident_memory_bytes",
            "Resident memory of the service process and its model runners",
            value=tree_rss(),
        )


def _replica_metrics(loaded: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per-replica figures of remote models (their engine's
    ``live_info()["replicas"]``), labelled by model and replica URL."""
    labels = ["model", "replica"]
    requests = CounterMetricFamily(
        "edgelm_replica_requests", "Requests sent to each replica (attempts)", labels=labels
    )
    failures = CounterMetricFamily(
        "edgelm_replica_failures", "Failed requests and health checks of each replica", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "edgelm_replica_in_flight", "Requests in flight on each replica", labels=labels
    )
    healthy = GaugeMetricFamily(
        "edgelm_replica_healthy", "1 while the replica is in rotation, 0 taken out", labels=labels
    )
    latency = SummaryMetricFamily(
        "edgelm_replica_first_chunk_seconds",
        "Time from sending to the first chunk (or embedding answer) per replica",
        labels=labels,
    )
    for info in loaded:
        runtime = info.get("runtime")
        replicas = runtime.get("replicas") if isinstance(runtime, dict) else None
        for replica in replicas or []:
            key = [str(info["id"]), str(replica["url"])]
            requests.add_metric(key, float(replica["requests"]))
            failures.add_metric(key, float(replica["failures"]))
            in_flight.add_metric(key, float(replica["in_flight"]))
            healthy.add_metric(key, 1.0 if replica["healthy"] else 0.0)
            latency.add_metric(
                key, count_value=replica["first_chunk_count"], sum_value=replica["first_chunk_sum_s"]
            )
    yield from (requests, failures, in_flight, healthy, latency)


class Metrics:
    """Per-model request, token and latency records (bounded, so memory stays flat)."""

    def __init__(self, pool_info: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.started = time.time()
        self.models: dict[str, ModelCounters] = defaultdict(ModelCounters)
        self.responses: dict[tuple[str, int], int] = defaultdict(int)
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "edgelm_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self._generations = Counter(
            "edgelm_generations",
            "Generations by model and outcome",
            ["model", "finish"],
            registry=self.registry,
        )
        self._tokens_in = Counter(
            "edgelm_prompt_tokens", "Prompt tokens read", ["model"], registry=self.registry
        )
        self._tokens_out = Counter(
            "edgelm_completion_tokens",
            "Completion tokens generated",
            ["model"],
            registry=self.registry,
        )
        self._ttft = Histogram(
            "edgelm_ttft_seconds",
            "Time to first token (queue included)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._e2e = Histogram(
            "edgelm_e2e_seconds",
            "End-to-end generation time (queue included)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._tps = Histogram(
            "edgelm_decode_tokens_per_second",
            "Decode speed per generation",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=self.registry,
        )
        if pool_info is not None:
            self.registry.register(_PoolCollector(pool_info))

    def observe(self, model: str, fold: Fold, queue_s: float) -> None:
        counters = self.models[model]
        counters.requests += 1
        if fold.finish == "cancelled":
            counters.cancelled += 1
        usage = fold.usage()
        counters.prompt_tokens += usage.prompt_tokens
        counters.completion_tokens += usage.completion_tokens
        self._generations.labels(model, fold.finish).inc()
        self._tokens_in.labels(model).inc(usage.prompt_tokens)
        self._tokens_out.labels(model).inc(usage.completion_tokens)
        timing = fold.timing()
        if timing.ttft_s is not None:
            counters.ttft_s.append(timing.ttft_s + queue_s)
            self._ttft.labels(model).observe(timing.ttft_s + queue_s)
        counters.total_s.append(timing.total_s + queue_s)
        self._e2e.labels(model).observe(timing.total_s + queue_s)
        if timing.decode_tokens_per_s:
            counters.decode_tps.append(timing.decode_tokens_per_s)
            self._tps.labels(model).observe(timing.decode_tokens_per_s)

    def count_response(self, route: str, status: int) -> None:
        self.responses[(route, status)] += 1
        self._requests.labels(route, str(status)).inc()

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, object]:
        def median(values: deque[float]) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[len(ordered) // 2], 4)

        return {
            "uptime_s": round(time.time() - self.started, 1),
            "models": {
                name: {
                    "requests": c.requests,
                    "cancelled": c.cancelled,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "ttft_p50_s": median(c.ttft_s),
                    "total_p50_s": median(c.total_s),
                    "decode_tokens_per_s_p50": median(c.decode_tps),
                }
                for name, c in self.models.items()
            },
        }
