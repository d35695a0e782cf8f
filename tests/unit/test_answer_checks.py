"""The answer checks on crafted outputs: loops and marker-only answers are caught (early, while
streaming), invented figures and names are caught, and normal answers — lists, code, tables,
repeated words, numbers copied from the context — pass."""

from __future__ import annotations

import pytest

from edgelm.answer_checks import (
    LoopMonitor,
    check_answer,
    degeneration,
    is_marker,
    unsupported_claims,
)

SENTENCE = "A hash table is a data structure that maps keys to values. "

LOOPS = {
    "sentence": SENTENCE * 6,
    "sentence after a good start": "Hash tables are fast. " + SENTENCE * 6,
    "citation pair": "The answer is 16 seconds " + "[2] [1] " * 20,
    "counting markers": " ".join(f"[{i}]" for i in range(1, 35)),
    "glued markers": "[2][1]" * 20,
    "one word": "Yes " + "no " * 30,
    "short phrase": "It is " + "very good, " * 12,
}

NORMAL = {
    "numbered list": "\n".join(f"{i}. Step {i}: add item {i} to the list." for i in range(1, 25)),
    "bullets": "\n".join(f"- {w} is a fruit" for w in ["Apple", "Pear", "Plum", "Fig", "Kiwi"]),
    "primes": "The first primes are "
    + ", ".join(str(p) for p in [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53])
    + ".",
    "fibonacci": " ".join(str(n) for n in [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]),
    "table": "| col | a | b |\n|---|---|---|\n"
    + "\n".join(f"| row {i} | {i} | {i * 2} |" for i in range(12)),
    "code": "```python\ndef count(xs):\n    total = 0\n    for x in xs:\n        total += 1\n"
    "        total += 1\n    return total\n```\nCall count([1, 2, 3]).",
    "repeated words": "This is very very very good, really really good. Ha ha ha ha!",
    "citations": "It stores 90 days of readings [1][2]. The gauge tips at 0.2 mm [3].",
    "grounded with markers": "[1] The station measures the weather every 16 seconds.",
    "refrain": "Row, row, row your boat, gently down the stream. Merrily, merrily, merrily, "
    "merrily, life is but a dream.",
    "markdown rule": "Title\n\n---\n\nSome text here.\n\n---\n\nMore text.",
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_loops_are_found(name: str) -> None:
    found = degeneration(LOOPS[name])
    assert found is not None and found.kind in ("loop", "marker-run", "marker-only"), name


@pytest.mark.parametrize("name", list(NORMAL))
def test_normal_answers_pass(name: str) -> None:
    assert degeneration(NORMAL[name]) is None, name


def test_the_monitor_cuts_a_loop_after_three_copies_not_at_max_tokens() -> None:
    monitor = LoopMonitor()
    words = (SENTENCE * 40).split(" ")
    pushed = 0
    for word in words:  # one word per chunk, as a model streams
        pushed += 1
        if monitor.push(word + " ") is not None:
            break
    per_sentence = len(SENTENCE.split())
    assert monitor.found is not None and monitor.found.kind == "loop"
    assert pushed <= 3 * per_sentence + 1  # certain after three copies, not forty
    assert "repeated 3 times" in monitor.found.detail


def test_the_verdict_does_not_depend_on_chunking() -> None:
    text = "Good start. " + "[2] [1] " * 10
    whole = degeneration(text)
    for size in (1, 2, 3, 7):
        monitor = LoopMonitor()
        for i in range(0, len(text), size):
            monitor.push(text[i : i + size])
        assert monitor.finish() == whole


def test_marker_only_and_empty_answers() -> None:
    assert degeneration("[1]").kind == "marker-only"  # type: ignore[union-attr]
    assert degeneration("1. 2. 3.").kind == "marker-only"  # type: ignore[union-attr]
    assert degeneration("  \n ").kind == "empty"  # type: ignore[union-attr]
    assert degeneration("").kind == "empty"  # type: ignore[union-attr]
    # a cut stream of markers is certain before it ends
    monitor = LoopMonitor()
    for i in range(1, 35):
        if monitor.push(f"[{i}] "):
            break
    assert monitor.found is not None and len(monitor.words) == 8


def test_markers() -> None:
    for word in ("[1]", "[1][2].", "[3],", "4.", "2)", "-", "…", "**"):
        assert is_marker(word), word
    for word in ("2000", "16", "seconds", "WS-3", "[1]x"):
        assert not is_marker(word), word


CONTEXT = [
    "[1] (source: overview.md) The Aurora WS-3 measures the weather every 16 seconds. It "
    "stores up to 90 days of readings. Made by Tidepool Instruments. The console is IP65. "
    "The mast weighs 1.9 kg and sends two requests per second; 2,160 readings a month.",
    "How often does the Aurora WS-3 measure the weather?",
]


@pytest.mark.parametrize(
    "answer",
    [
        "The Aurora WS-3 measures the weather every 16 seconds [1].",
        "Every 16 seconds.",
        "It stores up to 90 days of readings [1], and the console is IP65.",
        "It sends 2 requests per second, 2160 readings a month.",  # 2 = two, 2160 = 2,160
        "According to [1], Tidepool Instruments makes the WS-3; the mast weighs 1.90 kg.",
        "1. It measures every 16s.\n2. It stores 90 days.",  # list numbers are not figures
        "The context does not say.",
    ],
)
def test_grounded_answers_pass(answer: str) -> None:
    assert unsupported_claims(answer, CONTEXT) == []


@pytest.mark.parametrize(
    ("answer", "invented"),
    [
        ("[1] 2000", "2000"),
        ("It costs $199 [1].", "199"),
        ("It measures every 15 seconds.", "15"),
        ("The chief executive is John Smith [1].", "John Smith"),
        ("The capital of France is Paris.", "Paris"),
        ("Yes, it works with Apple HomeKit.", "HomeKit"),
        ("The newer Aurora WS-4 does that.", "WS-4"),
        ("It was released on 2021-03-04.", "2021-03-04"),
    ],
)
def test_invented_figures_and_names_are_unsupported(answer: str, invented: str) -> None:
    assert invented in unsupported_claims(answer, CONTEXT)


def test_check_answer_reports_both() -> None:
    result = check_answer("[1] 2000", CONTEXT)
    assert result.to_dict() == {"degenerate": None, "unsupported": ["2000"]}
    assert check_answer("[1]").to_dict()["degenerate"].startswith("marker-only")  # type: ignore[union-attr]
    assert check_answer("Paris.").unsupported == ()  # no sources: grounding not judged


HASH_TABLE_AT_THE_CAP = (
    "A hash table is a data structure that uses a hash function to map keys to values. It is "
    "a data structure that is used to store and retrieve data in a hash table. The hash "
    "function is a mathematical function that takes a key and returns a unique integer value. "
    + "The hash table is used to store and retrieve data in a hash table. The hash function "
    "is used to map keys to values. " * 2
    + "The hash table is used to store and retrieve data in a hash table. The hash function "
    "is used to map"
)
"""Qwen2.5-0.5B's answer to "Explain in two sentences what a hash table is." in
``edgelm compare`` (128-token cap): under three copies when the cap cut it off."""


def test_a_loop_cut_off_by_max_tokens_is_degenerate() -> None:
    assert degeneration(HASH_TABLE_AT_THE_CAP) is None  # not yet certain while streaming
    found = degeneration(HASH_TABLE_AT_THE_CAP, truncated=True)
    assert found is not None and found.kind == "loop" and "up to max_tokens" in found.detail
    # a long normal answer that merely hits the cap is not
    prose = " ".join(f"Point {i} explains another detail of hashing." for i in range(30))
    assert degeneration(prose, truncated=True) is None
    assert degeneration(NORMAL["numbered list"], truncated=True) is None


def test_a_markdown_table_is_not_a_marker_run() -> None:
    """A 5-column separator row is 11 ``|``/``---``/``:---:`` tokens in a row: layout, not
    markers (it used to make 12 markers with the next row's border)."""
    header = "| Model | Size | Speed | Cost | Notes |"
    for rule in ("| --- | --- | --- | --- | --- |", "| :--- | :---: | ---: | --- | :-: |"):
        table = f"{header}\n{rule}\n| [1] | 1 GB | fast | low | ok |\n| SmolLM2 | 135M | x | y | z |"
        assert degeneration(table) is None, rule
    wide = "| " + " | ".join(f"c{i}" for i in range(12)) + " |\n" + "| --- " * 12 + "|\n"
    assert degeneration(wide + "| " + " | ".join(f"v{i}" for i in range(12)) + " |") is None
    # markers still run when the table cells are nothing but markers
    assert degeneration("Rows: " + "| [1] | [2] " * 8).kind in ("marker-run", "loop")  # type: ignore[union-attr]


def test_a_short_numeric_answer_is_not_marker_only() -> None:
    for answer in ("42.", "42", "(3)", "7. [2]", "[1] 12."):
        assert degeneration(answer) is None, answer
    for answer in ("1. 2. 3.", "[1]", "1. [1] 2.", "---"):
        assert degeneration(answer).kind == "marker-only", answer  # type: ignore[union-attr]


def test_a_repeat_counts_only_for_its_shortest_unit() -> None:
    """Fifteen zeros are not "a three-word phrase five times": one word needs sixteen."""
    fifteen = "int a[15] = { " + ", ".join(["0"] * 15) + " };"
    assert degeneration(fifteen) is None
    sixteen_words = "Values: " + "0, " * 16
    found = degeneration(sixteen_words)
    assert found is not None and found.kind == "loop" and "'0,' repeated 16 times" in found.detail
    # two-word units need ten copies, not five as "a b a b" (period 4)
    assert degeneration("Say " + "yes no " * 9 + "stop.") is None
    assert degeneration("Say " + "yes no " * 10 + "stop.").kind == "loop"  # type: ignore[union-attr]
    # the cap rule too: a 2-word unit at max_tokens is not a 6-word sentence 2.5 times
    assert degeneration("Go: " + "left right " * 8, truncated=True) is None


@pytest.mark.parametrize(
    "answer",
    [
        "## Overview\n\nThe Aurora WS-3 measures the weather every 16 seconds.",
        "### Storage\nIt stores up to 90 days of readings.",
        "1. **Install**: mount the mast.\n2. **Connect**: pair the console.",
        "- **Weight**: 1.9 kg\n- *Rating*: IP65",
        "> Warning: the mast weighs 1.9 kg.",
        "Setup:\n\n**Mount** the mast first.",
        "`Config` is not mentioned; it measures every 16 seconds.",
        "Done. _Summary_ follows.",
    ],
)
def test_words_after_markdown_leads_are_sentence_starts(answer: str) -> None:
    assert unsupported_claims(answer, CONTEXT) == []


def test_names_after_markdown_leads_are_still_checked() -> None:
    assert "John Smith" in unsupported_claims("## John Smith\nHe founded it.", CONTEXT)
    assert "Paris" in unsupported_claims("**Where**: it is made in Paris.", CONTEXT)


def test_one_value_may_repeat_longer_inside_a_code_fence() -> None:
    zeros = ", ".join(["0"] * 32)
    code = f"Use this:\n\n```c\nint buf[32] = {{ {zeros} }};\n```\nIt clears the buffer."
    assert degeneration(code) is None
    assert degeneration(f"The buffer is {zeros} now.").kind == "loop"  # type: ignore[union-attr]
    stuck = "```c\nint buf[] = { " + "0, " * 70
    found = degeneration(stuck)
    assert found is not None and found.kind == "loop" and "64 times" in found.detail
    # the fence state does not depend on chunking
    for size in (1, 3, 5):
        monitor = LoopMonitor()
        for i in range(0, len(code), size):
            monitor.push(code[i : i + size])
        assert monitor.finish() is None
