"""Code answers are extracted and run against tests in a limited subprocess."""

from __future__ import annotations

import sys
import time

import pytest

from edgelm.evals.code_exec import extract_code, run_tests, score_answer

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_extract_code_from_fences_and_plain_text() -> None:
    answer = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```\nHope it helps."
    assert extract_code(answer) == "def add(a, b):\n    return a + b\n"
    two = "```bash\npip install x\n```\n```py\nimport math\n```\n```python\ndef add(a, b): return a+b\n```"
    assert extract_code(two, "add") == "def add(a, b): return a+b\n"
    assert extract_code(two) == "import math\n\ndef add(a, b): return a+b\n"
    cut = "```python\ndef add(a, b):\n    return a + b"  # hit max_tokens, no closing fence
    assert extract_code(cut, "add").startswith("def add")
    assert extract_code("def add(a, b): return a + b") == "def add(a, b): return a + b\n"


def test_passing_and_failing_code() -> None:
    ok = score_answer("```python\ndef add(a, b):\n    return a + b\n```", TESTS, "add")
    assert ok.passed and ok.status == "passed"
    wrong = run_tests("def add(a, b):\n    return a - b\n", TESTS)
    assert wrong.status == "failed" and "AssertionError" in wrong.output
    broken = run_tests("def add(a, b) return a\n", TESTS)
    assert broken.status == "error" and "SyntaxError" in broken.output
    missing = run_tests("x = 1\n", TESTS)
    assert missing.status == "error" and "NameError" in missing.output


def test_example_usage_under_main_guard_does_not_run() -> None:
    code = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    input()\n"
    assert run_tests(code, TESTS).passed


def test_runs_isolated_in_a_temp_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = "import os\nopen('stray.txt', 'w').write('x')\nCWD = os.getcwd()\n"
    result = run_tests(code, f"assert CWD != {str(tmp_path)!r}\n")
    assert result.passed
    assert not (tmp_path / "stray.txt").exists()


def test_infinite_loop_hits_the_timeout() -> None:
    start = time.perf_counter()
    result = run_tests("while True:\n    pass\n", "", timeout_s=1.0)
    assert result.status == "timeout"
    assert time.perf_counter() - start < 5


def test_sleeping_code_hits_the_wall_timeout() -> None:
    result = run_tests("import time\ntime.sleep(30)\n", "", timeout_s=0.5)
    assert result.status == "timeout"


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX resource limits")
def test_memory_hog_hits_the_limit() -> None:
    result = run_tests("x = bytearray(2 * 1024**3)\n", "", memory_mb=200)
    assert result.status == "memory"
    grow = run_tests("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", "", memory_mb=100)
    assert grow.status == "memory"
