"""The progress lines edgelm's conversion steps print, and the peak memory the parent reads
from them.

The steps (``convert_worker.py``, ``convert_build.py``) run as ``python -I <script>`` in the
conversion tool environment, where edgelm is not installed; ``-I`` also keeps their folder off
``sys.path`` (edgelm's own ``types.py`` there would shadow the standard library's). So they load
this file by its path (``runpy.run_path``), and :mod:`edgelm.convert` imports it as a module:
the line format and its parser live in one place. Standard library only.
"""

from __future__ import annotations

import os
import re

REPORTED_PEAK = re.compile(r"^\[edgelm-convert\] .*, peak ([0-9.]+) GB\]$")
"""A progress line's peak (see :func:`say`), read by ``convert.run_logged``."""


def say(message: str) -> None:
    """One progress line for the parent, with this process's memory (the log shows where the
    peak comes from; the step's last line gives the parent its peak)."""
    print(f"[edgelm-convert] {message} [rss {rss_gb()}, peak {peak_gb()}]", flush=True)


def peak_gb() -> str:
    """This process's own high-water mark (VmHWM). Not ``ru_maxrss``: the kernel starts a
    process's maxrss from the memory of the process that started it (it survives exec), so
    a conversion run from a large process (a test suite, the service) reported that one's."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return f"{int(line.split()[1]) * 1024 / 1e9:.2f} GB"
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def rss_gb() -> str:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return f"{pages * os.sysconf('SC_PAGE_SIZE') / 1e9:.2f} GB"
    except (OSError, ValueError, IndexError, AttributeError):
        return "?"
