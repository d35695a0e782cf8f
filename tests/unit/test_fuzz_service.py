"""The quick subset of ``scripts/fuzz.py`` (which runs 10,000+ cases): the same harness's
sequences — schemathesis' stateful workflows and our state machine over load, chat, unload,
RAG answers, embeddings and responses chains — against a service process on the fake engine.
No undocumented 5xx, every refusal an OpenAI-style error body. (Single operations are fuzzed
in-process by ``test_fuzz.py``; schemathesis builds a strategy per operation, which is most of
a small run's time.)"""

from __future__ import annotations

from pathlib import Path

from tests.fuzzing import FAKE_MODELS, FuzzReport, fuzz_sequences, fuzz_workflows, write_fuzz_home
from tests.service_process import spawn_service, stop_service

CASES = 200


def test_fuzz_subset_has_no_server_errors(isolated_home: Path) -> None:
    # A process of its own, as the script does: served from this test's process, the service
    # would share its interpreter lock with hypothesis generating the cases.
    proc, base = spawn_service(isolated_home, env=write_fuzz_home(isolated_home))
    try:
        report = FuzzReport()
        fuzz_workflows(base, report, examples=8)
        while report.cases < CASES:
            fuzz_sequences(base, report, 10, list(FAKE_MODELS), "fake-a")
        alive = proc.poll() is None
    finally:
        stop_service(proc)
    print(report.summary())
    assert alive
    assert report.cases >= CASES
    assert set(report.by_phase) == {"workflows", "sequences"}
    assert report.ok, report.summary()
    # The harness does judge: the broken models' documented failures were seen and allowed.
    assert any(key.startswith("503 model_load_failed") for key in report.documented)
