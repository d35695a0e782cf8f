"""The ONNX scheduler hands a first token over before the next forward pass.

onnxruntime-genai's binding holds the GIL for a whole forward pass, so a token sent just before
one reached its consumer only after it. The scheduler now lets go of the GIL for a moment after
a first token (``FIRST_TOKEN_HANDOFF_S``); these tests pin where that pause sits in the order of
events, with a scripted generator standing in for the library (the time it saves is a figure
for the bench, not asserted here)."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.engines import onnx_scheduler
from edgelm.engines.batching import DONE, TOKEN, Sampling
from edgelm.engines.onnx_scheduler import GeneratorScheduler, OnnxJob

VOCAB = 16


class ScriptedGenerator:
    """A batch-of-``rows`` generator whose logits always pick token 5; every forward pass is
    written to the shared event log."""

    def __init__(self, log: list[str], rows: int = 1) -> None:
        self.log, self.rows = log, rows

    def append_tokens(self, tokens: np.ndarray) -> None:
        self.log.append(f"pass {np.asarray(tokens).size}")

    def get_logits(self) -> np.ndarray:
        logits = np.zeros((self.rows, 1, VOCAB), dtype=np.float32)
        logits[..., 5] = 10.0
        return logits

    def set_logits(self, _logits: np.ndarray) -> None:
        pass

    def generate_next_token(self) -> None:
        self.log.append(f"pass {self.rows}")

    def rewind_to(self, _n: int) -> None:
        pass


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    events: list[str] = []
    monkeypatch.setattr(onnx_scheduler.time, "sleep", lambda s: events.append("hand over"))
    return events


def run(log: list[str], jobs: list[OnnxJob], batched: bool = False) -> None:
    scheduler = GeneratorScheduler(
        "scripted",
        slots=len(jobs),
        n_batch=64,
        new_generator=lambda: ScriptedGenerator(log),
        logprob=lambda row, token, top: None,
        new_batch=(lambda rows, _length: ScriptedGenerator(log, rows)) if batched else None,
        pad_token=0 if batched else -1,
    )
    log.clear()  # the slots' generators were made; only the requests' events count
    try:
        # Queued before the thread can look, so a batched scheduler takes them as one group.
        with scheduler._wake:
            for job in jobs:
                scheduler._pending.append(job)
            scheduler._wake.notify()
        for job in jobs:
            while (event := job.events.get(timeout=10))[0] != DONE:
                assert event[0] == TOKEN
    finally:
        scheduler.close()


def job(log: list[str], name: str, limit: int = 3) -> OnnxJob:
    j = OnnxJob(prompt=[1, 2, 3, 4], limit=limit, sampling=Sampling(temperature=0.0), exact=True)
    j.deliver = lambda event: (log.append(f"{name} {event[0]}"), j.events.put(event))
    return j


def test_a_single_stream_hands_its_first_token_over_before_the_next_pass(log) -> None:
    run(log, [job(log, "a")])
    # The prompt, the first token, the pause, then the pass that evaluates it; later tokens
    # go out without one (their delay is the same every step).
    assert log == [
        "pass 4",
        "a token",
        "hand over",
        "pass 1",
        "a token",
        "pass 1",
        "a token",
        "a done",
    ]


def test_a_batched_group_hands_its_first_tokens_over_once(log) -> None:
    run(log, [job(log, "a"), job(log, "b")], batched=True)
    assert log.count("hand over") == 1
    first_pass_after_prompts = log.index("pass 2", 1)
    assert log.index("hand over") == first_pass_after_prompts - 1
    assert log[: log.index("hand over")] == ["pass 8", "a token", "b token"]
