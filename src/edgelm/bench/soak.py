"""A soak: a fixed concurrency of streams held for a long time, sampled every interval.

What a short benchmark cannot show is what changes over half an hour: memory that creeps up
(a cache never trimmed, a leak per request), file descriptors or threads that pile up (a
connection or a runner never closed), first tokens that come later and later (a KV cache
that fragments, a queue that never drains). So ``concurrency`` workers send requests back to
back until ``duration_s`` is up; every ``interval_s`` the requests finished in that interval
are summarised (TTFT p50/p99, tokens/s, errors) and the serving process is read — RSS, open
file descriptors and threads summed over the process and its children (engines run in child
processes under isolation), and the model's live figures (KV cache use, batch counters) from
``/openai/status`` when the target is an edgelm service.

The verdict (:func:`verdict`) leaves out the first ``warmup_intervals``, where allocators,
caches and thread pools fill up, and then holds the run to the targets: no errors, RSS
growth under 5%, TTFT p99 of the last third at most 1.2× the first third's (or less than
20 ms later), and file
descriptors and threads back where they started (within the streams' own).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from edgelm.bench.resources import process_tree
from edgelm.bench.results import RequestResult
from edgelm.bench.runner import BenchConfig
from edgelm.bench.stats import percentile
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt

LOOPBACK = ("127.0.0.1", "localhost", "::1")
RSS_GROWTH_MAX = 0.05
TTFT_DRIFT_MAX = 1.2
TTFT_DRIFT_FLOOR_S = 0.02
"""A p99 that grows by less than this is no drift whatever the ratio (sub-millisecond TTFTs
of a fake engine double with scheduling noise alone)."""
ERROR_EXAMPLES = 3
END_GRACE_S = 60.0
"""How long the requests in flight at the end may take to finish (at least one interval)."""


class SoakSample(BaseModel):
    """One interval: its requests' figures and the serving process at its end."""

    index: int
    t_s: float
    """Seconds from the start of the soak to the end of this interval."""
    requests: int = 0
    errors: int = 0
    error_examples: list[str] = Field(default_factory=list)
    ttft_s: list[float] = Field(default_factory=list)
    """Every successful request's TTFT in this interval (for percentiles over several)."""
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    completion_tokens: int = 0
    tokens_per_s: float | None = None
    rss_bytes: int | None = None
    fds: int | None = None
    threads: int | None = None
    processes: int | None = None
    runtime: dict[str, float] = Field(default_factory=dict)
    """The model's live numeric figures from the service (KV cache use, batch counters)."""


class SoakRun(BaseModel):
    id: str = ""
    created_at: float = 0.0
    target: str
    model: str
    concurrency: int
    duration_s: float
    interval_s: float
    warmup_intervals: int
    max_tokens: int
    prompts: list[str] = Field(default_factory=list)
    pid: int | None = None
    samples: list[SoakSample] = Field(default_factory=list)
    verdict: dict[str, Any] = Field(default_factory=dict)
    system: dict[str, Any] = Field(default_factory=dict)


SampleFn = Callable[[SoakSample, float], None]
"""Called after each interval with the sample and the soak's elapsed seconds."""


def local_pid(target: Target) -> int | None:
    """The serving process's pid when it runs on this machine (else sampling another
    machine's pid here would read some unrelated local process)."""
    pid = target.pid()
    root = getattr(target, "root", None)
    if pid is None or root is None:
        return pid
    return pid if urlsplit(root).hostname in LOOPBACK else None


def live_runtime(target: Target, model: str) -> dict[str, float] | None:
    """The loaded model's numeric live figures from an edgelm service's ``/openai/status``
    (None when the target is no edgelm service: the caller stops asking)."""
    client = getattr(target, "client", None)
    if client is None or getattr(target, "kind", "") != "service":
        return None
    try:
        status = client.status()
    except Exception:
        return None
    for loaded in status.get("loaded") or []:
        if loaded.get("id") == model:
            runtime = loaded.get("runtime") or {}
            return {k: float(v) for k, v in runtime.items() if isinstance(v, int | float)}
    return {}


