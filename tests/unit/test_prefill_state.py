"""Moving a sequence's KV state between a flash-attention context and a plain one.

The states here are built by hand in llama.cpp's layout (llama-kv-cache.cpp's state_write):
the header, a stream count, per stream a cell count, each cell's position and sequence id,
then per layer K rows and V, as rows of cells (flash attention) or transposed (without it).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgelm.engines.prefill_context import (
    _STATE_MAGIC,
    StateFormatError,
    convert_seq_state,
)

LAYERS, K_EMBD, V_EMBD = 3, 8, 6


def cells_block(positions: list[int], k: np.ndarray, v: np.ndarray, v_trans: bool) -> bytes:
    """One stream's cells: meta, then data with V in the given layout. ``k``, ``v``: arrays
    (layer, cell, embd) of float16."""
    out = [struct.pack("<iIi", pos, 1, 0) for pos in positions]
    out.append(struct.pack("<II", int(v_trans), LAYERS))
    for layer in range(LAYERS):
        out.append(struct.pack("<iQ", 1, K_EMBD * 2))
        out.append(k[layer].tobytes())
    for layer in range(LAYERS):
        if v_trans:
            out.append(struct.pack("<iII", 1, 2, V_EMBD))
            out.append(np.ascontiguousarray(v[layer].T).tobytes())
        else:
            out.append(struct.pack("<iQ", 1, V_EMBD * 2))
            out.append(v[layer].tobytes())
    return b"".join(out)


def section(block: bytes, cells: int, n_stream: int, where: int = 0) -> bytes:
    counts = [0] * n_stream
    parts = [struct.pack("<I", n_stream)]
    for s in range(n_stream):
        if s == where:
            parts += [struct.pack("<I", cells), block]
        else:
            parts.append(struct.pack("<I", counts[s]))
    return b"".join(parts)


def state(*sections: bytes, seq: int = 0) -> bytes:
    return struct.pack("<Ii", _STATE_MAGIC, seq) + b"".join(sections)


@pytest.fixture
def kv() -> tuple[list[int], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    cells = 5
    k = rng.standard_normal((LAYERS, cells, K_EMBD)).astype(np.float16)
    v = rng.standard_normal((LAYERS, cells, V_EMBD)).astype(np.float16)
    return list(range(cells)), k, v


def test_a_flash_attention_state_becomes_the_transposed_layout_and_back(kv) -> None:
    positions, k, v = kv
    rows = state(section(cells_block(positions, k, v, v_trans=False), 5, n_stream=1))
    transposed = state(section(cells_block(positions, k, v, v_trans=True), 5, n_stream=1))
    assert convert_seq_state(rows, v_trans=True, n_stream=1) == transposed
    assert convert_seq_state(transposed, v_trans=False, n_stream=1) == rows
    # Already in the asked layout: unchanged.
    assert convert_seq_state(rows, v_trans=False, n_stream=1) == rows


def test_the_stream_count_is_that_of_the_reading_context(kv) -> None:
    """A single-sequence context has one stream, a context with a stream per sequence has
    one per slot: the sequence's cells go first, the other streams are written empty."""
    positions, k, v = kv
    one = state(section(cells_block(positions, k, v, v_trans=False), 5, n_stream=1), seq=0)
    four = convert_seq_state(one, v_trans=True, n_stream=4)
    expected = state(section(cells_block(positions, k, v, v_trans=True), 5, n_stream=4))
    assert four == expected
    # From the third of four streams (sequence 2 of a plain context) to a one-stream context.
    third = state(section(cells_block(positions, k, v, True), 5, n_stream=4, where=2), seq=2)
    back = convert_seq_state(third, v_trans=False, n_stream=1)
    assert back == state(section(cells_block(positions, k, v, False), 5, n_stream=1), seq=2)


def test_every_kv_cache_section_is_converted(kv) -> None:
    """Models with sliding-window layers save two caches one after the other."""
    positions, k, v = kv
    block_rows = cells_block(positions, k, v, v_trans=False)
    two = state(section(block_rows, 5, 1), section(block_rows, 5, 1))
    block_t = cells_block(positions, k, v, v_trans=True)
    assert convert_seq_state(two, v_trans=True, n_stream=2) == state(
        section(block_t, 5, 2), section(block_t, 5, 2)
    )


def test_an_empty_sequence_stays_empty() -> None:
    assert convert_seq_state(state(section(b"", 0, 1)), v_trans=True, n_stream=3) == state(
        struct.pack("<IIII", 3, 0, 0, 0)
    )


def test_what_is_not_a_sequence_state_is_refused(kv) -> None:
    positions, k, v = kv
    good = state(section(cells_block(positions, k, v, v_trans=False), 5, n_stream=1))
    with pytest.raises(StateFormatError):
        convert_seq_state(b"\x00" * 64, v_trans=True, n_stream=1)
    with pytest.raises(StateFormatError):
        convert_seq_state(good[:-7], v_trans=True, n_stream=1)
    quantised = good.replace(struct.pack("<iQ", 1, V_EMBD * 2), struct.pack("<iQ", 8, 12))
    with pytest.raises(StateFormatError):
        convert_seq_state(quantised, v_trans=True, n_stream=1)
