"""How many threads llama.cpp computes with, decided between steps from what the machine does.

llama.cpp's CPU threads meet at a barrier after every operation of the graph. When one of
them is descheduled because another program wants its core, the others spin until it comes
back: measured on 2 cores with one of them kept busy by another process, Qwen2.5-0.5B decoded
at 2-3 tok/s with 2 threads, 15.6 with 1, 27 on an idle machine. A thread count fixed to the
cores is the right choice only on an idle machine.

:class:`ThreadController` keeps choosing. Its inputs, both cheap:

* the CPU time other processes took, read at most every ``period`` seconds
  (:class:`CpuLoadProbe`: the machine's busy time minus this process's and, when this process
  is a model runner the service started, the service's). When others take a share of a core,
  the count drops at once to the cores left over (a missed drop costs 10x, a needless one 2x);
  once the machine has been quiet for ``hold`` seconds the full count comes back.
* the time of each step against the time a step of the same shape took while the machine was
  quiet (learned at the full count). Steps running ``slow_ratio`` times slower than expected
  for two periods make it *probe* one thread fewer even when the load reading saw nothing
  (load from outside what /proc/stat shows); under a moderate load it probes one thread more
  from time to time. A probe lasts one period, is kept only when its steps were at least
  ``gain`` faster on the same shapes, and a failed probe doubles the wait before the next one
  (no flapping).

It is pure: a clock and a load reader are injected, so tests script both. On an idle machine
its cost is one clock read and a list append per step, and one /proc read per period.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from edgelm.engines.runner_protocol import RUNNER_ENV

ThreadSetting = int | Literal["auto"]


@dataclass(frozen=True)
class LoadReading:
    """CPU seconds other processes used since the previous reading, over ``wall`` seconds."""

    foreign_cpu_s: float
    wall_s: float

    @property
    def foreign_cores(self) -> float:
        return max(0.0, self.foreign_cpu_s / self.wall_s) if self.wall_s > 0 else 0.0


class LoadReader(Protocol):
    def __call__(self) -> LoadReading: ...


class CpuLoadProbe:
    """Reads other processes' CPU use from /proc through psutil (~0.1 ms a reading).

    Busy time counts steal: a hypervisor taking cores from us is foreign load too. This
    process's time (all its threads, spinning included) is ours, and so is the parent's when
    the parent is the edgelm service that started this process as a model runner: its HTTP
    work is not load from elsewhere.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        import psutil

        self._psutil = psutil
        self._clock = clock
        self._own = [psutil.Process()]
        parent = _edgelm_parent(psutil)
        if parent is not None:
            self._own.append(parent)
        self._last = self._totals()

    def _totals(self) -> tuple[float, float, float]:
        t = self._psutil.cpu_times()
        busy = t.user + t.nice + t.system
        busy += getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
        own = 0.0
        for process in list(self._own):
            try:
                times = process.cpu_times()
            except self._psutil.Error:  # the parent went away
                self._own.remove(process)
                continue
            own += times.user + times.system
        return self._clock(), busy, own

    def __call__(self) -> LoadReading:
        now, busy, own = self._totals()
        then, busy0, own0 = self._last
        self._last = (now, busy, own)
        return LoadReading(foreign_cpu_s=(busy - busy0) - (own - own0), wall_s=now - then)


def _edgelm_parent(psutil: object) -> object | None:
    """The parent process when it is the edgelm service that started us as its model runner
    (it marks runners with ``EDGELM_RUNNER``), else None: a shell's or an IDE's CPU time is
    somebody else's load."""
    if os.environ.get(RUNNER_ENV) != "1":
        return None
    try:
        return psutil.Process().parent()  # type: ignore[attr-defined]
    except Exception:  # no permission, or it already left
        return None


