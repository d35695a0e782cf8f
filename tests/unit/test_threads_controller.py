"""The adaptive thread controller's decisions from scripted step times and load readings.

A fake clock and a scripted load reader stand in for the machine: each test feeds steps the
way the batch scheduler does (one observe() per llama_decode) and checks what it chose.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from edgelm.engines.threads import CpuLoadProbe, LoadReading, ThreadController

STEP = 0.04  # a decode step on an idle machine, seconds


class Machine:
    """A fake clock plus other processes' load (cores busy) and a step-time model."""

    def __init__(self) -> None:
        self.now = 0.0
        self.foreign = 0.0  # cores other processes keep busy
        self.foreign_cpu = 0.0  # their CPU seconds so far
        self.last_read = (0.0, 0.0)
        self.reads = 0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.foreign_cpu += self.foreign * seconds

    def clock(self) -> float:
        return self.now

    def load(self) -> LoadReading:
        self.reads += 1
        then, cpu = self.last_read
        self.last_read = (self.now, self.foreign_cpu)
        return LoadReading(foreign_cpu_s=self.foreign_cpu - cpu, wall_s=self.now - then)


def run(
    controller: ThreadController,
    machine: Machine,
    seconds: float,
    step_time: Callable[[int], float] = lambda threads: STEP,
    rows: int = 1,
) -> list[int]:
    """Decode steps for ``seconds`` of fake time; the thread count after each step."""
    seen = []
    end = machine.now + seconds
    while machine.now < end:
        t = step_time(controller.threads)
        machine.advance(t)
        controller.observe(rows, t)
        seen.append(controller.threads)
    return seen


def contended(threads: int) -> float:
    """Step time with one of two cores taken: the spinning barrier collapses 2 threads."""
    return {1: STEP * 1.7, 2: STEP * 12}[threads]


def make(machine: Machine, **kw: object) -> ThreadController:
    return ThreadController(
        max_threads=2, cores=2, load=machine.load, clock=machine.clock, **kw  # type: ignore[arg-type]
    )


def changes(seen: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(seen) if a != b)


def test_idle_machine_keeps_all_threads_and_reads_load_only_once_a_period() -> None:
    machine = Machine()
    controller = make(machine)
    seen = run(controller, machine, 30.0, lambda n: STEP * (1 + 0.2 * (len(str(n)) % 2)))
    assert set(seen) == {2}
    assert controller.changes == 0
    # ~750 steps, one /proc reading every half second, not one per step
    assert len(seen) > 500 and machine.reads <= 61
    assert controller.info()["threads_reason"] == "idle machine: all cores"


def test_drops_to_the_free_core_under_foreign_load_and_recovers_after() -> None:
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 5.0)
    machine.foreign = 1.0  # a busy process takes one of the two cores
    loaded = run(controller, machine, 10.0, contended)
    # within a period (+ one step) it drops, and stays down while the load lasts
    assert loaded[-1] == 1
    first_drop = loaded.index(1)
    assert first_drop * STEP * 12 <= 1.2
    assert set(loaded[first_drop:]) == {1}
    assert "other processes use " in str(controller.info()["threads_reason"])
    machine.foreign = 0.0
    after = run(controller, machine, 5.0)
    assert after[-1] == 2
    # back within hold (1.5 s) + two periods, and not before the machine was quiet for hold
    back = after.index(2)
    assert 1.4 <= back * STEP <= 2.6
    assert set(after[back:]) == {2}
    assert controller.info()["threads_reason"] == "machine quiet again: all cores"


def test_a_short_load_spike_below_the_threshold_changes_nothing() -> None:
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 3.0)
    machine.foreign = 0.25  # light background work (a browser tab)
    seen = run(controller, machine, 10.0)
    assert set(seen) == {2}


def test_no_flapping_while_load_comes_and_goes_faster_than_the_hold() -> None:
    """Load on for 1 s, off for 1 s: the quiet spells are shorter than the hold, so it does
    not come back after each; probes that happen to land in a quiet spell are dropped again
    and then tried less and less often, rather than switching with every load change."""
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 3.0)
    seen: list[int] = []
    for _ in range(10):
        machine.foreign = 1.0
        seen += run(controller, machine, 1.0, contended)
        machine.foreign = 0.0
        seen += run(controller, machine, 1.0, lambda n: STEP * (1.0 if n == 2 else 1.7))
    assert changes(seen) <= 4  # against 20 load changes
    assert 1 in seen[:40]


