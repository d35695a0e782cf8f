"""Running a benchmark: cold start, warm-up, then each concurrency level (or arrival rate),
bounded in request count and time, with the serving process sampled throughout.

Closed loop: ``concurrency`` workers each send their next prompt as soon as the previous
answer ends. Open loop (``rate``): requests arrive as a Poisson process, whether or not
earlier ones have finished, which is what shows queueing under load. Either way the run stops
at ``requests`` requests or ``max_seconds``, whichever comes first.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgelm.bench.resources import ResourceSampler
from edgelm.bench.results import BenchRun, RequestResult, Scenario
from edgelm.bench.stats import SLO, summarise_scenario
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt

# (done, total, description) — the CLI turns this into a progress bar.
ProgressFn = Callable[[int, int, str], None]
MAX_IN_FLIGHT = 64


@dataclass
class BenchConfig:
    requests: int = 8
    """Measured requests per scenario (at least the concurrency level)."""
    warmup: int = 1
    concurrency: list[int] = field(default_factory=lambda: [1])
    rate: float | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    max_seconds: float = 600.0
    cold: bool = True
    slo: SLO | None = None
    ignore_eos: bool = False

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }
        if self.ignore_eos:  # only when asked: strict OpenAI-style servers may reject it
            params["ignore_eos"] = True
        return params


def _noop(done: int, total: int, description: str) -> None:
    return None


def run_scenario(
    target: Target,
    prompts: list[Prompt],
    config: BenchConfig,
    concurrency: int,
    rate: float | None = None,
    progress: ProgressFn = _noop,
) -> Scenario:
    """One target at one concurrency level (or arrival rate)."""
    count = max(config.requests, concurrency)
    order = itertools.islice(itertools.cycle(prompts), count)
    queue = list(order)
    label = f"{target.name} ×{concurrency}" if rate is None else f"{target.name} @{rate}/s"
    results: list[RequestResult] = []
    lock = threading.Lock()
    deadline = time.monotonic() + config.max_seconds
    scenario_start = time.perf_counter()

    def one(prompt: Prompt) -> None:
        params = config.params()
        if prompt.max_tokens:
            params["max_tokens"] = prompt.max_tokens
        started = time.perf_counter() - scenario_start
        result = target.request(prompt, params)
        result.started_at = started
        with lock:
            results.append(result)
            progress(len(results), count, label)

    with ResourceSampler(target.pid()) as sampler:
        if rate is None:
            pending = iter(queue)

            def worker() -> None:
                while time.monotonic() < deadline:
                    with lock:
                        prompt = next(pending, None)
                    if prompt is None:
                        return
                    one(prompt)

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                for future in [pool.submit(worker) for _ in range(concurrency)]:
                    future.result()
        else:
            arrivals = random.Random(config.seed)
            with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
                futures = []
                for prompt in queue:
                    if time.monotonic() >= deadline:
                        break
                    futures.append(pool.submit(one, prompt))
                    time.sleep(arrivals.expovariate(rate))
                for future in futures:
                    future.result()
    scenario = Scenario(
        target=target.name,
        kind=target.kind,
        model=target.model,
        concurrency=concurrency if rate is None else 0,
        rate=rate,
        warmup=config.warmup,
        requests=sorted(results, key=lambda r: r.started_at),
        wall_s=time.perf_counter() - scenario_start,
        resources=sampler.result,
    )
    summarise_scenario(scenario, config.slo)
    return scenario


def run_bench(
    targets: list[Target],
    prompts: list[Prompt],
    config: BenchConfig,
    progress: ProgressFn = _noop,
    system: dict[str, Any] | None = None,
    name: str = "",
) -> BenchRun:
    """Every target through cold start, warm-up and each concurrency level (or the rate)."""
    run = BenchRun(
        created_at=time.time(),
        name=name,
        config={
            **{k: v for k, v in vars(config).items() if k != "slo"},
            "slo": vars(config.slo) if config.slo else None,
            "prompts": [p.id for p in prompts],
            "targets": [t.name for t in targets],
        },
        system=system or {},
    )
    for target in targets:
        try:
            cold = target.open()
            if config.cold:
                first = target.request(prompts[0], config.params())
                cold.first_request = first
            for i in range(config.warmup):
                target.request(prompts[i % len(prompts)], config.params())
                progress(i + 1, config.warmup, f"{target.name} warm-up")
            levels: list[tuple[int, float | None]] = (
                [(1, config.rate)] if config.rate else [(c, None) for c in config.concurrency]
            )
            # Each level goes on where the previous one stopped in the prompt list, so that with
            # a large set (``unique``) no level re-sends prompts a server may still have cached.
            offset = config.warmup
            for level, rate in levels:
                start = offset % len(prompts)
                rotated = prompts[start:] + prompts[:start]
                scenario = run_scenario(target, rotated, config, level, rate, progress)
                offset += config.requests
                if levels.index((level, rate)) == 0:
                    scenario.cold = cold
                run.scenarios.append(scenario)
        finally:
            target.close()
    return run
