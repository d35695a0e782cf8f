"""`edgelm bench context` on the real tiny model, in-process (figures printed, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import TINY
from tests.integration.test_bench_real import edgelm


def test_context_scaling_report_on_the_tiny_model(tiny_model_path: Path, tmp_path: Path) -> None:
    result = edgelm(
        "bench", "context", "-m", f"local:{TINY}", "--lengths", "64,256", "-n", "2",
        "--max-tokens", "8", "--out", str(tmp_path / "out"), home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    print(result.stdout)
    block = result.stdout.split("[CONTEXT SCALING]", 1)[1].split("\nrun ", 1)[0]
    rows = json.loads(block)
    assert [r["length"] for r in rows] == [64, 256]
    for row in rows:
        assert row["ok"] == row["total"] == 2, row["errors"]
        # Calibrated on the model's own token counts: within a few tokens of the length asked.
        assert abs(row["prompt_tokens"] - row["length"]) <= max(8, row["length"] * 0.1)
        assert row["ttft_s"] > 0 and row["prefill_tps"] > 0 and row["decode_tps"] > 0
    assert rows[1]["ttft_s"] > rows[0]["ttft_s"]  # four times the prompt takes longer to read
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Context scaling" in html and "data:image/png;base64," in html
    run = json.loads((tmp_path / "out" / "results.json").read_text())
    assert run["config"]["scenario"] == "context"
    prompts = [r["prompt_id"] for s in run["scenarios"] for r in s["requests"]]
    assert prompts == ["ctx64-0", "ctx64-1", "ctx256-0", "ctx256-1"]
