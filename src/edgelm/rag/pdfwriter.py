"""A tiny PDF writer for plain text (Helvetica, A4, wrapped lines, several pages).

It exists so the demo corpus and the tests can make real PDFs — parsed by pypdf like any
other — without a PDF library as a dependency. It handles only Latin-1 text.
"""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path

PAGE_W, PAGE_H = 595, 842
MARGIN = 64
LEADING = 15
FONT_SIZE = 11
WRAP = 88
LINES_PER_PAGE = (PAGE_H - 2 * MARGIN) // LEADING


def _escape(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _lines(text: str) -> list[str]:
    out: list[str] = []
    for paragraph in text.split("\n"):
        out.extend(textwrap.wrap(paragraph, WRAP) or [""])
    return out


def render_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A PDF with one or more pages of text; long pages continue on new pages."""
    page_lines: list[list[str]] = []
    for text in pages:
        lines = _lines(text)
        for i in range(0, max(1, len(lines)), LINES_PER_PAGE):
            page_lines.append(lines[i : i + LINES_PER_PAGE])
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in below, once the pages object number is known
    pages_id = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    kids = []
    for lines in page_lines:
        ops = [f"BT /F1 {FONT_SIZE} Tf {LEADING} TL {MARGIN} {PAGE_H - MARGIN} Td"]
        ops += [f"({_escape(line)}) Tj T*" for line in lines]
        ops.append("ET")
        stream = zlib.compress("\n".join(ops).encode("latin-1"))
        content = add(
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream)
            + stream
            + b"\nendstream"
        )
        kids.append(
            add(
                (
                    f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] "
                    f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {content} 0 R >>"
                ).encode()
            )
        )
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R >>".encode()
    kid_refs = " ".join(f"{k} 0 R" for k in kids)
    objects[pages_id - 1] = f"<< /Type /Pages /Kids [{kid_refs}] /Count {len(kids)} >>".encode()
    info = add(f"<< /Title ({_escape(title or '')}) /Producer (edgelm) >>".encode("latin-1"))

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        catalog,
        info,
        xref,
    )
    return bytes(out)


def write_pdf(path: Path, pages: list[str], title: str | None = None) -> Path:
    path.write_bytes(render_pdf(pages, title))
    return path
