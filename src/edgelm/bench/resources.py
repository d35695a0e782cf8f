"""Sampling what the serving process uses while a scenario runs: RSS, CPU, GPU, energy.

RSS is the serving process's and its children's (model runners), summed; CPU is the serving
process's own.

A background thread samples every ``interval_s``; peaks and means go into the scenario. GPU
figures come from NVML and energy from RAPL only where the machine exposes them, and are left
empty (not zero) elsewhere, so a report never shows a made-up figure.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from types import TracebackType

import psutil

from edgelm.bench.results import ResourceSample

RAPL_FILE = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
RAPL_RANGE = Path("/sys/class/powercap/intel-rapl:0/max_energy_range_uj")


def process_tree(pid: int) -> dict[str, int]:
    """RSS, open file descriptors and threads of a process and all its children, summed.

    A service that runs each model's engine in a child process holds the model's memory
    there; the process alone would read as a few hundred MB whatever the model. A child that
    exits while it is read is skipped. ``fds`` is 0 where the platform does not count them.
    """
    root = psutil.Process(pid)
    figures = {"rss_bytes": 0, "fds": 0, "threads": 0, "processes": 0}
    for proc in [root, *root.children(recursive=True)]:
        try:
            with proc.oneshot():
                figures["rss_bytes"] += proc.memory_info().rss
                figures["threads"] += proc.num_threads()
                figures["fds"] += proc.num_fds() if hasattr(proc, "num_fds") else 0
            figures["processes"] += 1
        except psutil.Error:
            if proc is root:
                raise
    return figures


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class ResourceSampler:
    """Context manager: ``with ResourceSampler(pid) as sampler: ...; sampler.result``."""

    def __init__(self, pid: int | None, interval_s: float = 0.1):
        self.pid = pid
        self.interval_s = interval_s
        self.result = ResourceSample()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rss: list[int] = []
        self._cpu: list[float] = []
        self._gpu_mem: list[int] = []
        self._gpu_util: list[float] = []
        self._energy_start: int | None = None
        self._active = threading.Event()  # samples count only while set (see pause)
        self._active.set()
        self._paused = False

    def __enter__(self) -> ResourceSampler:
        self._energy_start = _read_int(RAPL_FILE)
        if self.pid is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="edgelm-sampler")
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.result = self._summary()

    def pause(self) -> None:
        """Stop counting samples until :meth:`resume`: in an interleaved run, each target's
        sampler counts only while that target serves. Energy is then left out, as the counter
        cannot be split between targets."""
        self._active.clear()
        self._paused = True

    def resume(self) -> None:
        self._active.set()

    def _run(self) -> None:
        try:
            tree = ProcessTree(self.pid)
        except psutil.Error:
            return
        nvml = _Nvml.open()
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    rss, cpu = tree.sample()
                except psutil.Error:
                    return
                if not self._active.is_set():
                    continue
                self._rss.append(rss)
                self._cpu.append(cpu)
                if nvml is not None:
                    mem, util = nvml.sample()
                    self._gpu_mem.append(mem)
                    self._gpu_util.append(util)
            with contextlib.suppress(psutil.Error):  # one last sample at the end
                self._rss.append(tree.sample()[0])
        finally:
            if nvml is not None:
                nvml.close()

    def _summary(self) -> ResourceSample:
        sample = ResourceSample()
        if self._rss:
            sample.peak_rss_bytes = max(self._rss)
        if self._cpu:
            sample.mean_cpu_percent = round(sum(self._cpu) / len(self._cpu), 1)
            sample.peak_cpu_percent = round(max(self._cpu), 1)
        if self._gpu_mem:
            sample.gpu_peak_memory_bytes = max(self._gpu_mem)
            sample.gpu_mean_util_percent = round(sum(self._gpu_util) / len(self._gpu_util), 1)
        end = _read_int(RAPL_FILE)
        if self._energy_start is not None and end is not None and not self._paused:
            delta = end - self._energy_start
            if delta < 0:  # the counter wrapped around
                delta += _read_int(RAPL_RANGE) or 0
            sample.energy_joules = round(delta / 1e6, 3)
            sample.energy_source = "rapl"
        return sample


class ProcessTree:
    """A process and its children, sampled together: a service runs each loaded model in a
    runner process of its own (setting ``compute.isolation``), so its memory and CPU are the
    sum over the tree (the service alone would look tiny)."""

    def __init__(self, pid: int | None):
        self.root = psutil.Process(pid)
        self._known: dict[int, psutil.Process] = {}
        self.root.cpu_percent(None)  # the first call only primes the counter

    def sample(self) -> tuple[int, float]:
        """Resident bytes and CPU percent of the process and all its descendants now; a
        child seen for the first time counts its memory (its CPU from the next sample)."""
        rss = self.root.memory_info().rss
        cpu = self.root.cpu_percent(None)
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            children = []
        alive: dict[int, psutil.Process] = {}
        for child in children:
            known = self._known.get(child.pid)
            try:
                if known is None:
                    child.cpu_percent(None)
                    known = child
                else:
                    cpu += known.cpu_percent(None)
                rss += known.memory_info().rss
            except psutil.Error:  # it ended between the listing and the reading
                continue
            alive[child.pid] = known
        self._known = alive
        return rss, cpu


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of a process (default: this one) and all its descendants."""
    return process_tree(psutil.Process(pid).pid)["rss_bytes"]


class _Nvml:
    """GPU 0 memory and utilisation through NVML, when a driver and pynvml are present."""

    def __init__(self, lib: object, handle: object):
        self.lib = lib
        self.handle = handle

    @classmethod
    def open(cls) -> _Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() == 0:
                pynvml.nvmlShutdown()
                return None
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception:  # no library, no driver or no device: no GPU figures
            return None

    def sample(self) -> tuple[int, float]:
        lib = self.lib
        mem = lib.nvmlDeviceGetMemoryInfo(self.handle).used  # type: ignore[attr-defined]
        util = lib.nvmlDeviceGetUtilizationRates(self.handle).gpu  # type: ignore[attr-defined]
        return int(mem), float(util)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.lib.nvmlShutdown()  # type: ignore[attr-defined]
