"""Escalation policies on scripted drafts: each rule, composition, and the spec grammar."""

from __future__ import annotations

import pytest

from edgelm.errors import InvalidRequest
from edgelm.hybrid.policies import (
    AllOf,
    AnyOf,
    Confidence,
    Draft,
    Insufficient,
    Keywords,
    Length,
    decide,
    decide_before_draft,
    parse_policy,
    route_for,
)

Q = "What is the capital of France?"


def draft(text: str = "Paris.", logprobs: tuple[float, ...] = (-0.1, -0.2)) -> Draft:
    return Draft(text, logprobs)


def test_length_fires_at_threshold() -> None:
    policy = Length(10)
    assert decide(policy, Q, draft("x" * 9)).route == "draft"
    decision = decide(policy, Q, draft("x" * 10))
    assert decision.route == "refine"
    assert decision.verdict.value == 10 and decision.verdict.threshold == 10
    assert "10 chars >= 10" in decision.reason
    assert policy.check(Q, None) is None  # needs the draft


def test_confidence_mean_and_min() -> None:
    sure = draft(logprobs=(-0.1, -0.3))
    unsure = draft(logprobs=(-0.1, -3.0))
    mean = Confidence(-1.0)
    assert decide(mean, Q, sure).route == "draft"
    decision = decide(mean, Q, unsure)
    assert decision.route == "refine" and decision.verdict.value == pytest.approx(-1.55)
    assert "mean logprob -1.550 < -1" in decision.reason
    low = Confidence(-2.0, "min")
    assert decide(low, Q, sure).route == "draft"
    assert decide(low, Q, unsure).verdict.value == -3.0
    assert decide(low, Q, unsure).verdict.policy == "confidence-min"


def test_confidence_without_logprobs_does_not_fire() -> None:
    decision = decide(Confidence(-0.5), Q, Draft("Paris", ()))
    assert decision.route == "draft" and "no logprobs" in decision.reason


def test_recorded_statistics_win_over_token_list() -> None:
    recorded = Draft("Paris", (), mean_logprob_value=-2.0, min_logprob_value=-5.0)
    assert decide(Confidence(-1.0), Q, recorded).route == "refine"
    assert decide(Confidence(-6.0, "min"), Q, recorded).route == "draft"


@pytest.mark.parametrize(
    "text",
    [
        "I don't know the answer to that.",
        "I'm sorry, but I cannot answer this question.",
        "There is not enough information to determine this.",
        "As an AI, I cannot browse the internet.",
        "",
        "?",
    ],
)
def test_insufficient_escalates_directly(text: str) -> None:
    decision = decide(Insufficient(), Q, draft(text))
    assert decision.route == "direct"
    assert decision.verdict.policy == "insufficient"


def test_insufficient_accepts_real_answers() -> None:
    for text in ("Paris.", "The capital of France is Paris.", "391"):
        assert decide(Insufficient(), Q, draft(text)).route == "draft"


def test_keywords_go_direct_before_any_draft() -> None:
    policy = Keywords.words(["contract", "diagnosis"])
    early = decide_before_draft(policy, "Review this contract for me")
    assert early is not None and early.route == "direct"
    assert "contract" in early.reason
    # no match: the decision is "draft" already, nothing about a draft can change it
    settled = decide_before_draft(policy, Q)
    assert settled is not None and settled.route == "draft"
    # whole words only
    assert decide_before_draft(policy, "contractual terms") is not None
    assert decide_before_draft(policy, "contractual terms").route == "draft"  # type: ignore[union-attr]


def test_topic_uses_regexes() -> None:
    policy = parse_policy("topic", topic_patterns=[r"\b(legal|medical)\b", r"prove that"])
    assert route_for(policy, "Please prove that 2 is prime", draft()).route == "direct"
    assert route_for(policy, Q, draft()).route == "draft"


def test_always_and_never() -> None:
    assert decide(parse_policy("always"), Q, draft()).route == "refine"
    assert decide_before_draft(parse_policy("always"), Q) is None
    assert route_for(parse_policy("never"), Q, draft("", ())).route == "draft"


def test_any_of_first_firing_child_picks_route() -> None:
    policy = AnyOf([Insufficient(), Length(5), Confidence(-1.0)])
    assert decide(policy, Q, draft("I don't know")).route == "direct"  # insufficient first
    long_sure = decide(policy, Q, draft("Paris is lovely", (-0.1,)))
    assert long_sure.route == "refine" and long_sure.verdict.policy == "length"
    quiet = decide(policy, Q, draft("Rome", (-0.1,)))
    assert quiet.route == "draft"
    assert [v.policy for v in quiet.verdict.leaves()] == ["insufficient", "length", "confidence"]


def test_all_of_needs_every_child() -> None:
    policy = AllOf([Length(5), Confidence(-1.0)])
    assert decide(policy, Q, draft("Paris is lovely", (-0.1,))).route == "draft"
    assert decide(policy, Q, draft("Rome", (-3.0,))).route == "draft"
    both = decide(policy, Q, draft("Paris is lovely", (-3.0,)))
    assert both.route == "refine" and both.verdict.policy == "length&confidence"


