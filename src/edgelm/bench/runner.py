"""Running a benchmark: cold start, warm-up, then each concurrency level (or arrival rate),
bounded in request count and time, with the serving process sampled throughout.

Closed loop: ``concurrency`` workers each send their next prompt as soon as the previous
answer ends. Open loop (``rate``): requests arrive as a Poisson process, whether or not
earlier ones have finished, which is what shows queueing under load. Either way the run stops
at ``requests`` requests or ``max_seconds``, whichever comes first.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgelm.bench.background import background_load
from edgelm.bench.micro import RawEngine, tg_row
from edgelm.bench.resources import ResourceSampler
from edgelm.bench.results import BenchRun, ColdStart, RequestResult, Scenario
from edgelm.bench.stats import SLO, summarise_scenario
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt

# (done, total, description) — the CLI turns this into a progress bar.
ProgressFn = Callable[[int, int, str], None]
MAX_IN_FLIGHT = 64
T = TypeVar("T")
# Pause between two targets' turns in an interleaved run. When llama.cpp finishes an answer,
# a libgomp worker keeps spinning on a core for ~4 ms (measured: 4.4 ms of CPU in the 5 ms after
# an answer); a target starting at once would read its prompt on one core and a half.
SETTLE_S = 0.02


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
    interleave: bool = False
    """Single stream, the targets taking turns request by request (see run_interleaved)."""
    background_load: int = 0
    """Busy processes kept running during the measurement (see edgelm.bench.background)."""

    def params(self, prompt: Prompt | None = None) -> dict[str, Any]:
        """Request parameters; a prompt's own ``max_tokens`` wins over the run's."""
        params: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }
        if self.ignore_eos:  # only when asked: strict OpenAI-style servers may reject it
            params["ignore_eos"] = True
        if prompt is not None and prompt.max_tokens:
            params["max_tokens"] = prompt.max_tokens
        return params


def no_progress(done: int, total: int, description: str) -> None:
    """The default :data:`ProgressFn`: report nothing."""
    return None


def run_scenario(
    target: Target,
    prompts: list[Prompt],
    config: BenchConfig,
    concurrency: int,
    rate: float | None = None,
    progress: ProgressFn = no_progress,
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
        started = time.perf_counter() - scenario_start
        result = target.request(prompt, config.params(prompt))
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
    progress: ProgressFn = no_progress,
    system: dict[str, Any] | None = None,
    name: str = "",
    raw: dict[str, RawEngine] | None = None,
    checkpoint: Callable[[BenchRun], None] | None = None,
) -> BenchRun:
    """Every target through cold start, warm-up and each concurrency level (or the rate); or,
    with ``config.interleave``, all of them in turns (:func:`run_interleaved`), the ``raw``
    engines' tg measured in every round.

    ``checkpoint`` is handed the run (status "running") before the first request and after
    each finished scenario, so a caller can store it as it grows: a run killed half-way then
    keeps what it measured."""
    save = checkpoint or (lambda _run: None)
    run = BenchRun(
        status="running",
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
    save(run)
    with background_load(config.background_load):
        _measure(run, targets, prompts, config, progress, raw, save)
    run.status = "done"
    return run


def _measure(
    run: BenchRun,
    targets: list[Target],
    prompts: list[Prompt],
    config: BenchConfig,
    progress: ProgressFn,
    raw: dict[str, RawEngine] | None,
    save: Callable[[BenchRun], None],
) -> None:
    """The measurements of :func:`run_bench`, into ``run``; ``save`` after each scenario."""
    if config.interleave:
        raw = raw or {}
        try:
            colds = [_open_and_warm(target, prompts, config, progress) for target in targets]
            run.scenarios, rounds = run_interleaved(targets, prompts, config, raw, progress)
            for scenario, cold in zip(run.scenarios, colds, strict=True):
                scenario.cold = cold
            run.micro = [
                tg_row(engine, f"tg{config.max_tokens} interleaved", rounds[model])
                for model, engine in raw.items()
            ]
        finally:
            for target in targets:
                target.close()
        return
    for target in targets:
        try:
            cold = _open_and_warm(target, prompts, config, progress)
            levels: list[tuple[int, float | None]] = (
                [(1, config.rate)] if config.rate else [(c, None) for c in config.concurrency]
            )
            # Each level goes on where the previous one stopped in the prompt list, so that with
            # a large set (``unique``) no level re-sends prompts a server may still have cached.
            offset = config.warmup
            for level, rate in levels:
                rotated = _rotated(prompts, offset)
                scenario = run_scenario(target, rotated, config, level, rate, progress)
                offset += config.requests
                if levels.index((level, rate)) == 0:
                    scenario.cold = cold
                run.scenarios.append(scenario)
                save(run)
        finally:
            target.close()


def _rotated(items: list[T], offset: int) -> list[T]:
    """The list starting at ``offset`` (wrapping round)."""
    start = offset % len(items)
    return items[start:] + items[:start]


def _open_and_warm(
    target: Target, prompts: list[Prompt], config: BenchConfig, progress: ProgressFn
) -> ColdStart:
    cold = target.open()
    if config.cold:
        cold.first_request = target.request(prompts[0], config.params())
    for i in range(config.warmup):
        target.request(prompts[i % len(prompts)], config.params())
        progress(i + 1, config.warmup, f"{target.name} warm-up")
    return cold


def run_interleaved(
    targets: list[Target],
    prompts: list[Prompt],
    config: BenchConfig,
    raw: dict[str, RawEngine],
    progress: ProgressFn = no_progress,
) -> tuple[list[Scenario], dict[str, list[float]]]:
    """One stream at a time, every target answering the same prompt in turn, round after
    round; with ``raw`` engines, each model's raw tg (``max_tokens`` steps) is measured at the
    start of every round too. Returns a scenario per target and the raw tg rates per model.

    A shared machine's speed drifts by a few percent over minutes (measured here: the same
    raw tg read 26.7 and 28.3 tok/s five minutes apart), as much as the service overhead being
    sought. Target after target, that drift lands on whichever ran later; in turns, it lands
    on all alike, and the same prompt makes each round a pair. The turns start with a
    different target each round and a short pause apart (``SETTLE_S``).
    """
    order = itertools.islice(itertools.cycle(_rotated(prompts, config.warmup)), config.requests)
    results: list[list[RequestResult]] = [[] for _ in targets]
    busy = [0.0 for _ in targets]
    rates: dict[str, list[float]] = {model: [] for model in raw}
    deadline = time.monotonic() + config.max_seconds
    run_start = time.perf_counter()
    samplers = [ResourceSampler(target.pid()) for target in targets]
    with contextlib.ExitStack() as stack:
        for sampler in samplers:
            stack.enter_context(sampler).pause()
        for i, prompt in enumerate(order):
            if time.monotonic() >= deadline:
                break
            for model, engine in raw.items():
                time.sleep(SETTLE_S)
                rates[model].append(engine.tg(config.max_tokens, seed=i))
            params = config.params(prompt)
            # Each round starts with the next target: whichever answers a prompt second reads
            # it more slowly (measured: 1-2 ms on Qwen2.5-0.5B, 3-5 ms on 1.5B), so no target
            # may always go second (see ttft_over, which then cancels the effect).
            # On every pass through the prompt list the rotation shifts by one more, so each
            # prompt is answered in every order when it comes round again.
            for k in _rotated(list(range(len(targets))), i + i // len(prompts)):
                target = targets[k]
                time.sleep(SETTLE_S)
                samplers[k].resume()
                began = time.perf_counter()
                result = target.request(prompt, params)
                busy[k] += time.perf_counter() - began
                samplers[k].pause()
                result.started_at = began - run_start
                results[k].append(result)
            progress(i + 1, config.requests, "interleaved")
    scenarios = []
    for k, target in enumerate(targets):
        scenario = Scenario(
            target=target.name,
            kind=target.kind,
            model=target.model,
            concurrency=1,
            warmup=config.warmup,
            requests=results[k],
            wall_s=busy[k],  # its own time: throughput is per target, not per interleaved run
            resources=samplers[k].result,
        )
        summarise_scenario(scenario, config.slo)
        scenarios.append(scenario)
    return scenarios, rates
