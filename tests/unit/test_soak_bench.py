"""``edgelm bench soak``: a short soak against a service on the fake engine (samples every
second), the verdict's arithmetic, and memory summed over a process and its children."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from typer.testing import CliRunner

from edgelm.bench.resources import process_tree
from edgelm.bench.soak import SoakRun, SoakSample, verdict
from edgelm.cli.main import app
from edgelm.server.app import create_app


def test_soak_against_a_service(settings, catalog, serve_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = serve_app(create_app(settings, catalog=catalog))
    out = tmp_path / "soak"
    result = CliRunner().invoke(
        app,
        ["bench", "soak", "-m", "service:fake-slow", "--duration", "2.5s", "--interval", "1",
         "-c", "3", "--max-tokens", "8", "--out", str(out)],
        env={"EDGELM_ENDPOINT": base, "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "soak verdict: PASS" in result.output and "rss_growth" in result.output
    run = SoakRun.model_validate(json.loads((out / "soak.json").read_text()))
    assert run.pid == os.getpid()  # the service runs in this test's process
    assert len(run.samples) == 3  # 1 s, 2 s and the last half second
    for sample in run.samples:
        assert sample.requests > 0 and sample.errors == 0
        assert sample.ttft_p99_s is not None and sample.ttft_p99_s >= sample.ttft_p50_s
        assert sample.rss_bytes and sample.fds and sample.threads
        assert sample.tokens_per_s and sample.tokens_per_s > 0
    assert run.verdict["pass"] and run.verdict["checks"]["errors"]["value"] == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Verdict: PASS" in html


def sample(index: int, rss: int, ttft: float, errors: int = 0, fds: int = 10) -> SoakSample:
    return SoakSample(
        index=index, t_s=60.0 * (index + 1), requests=20, errors=errors,
        ttft_s=[ttft] * 20, ttft_p50_s=ttft, ttft_p99_s=ttft, rss_bytes=rss, fds=fds, threads=8,
    )  # fmt: skip


def soak_of(samples: list[SoakSample]) -> SoakRun:
    return SoakRun(
        target="m", model="m", concurrency=2, duration_s=360, interval_s=60,
        warmup_intervals=1, max_tokens=8, samples=samples,
    )  # fmt: skip


def test_verdict_leaves_out_the_warm_up_and_flags_each_target() -> None:
    # Warm-up from 500 to 1000 MB, then flat: passes.
    steady = soak_of([sample(0, 500_000_000, 0.3)] + [sample(i, 1_000_000_000, 0.3) for i in range(1, 7)])
    assert verdict(steady)["pass"]
    assert verdict(steady)["checks"]["rss_growth"]["value"] == 0
    # 10% growth after the warm-up, TTFT p99 doubling, an error, leaking descriptors.
    leaking = soak_of(
        [sample(0, 500_000_000, 0.3)]
        + [sample(i, 1_000_000_000 + i * 20_000_000, 0.3 * (1 + (i > 4)), fds=10 + 5 * i) for i in range(1, 7)]
    )
    leaking.samples[3].errors = 1
    checks = verdict(leaking)["checks"]
    assert not verdict(leaking)["pass"]
    assert checks["rss_growth"]["pass"] is False and checks["rss_growth"]["value"] > 0.05
    assert checks["ttft_p99_drift"]["pass"] is False and checks["ttft_p99_drift"]["value"] == 2.0
    assert checks["errors"]["pass"] is False
    assert checks["fds_growth"]["pass"] is False
    # Sub-millisecond TTFTs that double are noise, not drift.
    tiny = soak_of([sample(i, 10**9, 0.0004 * (1 + (i > 4))) for i in range(7)])
    assert verdict(tiny)["checks"]["ttft_p99_drift"]["pass"]


def test_process_tree_sums_the_children() -> None:
    hold = "b = bytearray(80 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", hold])
    try:
        deadline = time.monotonic() + 20
        while psutil.Process(child.pid).memory_info().rss < 80e6 and time.monotonic() < deadline:
            time.sleep(0.05)
        own = psutil.Process().memory_info().rss
        figures = process_tree(os.getpid())
        assert figures["processes"] >= 2
        assert figures["rss_bytes"] - own >= 80e6
        assert figures["threads"] >= 2 and figures["fds"] > 0
    finally:
        child.kill()
        child.wait()
