"""Turn files into chunks: parse Markdown, text, HTML and PDF, then chunk along their structure.

Every parser produces the same intermediate form, a :class:`ParsedDocument`: the extracted
text plus sections (heading path, span, page). The chunker only sees that form, so chunking
rules (never cross a heading, prefer paragraph ends, then sentence ends, overlap by whole
sentences) are written once. Chunks are contiguous slices of the extracted text, so a chunk's
character offsets always point at exactly its text — for Markdown and plain text these are
offsets into the file itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.errors import DiskFull, InvalidRequest
from edgelm.rag.types import ChunkSpec

if TYPE_CHECKING:
    from edgelm.rag.collection_db import RagStore
    from edgelm.rag.embed import Embedder

SUFFIXES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}


@dataclass(frozen=True, slots=True)
class Section:
    """A span of the extracted text under one heading path (and, for PDFs, on one page)."""

    heading: tuple[str, ...]
    start: int
    end: int
    page: int | None = None


@dataclass(slots=True)
class ParsedDocument:
    source: str
    kind: str
    text: str
    sections: list[Section]
    title: str | None = None


# -- parsers ------------------------------------------------------------------------------------
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def parse_markdown(text: str, source: str = "") -> ParsedDocument:
    """ATX headings (``#`` … ``######``) open sections; headings inside code fences do not."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    start = 0
    heading: tuple[str, ...] = ()
    in_fence = False
    pos = 0
    title = None
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _MD_HEADING.match(line.rstrip("\r\n"))
        if match:
            sections.append(Section(heading, start, pos))
            level = len(match.group(1))
            name = match.group(2).strip()
            title = title or (name if level == 1 else None)
            stack = [(lv, nm) for lv, nm in stack if lv < level] + [(level, name)]
            heading = tuple(nm for _, nm in stack)
            start = pos + len(line)
        pos += len(line)
    sections.append(Section(heading, start, len(text)))
    return ParsedDocument(source, "markdown", text, [s for s in sections if s.end > s.start], title)


def parse_text(text: str, source: str = "") -> ParsedDocument:
    """Plain text has no headings we can trust: one section, paragraphs do the rest."""
    return ParsedDocument(source, "text", text, [Section((), 0, len(text))])


class _HtmlText(HTMLParser):
    """Collects block-level text and headings; scripts, styles and navigation are dropped."""

    BLOCKS = frozenset(
        [
            "p",
            "div",
            "li",
            "ul",
            "ol",
            "table",
            "tr",
            "td",
            "th",
            "pre",
            "blockquote",
            "section",
            "article",
            "header",
            "footer",
            "dd",
            "dt",
            "br",
            "hr",
            "figcaption",
            "caption",
            "main",
            "aside",
        ]
    )
    SKIP = frozenset(["script", "style", "nav", "noscript", "template", "head"])

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[int, str]] = []  # (heading level or 0, text)
        self.current: list[str] = []
        self.level = 0
        self.skip = 0
        self.title: str | None = None
        self._in_title = False

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        if text:
            self.blocks.append((self.level, text))
        self.current = []
        self.level = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skip += 1
        if tag == "title":
            self._in_title = True
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.level = int(tag[1])
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "title":
            self._in_title = False
        if re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title = (self.title or "") + data.strip()
        if not self.skip:
            self.current.append(data)