def logical_cores() -> int:
    """CPUs this process may run on (what other processes' load is measured against)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bucket(rows: int) -> int:
    """Step shapes by batch rows, in powers of two (1, 2, 4, 8 ... 512)."""
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class _Probe:
    previous: int
    reference: dict[int, float]


@dataclass
class ThreadController:
    """Decides the thread count between steps (see the module docstring).

    ``max_threads``: the count on a quiet machine (the physical cores). ``cores``: the CPUs
    load is measured against. Call :meth:`observe` after each step; read :attr:`threads`.
    """

    max_threads: int
    cores: int
    load: LoadReader
    clock: Callable[[], float] = time.monotonic
    period: float = 0.5
    busy: float = 0.35
    """Other processes' cores above which a thread is given up (per whole core taken)."""
    quiet: float = 0.15
    """Other processes' cores below which the machine counts as quiet."""
    hold: float = 1.5
    """Quiet seconds before the full count returns."""
    slow_ratio: float = 2.0
    gain: float = 0.1
    backoff_start: float = 4.0
    backoff_max: float = 32.0
    threads: int = 0
    reason: str = "idle machine: all cores"
    foreign_cores: float = 0.0
    changes: int = 0
    _window: list[tuple[int, float]] = field(default_factory=list)
    _window_start: float | None = None
    _last_step: float = 0.0
    _expected: dict[int, float] = field(default_factory=dict)
    _quiet_since: float | None = None
    _slow_periods: int = 0
    _probe: _Probe | None = None
    _proven: float | None = None  # others' load under which a probe proved the count faster
    _backoff: float = 0.0
    _last_change: float = 0.0

    def __post_init__(self) -> None:
        self.max_threads = max(1, self.max_threads)
        self.threads = self.threads or self.max_threads
        self._backoff = self.backoff_start

    def observe(self, rows: int, seconds: float) -> bool:
        """Record one step (``rows`` batch rows took ``seconds``); once a period has passed,
        decide. Return whether :attr:`threads` changed."""
        now = self.clock()
        # The pause is the gap between the previous step's end and this step's start: a
        # step that itself ran long (every core taken, the barrier collapsed) is work.
        if self._window_start is None or now - seconds - self._last_step > 2 * self.period:
            # The first step after a pause: what the machine did while we were idle says
            # little about now, so the next reading covers this burst only.
            self.load()
            self._window, self._window_start = [], now
        self._last_step = now
        self._window.append((rows, seconds))
        if now - self._window_start < self.period:
            return False
        window, self._window, self._window_start = self._window, [], now
        before = self.threads
        self._decide(now, _medians(window), self.load())
        if self.threads != before:
            self.changes += 1
            self._last_change = now
            return True
        return False

    def _decide(self, now: float, medians: dict[int, float], reading: LoadReading) -> None:
        f = self.foreign_cores = reading.foreign_cores
        quiet = f < self.quiet
        if quiet:
            self._quiet_since = self._quiet_since if self._quiet_since is not None else now
        else:
            self._quiet_since = None
        if self._probe is not None:
            self._end_probe(now, medians)
            return
        ratio = self._slowdown(medians)
        if quiet and self.threads == self.max_threads and ratio < self.slow_ratio:
            self._learn(medians)
        # 1. Others took cores: give ours up at once (unless a probe showed this count is
        # faster under about this load).
        fit = max(1, min(self.max_threads, int(self.cores - f + self.busy)))
        if fit < self.threads and (self._proven is None or f >= self._proven + self.busy):
            self._set(fit, f"other processes use {f:.1f} of {self.cores} cores")
            if self._proven is not None:  # what a probe proved did not hold: probe less often
                self._backoff = min(self.backoff_max, self._backoff * 2)
            self._proven = None
            return
        # 2. Quiet long enough: the full count again (unless the count was lowered for slow
        # steps under a load the reading does not show: rule 4 probes back up then).
        hidden = self._proven is not None and self._proven < self.quiet
        if (
            self.threads < self.max_threads
            and quiet
            and not hidden
            and now - self._quiet_since >= self.hold
        ):
            self._set(self.max_threads, "machine quiet again: all cores")
            self._backoff = self.backoff_start
            self._proven = None
            return
        # 3. Steps far slower than expected (learned at the full count) though no load
        # shows: try one thread fewer.
        self._slow_periods = self._slow_periods + 1 if ratio >= self.slow_ratio else 0
        waited = now - self._last_change >= self._backoff
        full = self.threads == self.max_threads > 1
        if self._slow_periods >= 2 and full and waited:
            self._start_probe(self.threads - 1, medians, f"steps {ratio:.1f}x slower than idle")
            return
        # 4. Moderate (or hidden) load and room for one more thread: try it now and then.
        if (
            self.threads < self.max_threads
            and (hidden or (not quiet and self.cores - f >= self.threads + 0.5))
            and waited
            and medians
        ):
            self._start_probe(self.threads + 1, medians, f"others use {f:.1f} cores")

    def _learn(self, medians: dict[int, float]) -> None:
        """Expected step times: quick to follow a faster step, slow to accept a slower one
        (longer contexts make steps slower; a load burst must not become the norm)."""
        for shape, t in medians.items():
            old = self._expected.get(shape)
            if old is None:
                self._expected[shape] = t
            else:
                self._expected[shape] = 0.5 * (old + t) if t < old else 0.95 * old + 0.05 * t

    def _slowdown(self, medians: dict[int, float]) -> float:
        ratios = [t / self._expected[s] for s, t in medians.items() if self._expected.get(s)]
        return statistics.median(ratios) if ratios else 1.0

    def _start_probe(self, threads: int, medians: dict[int, float], why: str) -> None:
        self._probe = _Probe(previous=self.threads, reference=medians)
        self._set(threads, f"probing {threads} threads ({why})")

    def _end_probe(self, now: float, medians: dict[int, float]) -> None:
        probe, self._probe = self._probe, None
        assert probe is not None
        common = [medians[s] / probe.reference[s] for s in medians if s in probe.reference]
        tried = self.threads
        if common and statistics.median(common) <= 1 - self.gain:
            self._set(tried, f"{tried} threads measured faster than {probe.previous}")
            self._proven = self.foreign_cores
            self._slow_periods = 0
        else:
            self._set(probe.previous, f"kept {probe.previous}: {tried} threads were not faster")
            self._backoff = min(self.backoff_max, self._backoff * 2)
            self._last_change = now

    def _set(self, threads: int, reason: str) -> None:
        self.threads = threads
        self.reason = reason

    def info(self) -> dict[str, object]:
        """The choice and why, for live_info (status, metrics)."""
        return {
            "threads": self.threads,
            "threads_max": self.max_threads,
            "threads_mode": "auto",
            "threads_reason": self.reason,
            "foreign_cores": round(self.foreign_cores, 2),
            "thread_changes": self.changes,
        }


def _medians(window: list[tuple[int, float]]) -> dict[int, float]:
    shapes: dict[int, list[float]] = {}
    for rows, seconds in window:
        shapes.setdefault(_bucket(rows), []).append(seconds)
    return {shape: statistics.median(times) for shape, times in shapes.items()}
