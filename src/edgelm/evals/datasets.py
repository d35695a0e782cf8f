"""Question sets: the ones shipped with edgelm (``general``, ``code``, ``rag``) and any JSONL file.

Every set becomes a list of :class:`QAItem`, so the harness, the router's calibration and the
comparison command read one shape whatever the source. A JSONL line is one object with at least
``id`` and ``question`` and either ``answers`` (a list of accepted answers, the first being the
canonical one) or ``answer`` (one string); ``category`` and ``difficulty`` are optional and every
other key lands in ``extra`` (the code set keeps its unit tests there, the RAG set its evidence).

The shipped general, general2 and code sets were written for this project and are released under CC0-1.0
(see ``data/LICENSE.md``); the RAG set is read from the RAG package's data
(``edgelm/rag/data/qa.jsonl``), written for the project by the RAG work alongside its demo corpus.
Its rows label evidence as quotes (which survive re-chunking); :func:`with_supporting_chunks`
adds the ids of the chunks that hold them, computed with the RAG package's own parser and
chunker at the default chunking, so the ids match a collection made by
``edgelm rag ingest --demo``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidRequest
from edgelm.settings import RagSettings

SHIPPED_LICENCE = "CC0-1.0 (written for edgelm)"

_KNOWN_KEYS = frozenset({"id", "question", "answers", "answer", "category", "difficulty"})


@dataclass
class QAItem:
    """One question with its accepted answers.

    ``answers`` may be empty (code tasks are scored by their tests, unanswerable RAG questions
    by refusal). ``extra`` carries what a particular scorer needs: ``tests`` and
    ``entry_point`` for code, ``evidence`` and ``answerable`` for RAG.
    """

    id: str
    question: str
    answers: list[str]
    category: str = ""
    difficulty: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Shipped:
    name: str
    resource: tuple[str, ...]
    licence: str
    description: str


def _shipped() -> tuple[_Shipped, ...]:
    """The named sets. A function rather than a module constant so nothing is mutable."""
    return (
        _Shipped(
            "general",
            ("evals", "data", "general.jsonl"),
            SHIPPED_LICENCE,
            "Short factual questions with alias lists: geography, science, math, history, "
            "language, computing, common sense; easy to hard.",
        ),
        _Shipped(
            "general2",
            ("evals", "data", "general2.jsonl"),
            SHIPPED_LICENCE,
            "150 more short factual questions in the categories of 'general', easy to hard "
            "(a third hard enough that a 0.5B model often fails them): training and held-out "
            "data for the hybrid router's learned policy.",
        ),
        _Shipped(
            "code",
            ("evals", "data", "code.jsonl"),
            SHIPPED_LICENCE,
            "Small Python programming tasks, each scored pass@1 by running its unit tests "
            "against the answer's code in a sandboxed subprocess.",
        ),
        _Shipped(
            "rag",
            ("rag", "data", "qa.jsonl"),
            "CC0-1.0 (written for edgelm with the RAG demo corpus, see edgelm/rag/corpus)",
            "Questions over the RAG demo corpus with reference answers, evidence quotes and "
            "supporting chunk ids, including questions the corpus cannot answer; ingest with "
            "'edgelm rag ingest --demo' and ask them as model 'rag:<collection>'.",
        ),
    )


def _resource(parts: tuple[str, ...]) -> Traversable:
    node = resources.files("edgelm")
    for part in parts:
        node = node.joinpath(part)
    return node


def shipped_names() -> list[str]:
    return [s.name for s in _shipped()]


def list_datasets() -> list[dict[str, Any]]:
    """Name, size, licence and description of every shipped set (size 0 when not installed)."""
    rows = []
    for spec in _shipped():
        node = _resource(spec.resource)
        size = len(_parse_lines(node.read_text("utf-8"), spec.name)) if node.is_file() else 0
        rows.append(
            {
                "name": spec.name,
                "size": size,
                "licence": spec.licence,
                "description": spec.description,
            }
        )
    return rows


def load_dataset(name_or_path: str) -> list[QAItem]:
    """The items of a shipped set (by name) or of a JSONL file (by path).

    Raises :class:`InvalidRequest` with the file and line when a line is not a usable item, so
    a typo in a user's set is one clear message rather than a KeyError later in a run.
    """
    for spec in _shipped():
        if name_or_path == spec.name:
            node = _resource(spec.resource)
            if not node.is_file():
                raise InvalidRequest(
                    f"the '{spec.name}' dataset is not installed (edgelm/{'/'.join(spec.resource)}"
                    " is missing)"
                )
            items = _parse_lines(node.read_text("utf-8"), spec.name)
            return _rag_items(items) if spec.name == "rag" else items
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        names = ", ".join(shipped_names())
        raise InvalidRequest(
            f"no dataset '{name_or_path}': give one of {names} or the path of a .jsonl file"
        )
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read dataset {path}: {exc}") from None
    return _parse_lines(text, str(path))


def _parse_lines(text: str, origin: str) -> list[QAItem]:
    items: list[QAItem] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            row = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{origin}:{lineno}: not valid JSON: {exc.msg}") from None
        item = _item_from_row(row, f"{origin}:{lineno}", lineno)
        if item.id in seen:
            raise InvalidRequest(f"{origin}:{lineno}: duplicate id '{item.id}'")
        seen.add(item.id)
        if "answerable" in item.extra or "evidence" in item.extra:
            item = _rag_item(item)
        items.append(item)
    if not items:
        raise InvalidRequest(f"{origin}: the dataset has no questions")
    return items


def _item_from_row(row: Any, where: str, lineno: int) -> QAItem:
    if not isinstance(row, dict):
        raise InvalidRequest(f"{where}: each line must be a JSON object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequest(f"{where}: 'question' must be a non-empty string")
    answers = row.get("answers")
    if answers is None:
        answer = row.get("answer")
        answers = [] if answer in (None, "") else [answer]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InvalidRequest(f"{where}: 'answers' must be a list of strings")
    return QAItem(
        id=str(row.get("id", lineno)),
        question=question,
        answers=list(answers),
        category=str(row.get("category") or ""),
        difficulty=str(row.get("difficulty") or ""),
        extra={k: v for k, v in row.items() if k not in _KNOWN_KEYS},
    )


def _rag_item(item: QAItem) -> QAItem:
    """RAG rows: ``answerable`` decides the category; evidence stays in ``extra``."""
    answerable = bool(item.extra.get("answerable", True))
    item.extra["answerable"] = answerable
    item.extra.setdefault("evidence", [])
    if not item.category:
        item.category = "answerable" if answerable else "unanswerable"
    return item


def _rag_items(items: list[QAItem]) -> list[QAItem]:
    """The RAG package's questions with our short accepted answers and supporting chunk ids."""
    text = _resource(("evals", "data", "rag_answers.jsonl")).read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    short = {row["id"]: row["answers"] for row in rows}
    for item in items:
        item.answers = [*item.answers, *short.get(item.id, [])]
    return with_supporting_chunks(items)