def parse_html(html: str, source: str = "") -> ParsedDocument:
    """Extract blocks with the stdlib parser; ``h1``–``h6`` open sections like Markdown's ``#``."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    parser._flush()
    parts: list[str] = []
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    heading: tuple[str, ...] = ()
    pos = 0
    start = 0
    for level, block in parser.blocks:
        if level:
            sections.append(Section(heading, start, pos))
            stack = [(lv, nm) for lv, nm in stack if lv < level] + [(level, block)]
            heading = tuple(nm for _, nm in stack)
            parts.append(block + "\n\n")
            pos += len(block) + 2
            start = pos
        else:
            parts.append(block + "\n\n")
            pos += len(block) + 2
    sections.append(Section(heading, start, pos))
    text = "".join(parts)
    title = parser.title or next((b for lv, b in parser.blocks if lv == 1), None)
    return ParsedDocument(source, "html", text, [s for s in sections if s.end > s.start], title)


def parse_pdf(data: bytes, source: str = "") -> ParsedDocument:
    """One section per page (pypdf's text extraction), so every chunk knows its page."""
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - depends on the install
        from edgelm.errors import MissingExtra

        raise MissingExtra("pypdf", "rag") from None
    import io

    reader = PdfReader(io.BytesIO(data))
    parts: list[str] = []
    sections: list[Section] = []
    pos = 0
    for number, page in enumerate(reader.pages, 1):
        page_text = (page.extract_text() or "").strip()
        if not page_text:
            continue
        sections.append(Section((), pos, pos + len(page_text), page=number))
        parts.append(page_text + "\n\n")
        pos += len(page_text) + 2
    title = None
    if reader.metadata is not None and reader.metadata.title:
        title = str(reader.metadata.title)
    return ParsedDocument(source, "pdf", "".join(parts), sections, title)


def parse_file(path: Path, source: str | None = None) -> ParsedDocument:
    """Parse one file by its suffix; unknown suffixes are a clear error, not a guess."""
    kind = SUFFIXES.get(path.suffix.lower())
    source = source or path.name
    if kind is None:
        raise InvalidRequest(
            f"cannot ingest '{path}': unsupported file type (use {', '.join(sorted(SUFFIXES))})"
        )
    if kind == "pdf":
        return parse_pdf(path.read_bytes(), source)
    text = path.read_text(encoding="utf-8", errors="replace")
    if kind == "markdown":
        return parse_markdown(text, source)
    if kind == "html":
        return parse_html(text, source)
    return parse_text(text, source)


# -- chunking -----------------------------------------------------------------------------------
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


@dataclass(slots=True)
class _Unit:
    start: int
    end: int
    para_start: bool


def _units(text: str, start: int, end: int, size: int) -> list[_Unit]:
    """Sentences (words, for run-on text) of ``text[start:end]``, marking paragraph starts."""
    units: list[_Unit] = []
    para_spans = []
    cursor = start
    for brk in _PARAGRAPH_BREAK.finditer(text, start, end):
        para_spans.append((cursor, brk.start()))
        cursor = brk.end()
    para_spans.append((cursor, end))
    for p_start, p_end in para_spans:
        # strip surrounding whitespace so offsets point at real text
        while p_start < p_end and text[p_start].isspace():
            p_start += 1
        while p_end > p_start and text[p_end - 1].isspace():
            p_end -= 1
        if p_start >= p_end:
            continue
        first = True
        s_start = p_start
        bounds = [m.start() for m in _SENTENCE_END.finditer(text, p_start, p_end)]
        for s_end in [*bounds, p_end]:
            for u_start, u_end in _split_long(text, s_start, s_end, size):
                units.append(_Unit(u_start, u_end, first))
                first = False
            s_start = s_end
            while s_start < p_end and text[s_start].isspace():
                s_start += 1
    return units


def _split_long(text: str, start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """A sentence longer than a chunk is cut at word boundaries (or hard, for one long word)."""
    while end - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        cut = cut if cut > start else start + size
        yield start, cut
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if end > start:
        yield start, end


def chunk_document(
    doc: ParsedDocument, chunk_size: int = 800, overlap: int = 120
) -> list[ChunkSpec]:
    """Chunk each section on its own (a chunk never spans two headings or two pages).

    Within a section, sentences are packed up to ``chunk_size`` characters; a chunk closes at
    the last paragraph end when that keeps it at least half full, else at a sentence end. The
    next chunk starts with the previous one's trailing sentences that fit in ``overlap``
    characters, so a fact cut by a boundary is still whole in one chunk.
    """
    if chunk_size < 20:
        raise InvalidRequest("chunk_size must be at least 20 characters", param="chunk_size")
    if not 0 <= overlap < chunk_size:
        raise InvalidRequest("overlap must be >= 0 and smaller than chunk_size", param="overlap")
    chunks: list[ChunkSpec] = []
    for section in doc.sections:
        units = _units(doc.text, section.start, section.end, chunk_size)
        i = 0
        while i < len(units):
            begin = units[i].start
            j = i
            while j + 1 < len(units) and units[j + 1].end - begin <= chunk_size:
                j += 1
            if j + 1 < len(units):  # the chunk is full: prefer ending at a paragraph
                para_ends = [
                    k - 1
                    for k in range(i + 1, j + 1)
                    if units[k].para_start and units[k - 1].end - begin >= chunk_size // 2
                ]
                if para_ends:
                    j = para_ends[-1]
            end = units[j].end
            chunks.append(
                ChunkSpec(
                    text=doc.text[begin:end],
                    start=begin,
                    end=end,
                    heading=section.heading,
                    page=section.page,
                    ordinal=len(chunks),
                )
            )
            if j + 1 >= len(units):
                break
            # overlap: back up over whole trailing units that fit, but always move forward
            nxt = j + 1
            while nxt - 1 > i and end - units[nxt - 1].start <= overlap:
                nxt -= 1
            i = nxt
    return chunks


def chunk_text(
    text: str, chunk_size: int = 800, overlap: int = 120, source: str = "", kind: str = "markdown"
) -> list[ChunkSpec]:
    """Chunk a string (inline documents, tests) the way a file of ``kind`` would be."""
    doc = parse_html(text, source) if kind == "html" else None
    if doc is None:
        doc = parse_markdown(text, source) if kind == "markdown" else parse_text(text, source)
    return chunk_document(doc, chunk_size, overlap)


# -- ingest -------------------------------------------------------------------------------------
def content_hash(data: bytes, chunk_size: int, overlap: int) -> str:
    """Hash of the bytes *and* the chunking parameters: re-chunking with new sizes re-ingests."""
    digest = hashlib.sha256(data)
    digest.update(f"|{chunk_size}|{overlap}".encode())
    return digest.hexdigest()


def discover(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """Files to ingest with their source names (relative to the directory given, if any)."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and file.suffix.lower() in SUFFIXES:
                    found.append((file, file.relative_to(path).as_posix()))
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise InvalidRequest(f"no such file or directory: {path}")
    return found


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    chunks: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.removed)} removed, "
            f"{len(self.failed)} failed; {self.chunks} chunks written"
        )


ProgressFn = Callable[[str, int, int], None]


def ingest_paths(
    store: RagStore,
    paths: Iterable[Path],
    *,
    chunk_size: int = 800,
    overlap: int = 120,
    embedder: Embedder | None = None,
    prune: bool = True,
    progress: ProgressFn | None = None,
) -> IngestReport:
    """Bring the collection in line with ``paths``: new and changed files are (re)chunked,
    unchanged ones (same content hash) skipped, and — with ``prune`` — sources that were
    ingested from inside a given directory but are no longer there removed (sources from
    elsewhere are kept, so ingesting a second folder adds to the collection). Each file is
    written in its own transaction, so an ingest that is killed or runs out of disk keeps
    every file before the one in flight, and running it again skips them and finishes."""
    paths = [Path(p) for p in paths]
    files = discover(paths)
    report = IngestReport()
    known = store.sources()
    seen: set[str] = set()
    if embedder is not None:
        store.set_embedding_model(embedder.name)
    for n, (path, source) in enumerate(files, 1):
        if progress:
            progress(source, n - 1, len(files))
        seen.add(source)
        data = path.read_bytes()
        digest = content_hash(data, chunk_size, overlap)
        if (
            source in known
            and known[source].hash == digest
            and (embedder is None or store.has_vectors(source))
        ):
            report.unchanged.append(source)
            continue
        try:
            doc = parse_file(path, source)
            chunks = chunk_document(doc, chunk_size, overlap)
            vectors = embedder.embed([_embed_text(c) for c in chunks]) if embedder else None
        except Exception as exc:  # one bad file must not stop the others
            report.failed[source] = f"{type(exc).__name__}: {exc}"
            continue
        try:
            store.replace_source(
                source, str(path.resolve()), doc.kind, digest, doc.title, chunks, vectors
            )
        except DiskFull as exc:
            kept = len(report.added) + len(report.updated) + len(report.unchanged)
            raise DiskFull(
                f"{exc.message} while ingesting {source} ({n} of {len(files)}). The {kept} "
                "documents before it are stored; free some space and run the same command "
                "again: stored documents are skipped"
            ) from exc
        (report.updated if source in known else report.added).append(source)
        report.chunks += len(chunks)
    if prune:
        roots = [p.resolve() for p in paths if p.is_dir()]
        for source in sorted(set(known) - seen):
            origin = Path(known[source].path)
            if any(origin.is_relative_to(root) for root in roots):
                store.remove_source(source)
                report.removed.append(source)
    if progress:
        progress("", len(files), len(files))
    return report


def _embed_text(chunk: ChunkSpec) -> str:
    """Embed the heading path with the text: a chunk's topic often lives in its heading."""
    return f"{chunk.heading_path}\n{chunk.text}" if chunk.heading else chunk.text
