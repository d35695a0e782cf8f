"""The README's quick start, run as written (only the port is moved to a free one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import models_dir
from tests.service_process import free_port

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def quick_start_blocks() -> dict[str, list[str]]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {"bash": [], "python": []}
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", section, re.S):
        blocks[lang].append(body)
    return blocks


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("readme-home")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    environ = {
        **os.environ,
        "EDGELM_HOME": str(home),
        "EDGELM_MODELS__DIR": str(models_dir()),
        "EDGELM_SERVICE__PORT": str(port),
        "EDGELM_COMPUTE__N_CTX": "2048",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "200",
    }
    environ["PORT"] = str(port)
    yield environ
    subprocess.run(["edgelm", "service", "stop"], env=environ, timeout=60, check=False)


def sh(command: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = command.replace("5273", env["PORT"])
    return subprocess.run(
        ["bash", "-c", command],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_quick_start_commands(env: dict[str, str]) -> None:
    bash = quick_start_blocks()["bash"]
    assert len(bash) >= 2
    commands = [
        line.split("#")[0].strip()
        for line in bash[0].splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert commands[0] == "edgelm model list"
    for command in commands:
        # the interactive chat reads stdin: give it one turn and /exit
        result = sh(command, env, stdin="Say hi.\n/exit\n")
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if command.startswith("edgelm model run") and "--prompt" in command:
            assert "TTFT" in result.stdout and "tok/s" in result.stdout
        if command == "edgelm service status":
            assert "qwen2.5-0.5b" in result.stdout
    curl = sh(bash[1].replace("\\\n", " "), env)
    assert curl.returncode == 0 and '"chat.completion"' in curl.stdout, curl.stderr


def test_quick_start_python(env: dict[str, str], tmp_path: Path) -> None:
    for i, code in enumerate(quick_start_blocks()["python"]):
        script = tmp_path / f"snippet{i}.py"
        script.write_text(code.replace("5273", env["PORT"]))
        result = subprocess.run(
            [sys.executable, str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), f"snippet {i} printed nothing"
