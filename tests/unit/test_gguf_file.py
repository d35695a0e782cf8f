"""The GGUF size check: a file shorter than its header says is called truncated, by how much."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from edgelm.engines.gguf_file import check_gguf_size, gguf_data_size
from edgelm.errors import ModelLoadError


def gguf(tensors: list[tuple[bytes, list[int], int, int]]) -> bytes:
    """A GGUF v3 header: one string key, one string array, general.alignment = 64, tensors."""

    def string(text: bytes) -> bytes:
        return struct.pack("<Q", len(text)) + text

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 3)
    head += string(b"general.name") + struct.pack("<I", 8) + string(b"tiny")
    head += string(b"tokenizer.tokens") + struct.pack("<IIQ", 9, 8, 2) + string(b"a") + string(b"bc")
    head += string(b"general.alignment") + struct.pack("<II", 4, 64)
    for name, dims, kind, offset in tensors:
        head += string(name) + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)
    return head + b"\0" * (-len(head) % 64)


def test_a_file_shorter_than_its_tensors_is_called_truncated(tmp_path: Path) -> None:
    # An F32 tensor of 4x8 values (128 bytes), then a Q4_0 one of 64 values (2 blocks, 36).
    header = gguf([(b"a", [4, 8], 0, 0), (b"b", [64], 2, 128)])
    need = len(header) + 128 + 36
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(header + b"\1" * (128 + 36))
    assert gguf_data_size(whole) == need
    check_gguf_size(whole, "tiny")  # complete: no error
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(header + b"\1" * 100)
    with pytest.raises(ModelLoadError, match=rf"'tiny'.*is truncated: it has {need - 64:,} bytes of the {need:,}"):
        check_gguf_size(cut, "tiny")


def test_a_damaged_header_is_refused_and_an_unknown_type_is_left_to_llama_cpp(
    tmp_path: Path,
) -> None:
    header = gguf([(b"a", [4], 0, 0)])
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(header[:40] + b"\xff" * 8 + header[48:] + b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        check_gguf_size(damaged, "x")
    strange = tmp_path / "strange.gguf"
    strange.write_bytes(gguf([(b"a", [4], 999, 0)]))
    assert gguf_data_size(strange) is None
    check_gguf_size(strange, "x")
