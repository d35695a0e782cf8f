"""Run a model's code answer against a task's unit tests, in a limited subprocess: pass@1.

The code comes from a language model, so it runs in a separate, isolated interpreter
(``python -I``: no user site, no ``PYTHON*`` variables, no cwd on ``sys.path``), in a fresh
temporary directory that is removed afterwards, with stdin closed, a near-empty environment,
its own process group (so a timeout kills every child), and POSIX resource limits set before
``exec``: CPU seconds, address space, file size and no core dumps. A wall-clock timeout catches
what the CPU limit cannot (sleeping, blocking).

This is a guard against accidents (infinite loops, memory hogs, stray files in the working
directory), not a security boundary: the process still runs as the user and could read files
or open sockets. Run untrusted sets in a container. Without the ``resource`` module (Windows)
only the wall timeout applies.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "error", "timeout", "memory"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Exit codes of the driver below, so the parent can tell a failed assert from a crash.
_EXIT_FAILED = 2
_EXIT_ERROR = 3
_EXIT_MEMORY = 4

_DRIVER = (
    """\
import os, sys, traceback
def _run(name):
    with open(name, encoding="utf-8") as f:
        exec(compile(f.read(), name, "exec"), namespace)
namespace = {"__name__": "solution", "__builtins__": __builtins__}
for stage, name in (("solution", "solution.py"), ("tests", "tests.py")):
    try:
        _run(name)
    except MemoryError:
        os._exit(@MEMORY@)
    except AssertionError:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(@FAILED@ if stage == "tests" else @ERROR@)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(@ERROR@)
""".replace("@MEMORY@", str(_EXIT_MEMORY))
    .replace("@FAILED@", str(_EXIT_FAILED))
    .replace("@ERROR@", str(_EXIT_ERROR))
)


@dataclass
class ExecResult:
    """How one answer fared against its tests; ``output`` is the tail of stdout+stderr."""

    status: Status
    output: str = ""
    duration_s: float = 0.0
    code: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The Python code in an answer.

    Fenced blocks labelled ``python``/``py`` (or unlabelled) are candidates; the first one that
    defines ``entry_point`` wins, else all candidates joined (a model may split helper and
    function). An unterminated fence (the answer hit max_tokens) still counts. Without fences
    the whole text is taken as code.
    """
    blocks = [
        body
        for lang, body in _FENCE.findall(answer)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    if not blocks:
        return answer.strip() + "\n"
    if entry_point:
        pattern = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for body in blocks:
            if pattern.search(body):
                return body.strip() + "\n"
    return "\n\n".join(b.strip() for b in blocks) + "\n"


def _limits(cpu_s: int, memory_bytes: int, file_bytes: int) -> None:
    """Runs in the child between fork and exec: cap what the answer's code can use."""
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_tests(
    code: str,
    tests: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    file_mb: int = 16,
) -> ExecResult:
    """Execute ``code`` then ``tests`` (plain asserts) in a limited interpreter.

    ``passed`` when every assert holds; ``failed`` on an AssertionError from the tests;
    ``error`` on any other exception (syntax error, missing function); ``timeout`` on the wall
    or CPU limit; ``memory`` when the address-space limit was hit. The memory limit includes the
    interpreter itself (~30 MB), so keep it well above that.
    """
    cpu = cpu_s if cpu_s is not None else max(1, int(timeout_s))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgelm-code-") as tmp:
        work = Path(tmp)
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        (work / "driver.py").write_text(_DRIVER, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LANG": "C.UTF-8"}
        preexec = None
        if sys.platform != "win32":
            memory = memory_mb * 1024 * 1024
            files = file_mb * 1024 * 1024

            def preexec() -> None:
                _limits(cpu, memory, files)

        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "driver.py"],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            return ExecResult("timeout", _tail(out), time.perf_counter() - start, code)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on an unexpected exception
                _kill_group(proc)
                proc.wait()
    duration = time.perf_counter() - start
    return ExecResult(_status(proc.returncode, out), _tail(out), duration, code)


def _status(returncode: int, out: bytes) -> Status:
    if returncode == 0:
        return "passed"
    if returncode == _EXIT_FAILED:
        return "failed"
    if returncode == _EXIT_MEMORY or b"MemoryError" in out:
        return "memory"
    if sys.platform != "win32" and returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    return "error"


def _tail(out: bytes, limit: int = 2000) -> str:
    text = out.decode("utf-8", "replace")
    return text[-limit:]


def score_answer(
    answer: str,
    tests: str,
    entry_point: str | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
) -> ExecResult:
    """Extract the code from a model's answer and run the task's tests on it."""
    return run_tests(extract_code(answer, entry_point), tests, timeout_s, memory_mb)
