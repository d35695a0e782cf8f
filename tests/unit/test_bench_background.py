"""``bench run --background-load N``: busy processes run during the measurement only, and the
report says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from edgelm.bench.background import SPINNER, background_load
from edgelm.bench.report import read_json, render_html, results_table
from edgelm.bench.runner import BenchConfig, run_bench
from edgelm.bench.targets import InProcessTarget
from edgelm.bench.workloads import load_prompts
from edgelm.catalog import Catalog, CatalogEntry
from tests.unit.test_cli import run


def spinners() -> list[psutil.Process]:
    """This process's live spinner children."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and SPINNER.strip() in " ".join(
                child.cmdline()
            ):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_spinners_burn_a_core_each_and_are_gone_after() -> None:
    with background_load(2) as processes:
        assert len(processes) == 2 and all(p.poll() is None for p in processes)
        # a child shows its own command line only once it has started (fork, then exec)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(spinners()) < 2:
            time.sleep(0.05)
        assert len(spinners()) == 2
        busy = [psutil.Process(p.pid) for p in processes]
        # each spins (on a shared, oversubscribed machine it may get far less than a core,
        # so wait for CPU time to show rather than for a share of a fixed interval)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(p.cpu_times().user > 0.03 for p in busy):
            time.sleep(0.2)
        assert all(p.cpu_times().user > 0.03 for p in busy)
    assert all(p.poll() is not None for p in processes)
    assert spinners() == []
    with background_load(0) as none:
        assert none == []


def test_spinners_stop_even_when_an_exception_ends_the_block() -> None:
    try:
        with background_load(1) as processes:
            raise RuntimeError("the bench failed")
    except RuntimeError:
        pass
    assert processes[0].poll() is not None


def test_spinners_exit_by_themselves_when_the_bench_dies() -> None:
    """A bench killed outright (no finally) leaves no spinner behind."""
    code = (
        "import os, sys; from edgelm.bench.background import start_spinners; "
        "ps = start_spinners(2); print(' '.join(str(p.pid) for p in ps), flush=True); "
        "os._exit(0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _running(p)]
    assert alive == []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Watching(InProcessTarget):
    """Notes how many spinners run while each request is served."""

    seen: list[int]

    def request(self, prompt, params):  # type: ignore[no-untyped-def]
        self.seen.append(len(spinners()))
        return super().request(prompt, params)


def test_run_bench_keeps_the_load_during_the_measurement_and_records_it(
    settings, isolated_home: Path
) -> None:
    catalog = Catalog([], user_file=isolated_home / "models.toml")
    catalog.add_user_entry(CatalogEntry(alias="timed", engine="fake", options={"reply": "a b"}))
    target = _Watching("timed", settings, catalog)
    target.seen = []
    result = run_bench(
        [target], load_prompts("short"), BenchConfig(requests=3, warmup=1, background_load=2)
    )
    assert target.seen and set(target.seen) == {2}
    assert spinners() == []
    assert result.config["background_load"] == 2
    title = str(results_table(result).title)
    assert "with 2 busy background processes" in title
    assert "2 busy background processes" in render_html(result)


def test_cli_flag_reaches_the_json_report(isolated_home: Path, tmp_path: Path) -> None:
    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(alias="small", engine="fake", options={"reply": "short answer"})
    )
    out = tmp_path / "out"
    result = run(
        "bench", "run", "-m", "local:small", "-n", "2", "--background-load", "1", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    block = json.loads(result.output.split("[BENCHMARK RESULTS]", 1)[1].split("\nrun ", 1)[0])
    assert block[0]["background_load"] == 1
    assert read_json(out / "results.json").config["background_load"] == 1
    assert "1 busy background process " in (out / "report.html").read_text()
    assert spinners() == []
    bad = run("bench", "run", "-m", "local:small", "--background-load", "-1")
    assert bad.exit_code != 0
