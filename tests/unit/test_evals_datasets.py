"""The shipped question sets load, are well formed, and user JSONL files are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelm.errors import InvalidRequest
from edgelm.evals.code_exec import run_tests
from edgelm.evals.datasets import QAItem, list_datasets, load_dataset


def test_general_set_is_big_and_mixed() -> None:
    items = load_dataset("general")
    assert len(items) >= 50
    assert len({it.id for it in items}) == len(items)
    assert {it.category for it in items} >= {
        "geography", "science", "math", "history", "language", "computing", "common sense"
    }  # fmt: skip
    assert {it.difficulty for it in items} == {"easy", "medium", "hard"}
    assert all(it.answers and all(a.strip() for a in it.answers) for it in items)


def test_code_set_references_pass_their_own_tests() -> None:
    """Checked in-process (our own trusted code) to stay fast; the sandbox is tested apart."""
    items = load_dataset("code")
    assert len(items) >= 20
    for it in items:
        assert it.extra["entry_point"] in it.question
        namespace: dict[str, object] = {}
        exec(it.extra["reference"], namespace)
        exec(it.extra["tests"], namespace)
        # and the tests are not vacuous: without the solution they fail
        with pytest.raises(NameError):
            exec(it.extra["tests"], {})
    first = items[0]
    assert run_tests(first.extra["reference"], first.extra["tests"]).passed


def test_list_datasets_states_licences() -> None:
    rows = {row["name"]: row for row in list_datasets()}
    assert set(rows) == {"general", "general2", "code", "rag"}
    assert rows["general"]["size"] >= 50 and "CC0" in rows["general"]["licence"]
    assert rows["code"]["size"] >= 20 and "CC0" in rows["code"]["licence"]
    assert all(row["description"] for row in rows.values())


def test_rag_set_has_unanswerables_short_answers_and_supporting_chunks() -> None:
    from edgelm.rag.evaluate import corpus_dir
    from edgelm.rag.ingest import chunk_document, parse_file

    items = load_dataset("rag")
    unanswerable = [it for it in items if not it.extra["answerable"]]
    answerable = [it for it in items if it.extra["answerable"]]
    assert len(unanswerable) >= 3 and len(answerable) >= 10
    assert all(it.extra["supporting_chunks"] == [] for it in unanswerable)
    for it in answerable:
        assert len(it.answers) >= 2  # the reference sentence plus its key fact
        assert it.extra["supporting_chunks"]
        size, overlap = it.extra["chunking"]["chunk_size"], it.extra["chunking"]["overlap"]
        for evidence in it.extra["evidence"]:
            doc = parse_file(corpus_dir() / evidence["source"], evidence["source"])
            texts = {
                f"{evidence['source']}#{c.ordinal}": c.text
                for c in chunk_document(doc, size, overlap)
            }
            # the named chunks hold the quote between them (a chunk may hold only part of it)
            held = [texts[cid] for cid in evidence["chunks"]]
            words = evidence["quote"].split()
            assert any(words[0] in t for t in held) and any(words[-1] in t for t in held)


def test_jsonl_file_and_rag_rows(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    lines = [
        {"id": "q1", "question": "2+2?", "answers": ["4", "four"], "category": "math", "hint": 1},
        {"question": "Capital of Peru?", "answer": "Lima"},
        {"id": "r1", "question": "When?", "answer": "May", "answerable": True,
         "evidence": [{"source": "a.md", "quote": "in May"}]},
        {"id": "r2", "question": "Who?", "answer": "", "answerable": False, "evidence": []},
    ]  # fmt: skip
    path.write_text("# comment\n\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    items = load_dataset(str(path))
    assert items[0] == QAItem("q1", "2+2?", ["4", "four"], "math", "", {"hint": 1})
    assert items[1].id == "4" and items[1].answers == ["Lima"]  # id defaults to the line number
    assert items[2].category == "answerable" and items[2].extra["evidence"][0]["quote"] == "in May"
    assert items[3].category == "unanswerable" and items[3].answers == []
    assert items[3].extra["answerable"] is False


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "not valid JSON"),
        ('{"id": "a"}\n', "'question'"),
        ('{"question": "q", "answers": "x"}\n', "'answers'"),
        ('{"id": "a", "question": "q"}\n{"id": "a", "question": "r"}\n', "duplicate id"),
        ("\n", "no questions"),
        ("[1]\n", "JSON object"),
    ],
)
def test_bad_files_say_where(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidRequest, match=message):
        load_dataset(str(path))


def test_unknown_name() -> None:
    with pytest.raises(InvalidRequest, match="general, general2, code, rag"):
        load_dataset("nope")
