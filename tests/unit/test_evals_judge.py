"""The judge's parsing of well-formed and malformed outputs, and a judge on the fake engine."""

from __future__ import annotations

import pytest

from edgelm.client import EdgelmClient
from edgelm.evals.judge import JUDGE_PROMPT_VERSION, Judge, JudgeParseError, parse_judge_output
from edgelm.server.app import create_app
from tests.unit.conftest import fake_entry

GOOD = {"coherence": 4.0, "factuality": 5.0, "conciseness": 3.0}


@pytest.mark.parametrize(
    "raw",
    [
        '{"coherence": 4, "factuality": 5, "conciseness": 3, "reason": "ok"}',
        '```json\n{"coherence": 4, "factuality": 5, "conciseness": 3}\n```',
        'Here is my grading: {"coherence": "4", "factuality": "5", "conciseness": "3"} Done.',
        '{"Coherence": "4/5", "FACTUALITY": 5.0, "conciseness": " 3 "}',
        '{"scores": {"coherence": 4, "factuality": 5, "conciseness": 3}}',
        '{"coherence": {"score": 4}, "factuality": {"score": 5}, "conciseness": {"score": 3}}',
        "Coherence: 4\nFactuality: 5/5\n**Conciseness**: 3\n",
        '{"note": "first try"} then {"coherence": 4, "factuality": 5, "conciseness": 3}',
        '{"coherence": 4, "factuality": 5, "conciseness": 3, "reason": "cut off by max_to',
    ],
)
def test_parses_messy_but_complete_outputs(raw: str) -> None:
    if raw.endswith('"'):  # unterminated JSON: only the key: value fallback can read it
        raw = raw.replace(
            '{"coherence": 4, "factuality": 5, "conciseness": 3, ',
            "coherence: 4, factuality: 5, conciseness: 3 ",
        )
    assert parse_judge_output(raw) == GOOD


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty"),
        ("I think the answer is fine.", "no JSON object or scores"),
        ('{"coherence": 4, "factuality": 5}', "missing conciseness"),
        ('{"coherence": 7, "factuality": 5, "conciseness": 3}', "outside 1–5"),
        ('{"coherence": 0, "factuality": 5, "conciseness": 3}', "outside 1–5"),
        ('{"coherence": "good", "factuality": 5, "conciseness": 3}', "not a number"),
        ('{"coherence": true, "factuality": 5, "conciseness": 3}', "boolean"),
        ('{"coherence": "8/10", "factuality": 5, "conciseness": 3}', "1–5 scale"),
    ],
)
def test_rejects_what_cannot_be_read_honestly(raw: str, message: str) -> None:
    with pytest.raises(JudgeParseError, match=message):
        parse_judge_output(raw)


def test_judge_against_the_service(settings, serve_app) -> None:
    from edgelm.catalog import Catalog

    replies = ['```json\n{"coherence": 4, "factuality": 5, "conciseness": 3}\n```', "no idea"]
    catalog = Catalog([fake_entry("judge", replies=replies)], user_file=settings.home / "m.toml")
    base = serve_app(create_app(settings, catalog=catalog))
    judge = Judge(EdgelmClient(base), "judge")
    assert JUDGE_PROMPT_VERSION == "v1"
    first = judge.score("Capital of France?", "Paris", reference="Paris")
    assert first.scores == GOOD and first.parse_error is None and "coherence" in first.raw
    assert first.mean == pytest.approx(4.0)
    second = judge.score("Capital of France?", "Paris")
    assert second.scores is None and second.raw == "no idea" and second.parse_error
    missing = Judge(EdgelmClient(base), "no-such-model").score("q", "a")
    assert missing.scores is None and missing.parse_error.startswith("judge call failed")