def with_supporting_chunks(items: list[QAItem]) -> list[QAItem]:
    """Label each RAG item's evidence with the ids of the demo-corpus chunks that hold it.

    A chunk supports a quote when its character span overlaps the quote's span in the source's
    extracted text (:func:`edgelm.rag.evaluate.evidence_spans`), with the chunking of the
    default ``rag`` settings. Adds ``supporting_chunks`` (all ids, sorted) and ``chunks`` on
    each evidence entry, plus the ``chunking`` used, so a run stores what it was scored
    against. Unanswerable items get an empty list.
    """
    from edgelm.rag.evaluate import corpus_dir, evidence_spans
    from edgelm.rag.ingest import chunk_document, parse_file

    rag = RagSettings()
    corpus = corpus_dir()
    rows = [{"id": it.id, "evidence": it.extra.get("evidence") or []} for it in items]
    spans = evidence_spans(rows, corpus)
    chunks: dict[str, list[tuple[str, int, int]]] = {}
    for source in {src for found in spans.values() for src, _, _ in found}:
        doc = parse_file(corpus / source, source)
        chunks[source] = [
            (f"{source}#{c.ordinal}", c.start, c.end)
            for c in chunk_document(doc, rag.chunk_size, rag.overlap)
        ]
    for item in items:
        found = spans.get(item.id, [])
        all_ids: set[str] = set()
        for evidence, (source, start, end) in zip(item.extra["evidence"], found, strict=True):
            ids = [cid for cid, a, b in chunks[source] if a < end and start < b]
            evidence["chunks"] = ids
            all_ids.update(ids)
        item.extra["supporting_chunks"] = sorted(all_ids)
        item.extra["chunking"] = {"chunk_size": rag.chunk_size, "overlap": rag.overlap}
    return items
