"""Early checks on a streaming draft (``confidence@<k>``, ``tokens=<n>``): the live pipeline
cuts the draft after k (or n) tokens and escalates, and ``edgelm hybrid eval``'s offline
replay of the recorded draft takes the same route and charges only the draft time up to the
cut. Fake engines with scripted replies and per-token logprobs make every stream crafted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from openai import OpenAI

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.client import EdgelmClient
from edgelm.cost import Prices
from edgelm.errors import InvalidRequest
from edgelm.evals import hybrid as ev
from edgelm.hybrid.policies import first_cut, has_early_terms, parse_policy
from edgelm.server.app import create_app
from edgelm.server.hybrid_model import HybridModels
from edgelm.settings import Settings

BIG = "The capital of France is Paris."
WORDS = " ".join(f"w{i}" for i in range(30))
# An unsure start (-1.5 for 8 tokens) then sure tokens: over the whole 30-token draft the mean
# is -0.41, so 'confidence=-0.5' keeps it, while 'confidence@8=-0.5' cuts it at token 8.
UNSURE_START = [-1.5] * 8 + [-0.01] * 22
LONG = " ".join(f"step{i}" for i in range(120))


@pytest.fixture
def app(settings: Settings, isolated_home: Path):  # type: ignore[no-untyped-def]
    def fake(alias: str, tier: str, **options: object) -> CatalogEntry:
        return CatalogEntry(alias=alias, engine="fake", tier=tier, options=options)  # type: ignore[arg-type]

    catalog = Catalog(
        [
            fake("small", "slm", reply="Paris.", logprobs=[-0.05]),
            fake("small-unsure-start", "custom", reply=WORDS, logprobs=UNSURE_START),
            fake("small-long", "custom", reply=LONG, logprobs=[-0.05]),
            fake("big", "llm", reply=BIG),
        ],
        user_file=isolated_home / "models.toml",
    )
    return create_app(settings, catalog=catalog, virtual=[HybridModels()])


@pytest.fixture
def base(app, serve_app) -> str:  # type: ignore[no-untyped-def]
    return serve_app(app)


def ask(base: str, model: str) -> dict:  # type: ignore[type-arg]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    body = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Q?"}], max_tokens=256, temperature=0
    )
    return {"text": body.choices[0].message.content, "ext": body.model_extra["edgelm"]}


def test_spec_grammar() -> None:
    policy = parse_policy("insufficient,confidence@8=-0.5,tokens=48")
    assert policy.spec() == "insufficient=3,confidence@8=-0.5,tokens=48"
    assert has_early_terms(policy)
    assert not has_early_terms(parse_policy("confidence=-0.5"))
    assert not has_early_terms(parse_policy("confidence@8=-0.5&length=10"))  # all-of: no cut
    assert parse_policy("confidence-min@4=-3").spec() == "confidence-min@4=-3"
    for bad in ("length@4=10", "confidence@x=-1", "confidence@0=-1", "tokens=0"):
        with pytest.raises(InvalidRequest):
            parse_policy(bad)


def test_first_cut_replays_token_by_token() -> None:
    policy = parse_policy("confidence@8=-0.5,tokens=20")
    n, decision = first_cut(policy, 30, UNSURE_START) or (0, None)
    assert n == 8 and decision is not None and decision.route == "direct"
    assert decision.verdict.policy == "confidence@8"
    n, decision = first_cut(policy, 30, [-0.05] * 30) or (0, None)
    assert n == 20 and decision is not None and decision.verdict.policy == "tokens"
    assert first_cut(policy, 12, [-0.05] * 12) is None  # sure and short: runs to its end
    # A draft shorter than k is judged whole when it ends, by the policy's verdict.
    assert first_cut(policy, 5, [-2.0] * 5) is None
    assert policy.check("Q?", ev.Draft("x", (-2.0,) * 5)).fired  # type: ignore[union-attr]


def test_live_confidence_at_k_cuts_after_k_tokens(app, base: str) -> None:  # type: ignore[no-untyped-def]
    whole = ask(base, "hybrid:small-unsure-start+big@confidence=-0.5")
    assert whole["ext"]["route"] == "draft"  # the whole draft's mean passes
    cut = ask(base, "hybrid:small-unsure-start+big@confidence@8=-0.5")
    ext = cut["ext"]
    assert ext["route"] == "direct" and cut["text"] == BIG
    assert ext["fired"] == "confidence@8"
    assert ext["tokens"]["slm"]["completion"] == 8  # not 30
    assert ext["draft"]["finish_reason"] == "cancelled"
    assert ext["draft_cut"].startswith("confidence@8")
    assert len(ext["draft_logprob"]["tokens"]) == 8 and len(ext["draft_logprob"]["token_ms"]) == 8
    assert app.state.edgelm.pool.models["small-unsure-start"].cancelled >= 1


def test_live_token_budget_cuts_and_escalates(base: str) -> None:
    out = ask(base, "hybrid:small-long+big@tokens=16")
    ext = out["ext"]
    assert ext["route"] == "direct" and out["text"] == BIG
    assert ext["tokens"]["slm"]["completion"] == 16 and ext["fired"] == "tokens"
    short = ask(base, "hybrid:small+big@tokens=16")
    assert short["ext"]["route"] == "draft" and short["text"] == "Paris."


POLICIES = (
    "confidence@8=-0.5",
    "tokens=16",
    "insufficient,tokens=24,confidence@8=-0.5",
    "confidence@8=-0.5,confidence=-0.3>direct",
    "confidence=-0.5",
)


@pytest.mark.parametrize("slm", ["small", "small-unsure-start", "small-long"])
def test_offline_replay_takes_the_live_route(base: str, slm: str) -> None:
    """Record the draft as ``hybrid eval`` does (``hybrid@never``: the whole draft with its
    token logprobs), then for each policy: the offline route and draft tokens charged equal
    what the live pipeline did with that policy."""
    items = [SimpleNamespace(id="q1", question="Q?", answers=["Paris"], category="geo")]
    with EdgelmClient(base) as client:
        pieces = ev.collect(client, items, slm, "big", refine=False, warmup=False)
    p = pieces[0]
    assert p.draft_logprobs and len(p.draft_logprobs) == p.draft.completion_tokens
    assert p.draft_token_s and len(p.draft_token_s) == p.draft.completion_tokens
    for spec in POLICIES:
        live = ask(base, f"hybrid:{slm}+big@{spec}")["ext"]
        offline = ev.outcome(ev.Config(spec, "hybrid", parse_policy(spec)), p)
        assert offline.route == live["route"], spec
        charged = offline.completion_tokens - (
            p.direct.completion_tokens if offline.route == "direct" else 0
        )
        assert charged == live["tokens"]["slm"]["completion"], spec


def _pieces(tokens: int, total: float, ttft: float, times: list[float] | None) -> ev.Pieces:
    draft = ev.Piece("w " * tokens, total, ttft, 10, tokens)
    direct = ev.Piece("Paris", 1.0, 0.2, 10, 2)
    return ev.Pieces(
        "q", "Q?", ["Paris"], "geo", draft, -1.0, -1.0, ev.Piece("", 0, None, 0, 0), direct,
        draft_logprobs=[-1.0] * tokens, draft_token_s=times,
    )  # fmt: skip


def test_offline_charges_only_the_draft_time_up_to_the_cut() -> None:
    config = ev.Config("c", "hybrid", parse_policy("confidence@8=-0.5"))
    # Per-token times recorded: the 8th token's time.
    timed = _pieces(100, 5.0, 0.1, [0.1 + 0.05 * i for i in range(100)])
    out = ev.outcome(config, timed)
    assert out.route == "direct" and out.latency_s == pytest.approx(0.1 + 0.05 * 7 + 1.0)
    # Older pieces without token times: interpolated from TTFT to the end.
    old = _pieces(101, 5.1, 0.1, None)
    out = ev.outcome(config, old)
    assert out.latency_s == pytest.approx(0.1 + 5.0 * 7 / 100 + 1.0)
    assert out.busy_s == pytest.approx(out.latency_s)
    # The whole-draft policy pays for the whole draft before escalating.
    late = ev.outcome(ev.Config("c", "hybrid", parse_policy("confidence=-0.5>direct")), old)
    assert late.latency_s == pytest.approx(5.1 + 1.0)


def test_early_cut_makes_an_escalation_cheaper_in_the_report() -> None:
    pieces = [_pieces(100, 5.0, 0.1, None)]
    configs = [ev.Config(s, "hybrid", parse_policy(s)) for s in ("confidence=-0.5>direct",
               "confidence@8=-0.5")]  # fmt: skip
    report = ev.evaluate(pieces, configs, Prices.load(Path("/nonexistent-home")))
    late, early = report.configs
    assert late.quality == early.quality == 1.0 and late.escalated == early.escalated == 1.0
    assert early.mean_latency_s < late.mean_latency_s - 4.0
