"""Busy processes kept running during a benchmark (``bench run --background-load N``).

Edge machines are rarely idle: a browser, an IDE, a build take cores. llama.cpp's threads wait
for each other at every operation, so a server whose threads match the cores collapses when
one core is taken (2-3 tok/s instead of 27 on 2 cores). N processes spinning in pure Python,
each keeping one core busy, reproduce that for any target, edgelm or another HTTP server.

Each spinner checks every ~20 ms that its parent is still the bench and exits otherwise, so a
bench killed outright leaves none behind; :func:`background_load` stops them when the
measurement ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# One core's worth of pure-Python work; the parent check costs one syscall every ~20 ms.
# The parent's pid comes as an argument: read in the child, it could already be init's.
SPINNER = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(300_000):
        pass
"""


def start_spinners(n: int) -> list[subprocess.Popen[bytes]]:
    """Start ``n`` processes that each keep a core busy until stopped (or the bench exits)."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", SPINNER, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]


def stop_spinners(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate them and wait, killing any that does not go within 5 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def background_load(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` busy processes for the duration of the block (none for 0)."""
    processes = start_spinners(n) if n > 0 else []
    try:
        yield processes
    finally:
        stop_spinners(processes)


def describe(n: int) -> str:
    """What the report says about the load (empty when there was none)."""
    if n <= 0:
        return ""
    return f"{n} busy background process{'es' if n != 1 else ''} (one core each) during the measurement"
