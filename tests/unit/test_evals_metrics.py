"""Every evaluation metric on hand-made examples whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest

from edgelm.evals.metrics import (
    answer_relevancy,
    contains_answer,
    context_precision,
    context_recall,
    exact_match,
    faithfulness,
    is_refusal,
    normalize,
    qa_scores,
    rag_scores,
    split_claims,
    token_f1,
)


def test_normalize_is_squad_style() -> None:
    assert normalize("  The Eiffel-Tower, in PARIS!  ") == "eiffel tower in paris"
    assert normalize("an apple a day") == "apple day"
    assert normalize("") == ""


def test_exact_match() -> None:
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Everest", ["Mount Everest", "Everest"]) == 1.0  # best over references
    assert exact_match("anything", []) == 0.0


def test_token_f1() -> None:
    # pred tokens: capital is paris (3); ref: paris (1); overlap 1 -> P=1/3, R=1, F1=0.5
    assert token_f1("The capital is Paris", ["Paris"]) == pytest.approx(0.5)
    # pred: new york city; ref: new york -> P=2/3 R=1 -> 0.8
    assert token_f1("New York City", ["New York"]) == pytest.approx(0.8)
    assert token_f1("London", ["Paris"]) == 0.0
    assert token_f1("", [""]) == 1.0
    assert token_f1("x", ["Paris", "x"]) == 1.0


def test_contains_answer_needs_whole_words() -> None:
    assert contains_answer("I think it is Paris, France.", ["paris"]) == 1.0
    assert contains_answer("Parisian food", ["Paris"]) == 0.0
    assert contains_answer("The answer is 56.", ["fifty-six", "56"]) == 1.0
    assert contains_answer("whatever", [""]) == 0.0
    assert qa_scores("Paris", ["Paris"]) == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0}


def test_split_claims() -> None:
    text = "Paris is the capital [1]. It is big!\n\nYes? The."
    assert split_claims(text) == ["Paris is the capital .", "It is big!", "Yes?"]


def test_faithfulness_lexical_and_with_judge() -> None:
    contexts = ["Paris is the capital and largest city of France."]
    answer = "Paris is the capital of France. The moon is made of cheese."
    assert faithfulness(answer, contexts) == pytest.approx(0.5)
    assert faithfulness("Paris is the capital of France.", contexts) == 1.0
    assert faithfulness("", contexts) is None
    # a judge decides per claim; here it rejects everything mentioning cheese
    assert faithfulness(answer, contexts, judge=lambda claim, ctx: "cheese" not in claim) == 0.5
    assert faithfulness(answer, contexts, judge=lambda claim, ctx: True) == 1.0


def test_answer_relevancy() -> None:
    q = "What is the capital of France?"  # content words: capital, france
    assert answer_relevancy(q, "The capital of France is Paris.") == 1.0
    assert answer_relevancy(q, "France is in Europe.") == pytest.approx(0.5)
    assert answer_relevancy(q, "Bananas are yellow.") == 0.0
    assert answer_relevancy(q, "   ") == 0.0
    vectors = {q: [1.0, 0.0], "Paris.": [1.0, 1.0]}
    score = answer_relevancy(q, "Paris.", embed=lambda texts: [vectors[t] for t in texts])
    assert score == pytest.approx(1 / math.sqrt(2))


def test_context_precision_is_average_precision() -> None:
    quotes = ["capital of France"]
    rel, irr = "Paris is the capital of France.", "Bananas are yellow."
    assert context_precision([rel, irr, rel], quotes) == pytest.approx((1 + 2 / 3) / 2)
    assert context_precision([irr, rel], quotes) == pytest.approx(0.5)
    assert context_precision([rel, irr, rel], quotes, k=2) == 1.0
    assert context_precision([irr, irr], quotes) == 0.0
    assert context_precision([], quotes) == 0.0


def test_chunk_ids_count_as_relevance() -> None:
    """A quote cut in two by a chunk boundary is in neither text, but its chunks are known."""
    halves = ["Paris is the capital", "of France and its largest city.", "Bananas are yellow."]
    quotes = ["Paris is the capital of France"]
    ids = ["geo#0", "geo#1", "fruit#0"]
    assert context_precision(halves, quotes) == 0.0  # text alone cannot see it
    assert context_precision(halves, quotes, None, ids, ["geo#0", "geo#1"]) == 1.0
    assert context_precision(halves[::-1], quotes, None, ids[::-1], ["geo#1"]) == 0.5
    assert context_recall(halves, quotes) == 0.0
    assert context_recall(halves, quotes, ids, [["geo#0", "geo#1"]]) == 1.0
    assert context_recall(halves[2:], quotes, ids[2:], [["geo#0", "geo#1"]]) == 0.0


def test_context_recall() -> None:
    contexts = ["Paris is the capital of France.", "It has 2.1 million people."]
    assert context_recall(contexts, ["capital of France", "the Seine"]) == 0.5
    assert context_recall(contexts, ["2.1 million people", "capital of france"]) == 1.0
    assert context_recall(contexts, []) is None


@pytest.mark.parametrize(
    ("answer", "refused", "expected"),
    [
        ("I don't know.", None, True),
        ("The documents do not mention the launch date.", None, True),
        ("That is not stated in the provided context.", None, True),
        ("There is not enough information to answer.", None, True),
        ("I cannot answer that from the sources.", None, True),
        ("", None, True),
        ("The launch date is 3 May.", None, False),
        ("The launch date is 3 May.", True, True),
    ],
)
def test_is_refusal(answer: str, refused: bool | None, expected: bool) -> None:
    assert is_refusal(answer, refused) is expected


def test_rag_scores_answerable_and_unanswerable() -> None:
    ext = {
        "contexts": [
            {
                "chunk_id": "a#1",
                "source": "a.md",
                "text": "The pool unloads idle models.",
                "score": 1,
            },
            {"chunk_id": "b#1", "source": "b.md", "text": "Unrelated text.", "score": 0.5},
        ],
        "citations": [],
        "refused": False,
    }
    evidence = [{"source": "a.md", "quote": "unloads idle models"}]
    scores = rag_scores(
        "What does the pool do with idle models?",
        "The pool unloads idle models.",
        ext,
        True,
        evidence,
    )
    assert scores == {
        "faithfulness": 1.0,
        "answer_relevancy": 1.0,  # pool, idle, models all used
        "context_precision": 1.0,
        "context_recall": 1.0,
        "false_refusal": 0.0,
    }
    refusal = rag_scores("Who won?", "x", {**ext, "refused": True}, False, [])
    assert refusal == {"correct_refusal": 1.0}
    assert rag_scores("Who won?", "Team A won.", ext, False, []) == {"correct_refusal": 0.0}
    refused_answerable = rag_scores("q?", "I don't know.", None, True, evidence)
    assert refused_answerable["false_refusal"] == 1.0
    assert refused_answerable["faithfulness"] is None
    assert refused_answerable["context_recall"] == 0.0