def run_soak(
    target: Target,
    prompts: list[Prompt],
    config: BenchConfig,
    duration_s: float,
    concurrency: int,
    interval_s: float = 60.0,
    warmup_intervals: int = 1,
    on_sample: SampleFn | None = None,
) -> SoakRun:
    """Hold ``concurrency`` streams on ``target`` for ``duration_s``, one sample per interval."""
    target.open()
    pid = local_pid(target)
    run = SoakRun(
        created_at=time.time(),
        target=target.name,
        model=target.model,
        concurrency=concurrency,
        duration_s=duration_s,
        interval_s=interval_s,
        warmup_intervals=warmup_intervals,
        max_tokens=config.max_tokens,
        prompts=[p.id for p in prompts],
        pid=pid,
    )
    lock = threading.Lock()
    bucket: list[RequestResult] = []
    order = itertools.cycle(prompts)
    start = time.monotonic()
    deadline = start + duration_s

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                prompt = next(order)
            result = target.request(prompt, config.params(prompt))
            with lock:
                bucket.append(result)

    threads = [
        threading.Thread(target=worker, name=f"edgelm-soak-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    ask_runtime = True
    index = 0
    try:
        while True:
            boundary = min(start + (index + 1) * interval_s, deadline)
            time.sleep(max(0.0, boundary - time.monotonic()))
            last = boundary >= deadline
            stuck = 0
            if last:  # the requests in flight at the deadline finish into the last interval
                grace = time.monotonic() + max(END_GRACE_S, interval_s)
                for thread in threads:
                    thread.join(timeout=max(0.0, grace - time.monotonic()))
                stuck = sum(thread.is_alive() for thread in threads)
            with lock:
                done, bucket[:] = list(bucket), []
            sample = _summarise(index, time.monotonic() - start, done, interval_s)
            if stuck:  # a request that never ends is an error too (and would hang the soak)
                sample.errors += stuck
                sample.error_examples.append(
                    f"{stuck} request(s) still unanswered {max(END_GRACE_S, interval_s):g} s "
                    "after the end"
                )
            if pid is not None:
                try:
                    figures = process_tree(pid)
                except Exception:  # the service died: the errors say so; nothing to read
                    figures = {}
                sample.rss_bytes = figures.get("rss_bytes")
                sample.fds = figures.get("fds")
                sample.threads = figures.get("threads")
                sample.processes = figures.get("processes")
            if ask_runtime:
                runtime = live_runtime(target, target.model)
                ask_runtime = runtime is not None
                sample.runtime = runtime or {}
            run.samples.append(sample)
            if on_sample is not None:
                on_sample(sample, time.monotonic() - start)
            index += 1
            if last:
                break
    finally:
        target.close()
    run.verdict = verdict(run)
    return run


def _summarise(index: int, t_s: float, done: list[RequestResult], interval_s: float) -> SoakSample:
    ok = [r for r in done if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    errors = [r.error or "failed" for r in done if not r.ok]
    return SoakSample(
        index=index,
        t_s=round(t_s, 3),
        requests=len(done),
        errors=len(errors),
        error_examples=list(dict.fromkeys(errors))[:ERROR_EXAMPLES],
        ttft_s=ttft,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        completion_tokens=tokens,
        tokens_per_s=tokens / interval_s if interval_s > 0 else None,
    )


def _check(value: float | None, limit: float, passed: bool | None = None) -> dict[str, Any]:
    ok = passed if passed is not None else (value is not None and value <= limit)
    return {"value": value, "limit": limit, "pass": bool(ok)}


def verdict(run: SoakRun) -> dict[str, Any]:
    """The run held to the soak's targets, past the warm-up intervals (see the module
    docstring). Each check has its value, its limit and whether it passed; ``pass`` is all of
    them. With fewer than three intervals after the warm-up, thirds are single intervals."""
    measured = run.samples[run.warmup_intervals :] or run.samples
    errors = sum(s.errors for s in run.samples)  # a warm-up error is an error too
    checks: dict[str, Any] = {"errors": _check(errors, 0)}
    checks["requests"] = _check(
        sum(s.requests for s in measured), 1, passed=sum(s.requests for s in measured) > 0
    )
    rss = [s.rss_bytes for s in measured if s.rss_bytes]
    if len(rss) >= 2:
        checks["rss_growth"] = _check(round(rss[-1] / rss[0] - 1, 4), RSS_GROWTH_MAX)
    third = max(1, len(measured) // 3)
    first = [t for s in measured[:third] for t in s.ttft_s]
    last = [t for s in measured[-third:] for t in s.ttft_s]
    p_first, p_last = percentile(first, 99), percentile(last, 99)
    if len(measured) >= 2 and p_first and p_last is not None:
        ratio = round(p_last / p_first, 3)
        steady = ratio <= TTFT_DRIFT_MAX or p_last - p_first < TTFT_DRIFT_FLOOR_S
        checks["ttft_p99_drift"] = _check(ratio, TTFT_DRIFT_MAX, passed=steady)
    # Descriptors and threads may differ by what the streams in flight hold at the moment
    # of the sample, not more.
    slack = 2 * run.concurrency + 4
    for key in ("fds", "threads"):
        values = [getattr(s, key) for s in measured if getattr(s, key) is not None]
        if len(values) >= 2:
            checks[f"{key}_growth"] = _check(values[-1] - values[0], slack)
    return {"pass": all(c["pass"] for c in checks.values()), "checks": checks}