def test_all_of_question_rule_that_fails_settles_early() -> None:
    policy = AllOf([Keywords.words(["legal"]), Confidence(-1.0)])
    assert decide_before_draft(policy, Q) is None  # must still draft (draft is returned)
    assert route_for(policy, Q, draft("x", (-5.0,))).route == "draft"
    assert route_for(policy, "a legal question", draft("x", (-5.0,))).route == "refine"


def test_spec_grammar_round_trips() -> None:
    policy = parse_policy("insufficient, length=600 & confidence=-0.8 | keywords=tax;law")
    assert isinstance(policy, AnyOf)
    assert policy.spec() == "insufficient=3,length=600&confidence=-0.8,keywords=tax;law"
    assert parse_policy(policy.spec()).spec() == policy.spec()
    assert policy.needs_logprobs and policy.needs_draft


def test_escalation_route_can_be_chosen() -> None:
    unsure, sure = draft(logprobs=(-2.0, -1.0)), draft(logprobs=(-0.1, -0.2))
    refine = parse_policy("confidence=-0.5")
    direct = parse_policy("confidence=-0.5>direct")
    assert route_for(refine, Q, unsure).route == "refine"
    assert route_for(direct, Q, unsure).route == "direct"
    assert route_for(direct, Q, sure).route == "draft"
    assert direct.needs_logprobs and direct.spec() == "confidence=-0.5>direct"
    combo = parse_policy("insufficient,length=5>refine&confidence=-0.5>direct")
    assert parse_policy(combo.spec()).spec() == combo.spec()
    # a question rule keeps deciding before any draft when wrapped
    words = parse_policy("keywords=tax>direct")
    assert decide_before_draft(words, "my tax return").route == "direct"  # type: ignore[union-attr]


def test_mapping_form() -> None:
    policy = parse_policy({"policy": "confidence", "threshold": -1.0})
    assert isinstance(policy, Confidence) and policy.threshold == -1.0
    combo = parse_policy({"any": ["insufficient", {"policy": "length", "threshold": 300}]})
    assert combo.spec() == "insufficient=3,length=300"
    words = parse_policy({"policy": "keywords", "keywords": ["tax"]})
    assert decide_before_draft(words, "my tax return").route == "direct"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "spec", ["", "sometimes", "length=abc", "keywords=", "confidence=nan", "length=5>later"]
)
def test_bad_specs_are_400(spec: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_policy(spec)
    assert info.value.param == "policy"


def test_degenerate_and_unsupported_terms() -> None:
    from edgelm.hybrid.policies import (
        Degenerate,
        Unsupported,
        answer_checks,
        watches_loops,
    )

    policy = parse_policy("degenerate,unsupported=2,insufficient")
    assert policy.spec() == "degenerate,unsupported=2,insufficient=3"
    assert [type(p) for p in answer_checks(policy)] == [Degenerate, Unsupported]
    assert watches_loops(policy) and not watches_loops(parse_policy("insufficient,never"))
    assert watches_loops(parse_policy("degenerate>refine"))

    loop = Draft("Paris is nice. " * 20)
    verdict = Degenerate().check("q", loop)
    assert verdict is not None and verdict.fired and verdict.action == "direct"
    assert verdict.value == "loop" and "repeated" in verdict.detail
    fine = Degenerate().check("q", Draft("Paris is the capital [1]."))
    assert fine is not None and not fine.fired
    assert Degenerate().check("q", None) is None
    tail = "It is a data structure for keys and values. " * 2 + "It is a data structure"
    capped = Degenerate().check("q", Draft("Hashing. " + tail, finish_reason="length"))
    ended = Degenerate().check("q", Draft("Hashing. " + tail, finish_reason="stop"))
    assert capped is not None and capped.fired and ended is not None and not ended.fired

    context = ("The WS-3 measures every 16 seconds.",)
    grounded = Unsupported().check("How often?", Draft("Every 16 seconds [1].", sources=context))
    invented = Unsupported().check("How often?", Draft("[1] 2000", sources=context))
    assert grounded is not None and not grounded.fired
    assert invented is not None and invented.fired and invented.value == 1
    assert "'2000'" in invented.detail
    # an ungrounded draft (the hybrid router's) is never judged on grounding
    ungrounded = Unsupported().check("q", Draft("[1] 2000"))
    assert ungrounded is not None and not ungrounded.fired
    one_is_not_two = Unsupported(2).check("q", Draft("[1] 2000", sources=context))
    assert one_is_not_two is not None and not one_is_not_two.fired


def test_unsupported_needs_a_positive_count() -> None:
    with pytest.raises(InvalidRequest):
        parse_policy("unsupported=0")


def test_default_router_policy_cuts_loops() -> None:
    from edgelm.hybrid.policies import watches_loops
    from edgelm.settings import Settings

    policy = parse_policy(Settings().router.policy)
    assert watches_loops(policy)
    assert route_for(policy, "q", Draft("[2] [1] " * 30)).route == "direct"
