"""bench and compare once against the real tiny model (figures printed, never asserted on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import TINY, models_dir


def edgelm(*args: str, home: Path, extra_env: dict[str, str] | None = None):
    env = {
        **os.environ,
        "EDGELM_HOME": str(home),
        "EDGELM_MODELS__DIR": str(models_dir()),
        "EDGELM_COMPUTE__N_CTX": "2048",
        "COLUMNS": "200",
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_bench_service_and_engine_on_tiny_model(live_service: str, tmp_path: Path) -> None:
    result = edgelm(
        "bench",
        "run",
        "-m",
        f"service:{TINY},local:{TINY}",
        "-n",
        "3",
        "-c",
        "1,2",
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--micro",
        "--out",
        str(tmp_path / "out"),
        home=tmp_path,
        extra_env={"EDGELM_ENDPOINT": live_service},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    print(result.stdout)
    rows = json.loads(result.stdout.split("[BENCHMARK RESULTS]", 1)[1].split("\nrun ", 1)[0])
    assert {r["target"] for r in rows} == {TINY, f"local:{TINY}"}
    run = json.loads((tmp_path / "out" / "results.json").read_text())
    for scenario in run["scenarios"]:
        ok = [r for r in scenario["requests"] if r["ok"]]
        assert len(ok) == 3
        # --ignore-eos: every answer, over HTTP or in-process, ran to max_tokens
        assert all(r["ttft_s"] and r["completion_tokens"] == 32 for r in ok)
        assert scenario["resources"]["peak_rss_bytes"]
    assert {m["test"] for m in run["micro"]} == {"pp512", "tg128"}
    tg = next(m for m in run["micro"] if m["test"] == "tg128")
    assert tg["memory_gb_per_s"] > 0 and tg["weights_gb_per_s"] > 0
    assert tg["bandwidth_share"] == pytest.approx(
        tg["weights_gb_per_s"] / tg["memory_gb_per_s"], rel=0.05
    )
    assert "service vs raw engine" in result.stdout
    assert "TTFT p50 over in-process" in result.stdout


def test_compare_on_tiny_model(live_service: str, tmp_path: Path) -> None:
    result = edgelm(
        "compare",
        "--slm",
        TINY,
        "--llm",
        TINY,
        "-n",
        "2",
        "--max-tokens",
        "24",
        "--prompt",
        "Name a fruit.",
        home=tmp_path,
        extra_env={"EDGELM_ENDPOINT": live_service},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    print(result.stdout)
    rows = json.loads(result.stdout.split("[COMPARISON RESULTS]", 1)[1])
    assert len(rows) == 2 and all(r["answer"] for r in rows)
    assert all(r["kind"] == "service" and r["warm_e2e_s"] > 0 for r in rows)