def test_probing_up_under_moderate_load_keeps_the_faster_count_and_backs_off() -> None:
    """Others use ~0.5 core: 1 thread was chosen, but 2 turn out faster here. The probe finds
    it and keeps it; where 2 are slower, failed probes grow apart (no flapping)."""
    machine = Machine()
    controller = make(machine)
    machine.foreign = 0.5
    seen = run(controller, machine, 20.0, lambda n: STEP * (1.3 if n == 2 else 1.7))
    assert seen[0] == 2 and 1 in seen
    assert seen[-1] == 2
    assert "2 threads measured faster than 1" in str(controller.info()["threads_reason"])

    machine2 = Machine()
    slow_two = make(machine2)
    machine2.foreign = 0.5
    seen2 = run(slow_two, machine2, 120.0, lambda n: STEP * (6 if n == 2 else 1.7))
    assert seen2[-1] == 1
    probes = [i for i, (a, b) in enumerate(itertools.pairwise(seen2)) if a < b]
    # backoff 4, 8, 16, 32, 32 s: at most ~6 probes in two minutes, each lasting one period
    assert 2 <= len(probes) <= 7
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps)


def test_steps_far_slower_than_learned_probe_one_thread_fewer() -> None:
    """Load the /proc reading cannot see (e.g. another VM on the host): steps take 10x the
    time learned while quiet. It tries one thread fewer and keeps it when that is faster."""
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 3.0)  # learns 40 ms a step at 2 threads
    seen = run(controller, machine, 5.0, contended)  # foreign stays 0.0 in the reading
    assert seen[-1] == 1
    assert "1 threads measured faster than 2" in str(controller.info()["threads_reason"])
    # the hidden load goes away: the reading still says quiet, so a probe (after the backoff)
    # finds 2 threads faster again
    after = run(controller, machine, 10.0, lambda n: STEP * (1.0 if n == 2 else 1.7))
    assert after[-1] == 2
    assert set(after[-int(3.0 / STEP) :]) == {2}  # and stays there


def test_slowdown_alone_never_drops_when_fewer_threads_are_not_faster() -> None:
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 3.0)
    seen = run(controller, machine, 60.0, lambda n: STEP * (3 if n == 2 else 6))
    assert seen[-1] == 2
    assert changes(seen) <= 2 * 5  # a handful of one-period probes, backing off


def test_shapes_are_compared_like_for_like() -> None:
    """Expected times are per batch shape: 8-row steps being slower than 1-row ones is not a
    slowdown."""
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 3.0, rows=1)
    seen = run(controller, machine, 3.0, lambda n: STEP * 2.5, rows=8)
    seen += run(controller, machine, 3.0, lambda n: STEP, rows=1)
    assert set(seen) == {2}


def test_four_core_machine_gives_up_as_many_threads_as_cores_taken() -> None:
    machine = Machine()
    controller = ThreadController(max_threads=4, cores=4, load=machine.load, clock=machine.clock)
    run(controller, machine, 2.0)
    machine.foreign = 2.0
    seen = run(controller, machine, 3.0, lambda n: STEP * 3)
    assert seen[-1] == 2


def test_the_cpu_probe_reads_real_counters() -> None:
    probe = CpuLoadProbe()
    reading = probe()
    assert reading.wall_s >= 0
    assert reading.foreign_cores >= 0
    with pytest.raises(TypeError):
        LoadReading()  # type: ignore[call-arg]


def test_a_pause_between_bursts_does_not_count_the_idle_time_load() -> None:
    """Load that ran while no request did (and has stopped) is not held against the next
    burst: the reading restarts with it."""
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 2.0)
    machine.foreign = 1.0
    machine.advance(30.0)  # idle for 30 s while a build ran, which then finished
    machine.foreign = 0.0
    seen = run(controller, machine, 3.0)
    assert set(seen) == {2}


def test_steps_slower_than_two_periods_still_decide() -> None:
    """A collapsed step can last longer than the pause rule's two periods (on a loaded
    machine; the likely cause of a CI run where the count never dropped). A step's own time
    is work, not a pause: the controller must still read the load and give a thread up."""
    machine = Machine()
    controller = make(machine)
    run(controller, machine, 3.0)
    machine.foreign = 1.0
    loaded = run(controller, machine, 10.0, lambda n: {1: 0.3, 2: 1.4}[n])
    assert loaded[-1] == 1, controller.info()
    assert loaded.index(1) <= 2
    assert "other processes use " in str(controller.info()["threads_reason"])


def test_the_service_parent_of_a_model_runner_counts_as_ours() -> None:
    """Under process isolation the model runs in a child of the service, which marks it with
    EDGELM_RUNNER: the service's HTTP work is not foreign load. Any other parent (a shell, an
    IDE) is somebody else."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from edgelm.engines.runner_protocol import RUNNER_ENV

    child = (
        "import psutil; from edgelm.engines.threads import CpuLoadProbe, _edgelm_parent; "
        "print(_edgelm_parent(psutil) is not None, len(CpuLoadProbe()._own))"
    )

    def ask(runner: bool) -> str:
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        env["PATH"] = os.environ.get("PATH", "")
        if runner:
            env[RUNNER_ENV] = "1"
        out = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120
        )
        return out.stdout.strip() or out.stderr

    assert ask(runner=True) == "True 2"
    assert ask(runner=False) == "False 1"
