"""Long prompts read with flash attention, answers decoded without it.

llama.cpp's flash attention reads prompts faster than its plain attention on CPUs but decodes
slower once tokens are cached: for one new token its CPU kernel walks the cache a row at a
time. Measured with ``llama-bench`` (Qwen2.5-0.5B Q4_K_M, 2 threads) on one machine: pp2048
177 against 156 tok/s, tg32 20.5 against 27.2 after 512 cached tokens and 10.6 against 20.1
after 4k. llama.cpp's server runs it for both, so it reads long prompts faster than a context
without it and then decodes slower. (How much faster varies with the CPU; through the service
on an AVX-512 machine, time to first token fell 7-14% at 512 to 8k tokens.)

llama.cpp fixes flash attention per context, and the choice also fixes the V cache's layout
(transposed without it; a sequence's saved state of one layout is refused by a context of the
other). So the llama.cpp engine keeps a second, single-sequence context on the same weights
with flash attention on (:class:`PrefillContext`): a prompt with many tokens to read is read
there, its first token is sampled from that context's logits, and its KV entries are then
moved into the decoding context's slot (:func:`convert_seq_state` transposes V on the way,
about 20 ms per thousand tokens for Qwen2.5-0.5B). The answer is decoded at the speed of plain
attention. The scheduler's side of it is in :mod:`edgelm.engines.batching`.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

# Fewest prompt tokens still to read for which a prompt goes to the prefill context. Not tuned
# finely: at 256 tokens flash attention saves on the order of 0.1 s (7-11% of a ~1.3 s read on
# Qwen2.5-0.5B, 2 cores) against ~5 ms to move the entries; shorter prompts gain less, and a
# micro-batch of fewer than 64 rows takes another path through its CPU kernel anyway.
PREFILL_MIN_TOKENS = 256

# ggml types a V cache can be moved between layouts in: element bytes of f32 and f16 (a
# quantised V cache needs flash attention in both contexts, so it never moves).
_V_ELEMENT_BYTES = {0: 4, 1: 2}
# What llama.cpp's saved sequence states start with (llama-context.cpp's io_magic).
_STATE_MAGIC = 0xAF143CD8
# llama_kv_cell_ext (x, y, tok): saved per cell by models with 2D positions (M-RoPE).
_CELL_EXT_BYTES = 12


class StateFormatError(ValueError):
    """A saved sequence state this module cannot read (another memory kind or version)."""


def convert_seq_state(data: bytes, v_trans: bool, n_stream: int) -> bytes:
    """One sequence's KV state (``llama_state_seq_get_data``) in the layout a context with
    ``n_stream`` KV streams and V transposed (``v_trans``, flash attention off) or not reads.

    The state is llama.cpp's header (a magic number and the sequence id), then one section per
    KV cache of the model (two for models with sliding-window layers): a stream count, then
    per stream a cell count and, for the stream holding the sequence, the cells' positions and
    each layer's K rows and V data, V as rows of cells or transposed (a row per embedding
    element). A context reads a sequence's cells into that
    sequence's own stream whichever stream they came from, so the one non-empty stream goes
    first and the rest are written empty. Raises :class:`StateFormatError` on anything else.
    """
    view = memoryview(data)
    if len(view) < 8 or _unpack("<I", view, 0)[0] != _STATE_MAGIC:
        raise StateFormatError("not a llama.cpp sequence state")
    out: list[bytes | memoryview] = [view[:8]]
    at = 8
    while at < len(view):
        at = _convert_section(view, at, v_trans, n_stream, out)
    return b"".join(out)


def _convert_section(
    view: memoryview, at: int, v_trans: bool, n_stream: int, out: list[bytes | memoryview]
) -> int:
    (streams,) = _unpack("<I", view, at)
    at += 4
    blocks: list[tuple[int, int, int]] = []  # (cells, start, end) of non-empty streams
    for _ in range(streams):
        (cells,) = _unpack("<I", view, at)
        at += 4
        if cells:
            start = at
            at = _skip_cells(view, at, cells)
            blocks.append((cells, start, at))
    if len(blocks) > 1:
        raise StateFormatError("a sequence's cells span several KV streams")
    out.append(struct.pack("<I", n_stream))
    if not blocks:
        out.append(bytes(4 * n_stream))
        return at
    cells, start, end = blocks[0]
    out.append(struct.pack("<I", cells))
    out.append(_convert_cells(view[start:end], cells, v_trans))
    out.append(bytes(4 * (n_stream - 1)))
    return at


def _skip_cells(view: memoryview, at: int, cells: int) -> int:
    """The offset past one stream's cells (meta and data); the cell layout is found by trying
    each (with or without the per-cell extension) and keeping the one that parses."""
    for ext in (0, _CELL_EXT_BYTES):
        try:
            meta_end = _skip_meta(view, at, cells, ext)
            return _skip_data(view, meta_end, cells)[0]
        except (StateFormatError, struct.error):
            continue
    raise StateFormatError("unrecognised KV cell layout")


def _skip_meta(view: memoryview, at: int, cells: int, ext: int) -> int:
    cell = 4 + 4 + ext + 4  # position, seq-id count (1 for a single sequence), ext, seq id
    end = at + cells * cell
    if end > len(view):
        raise StateFormatError("truncated cell list")
    counts = np.frombuffer(view[at:end], dtype="<u4").reshape(cells, cell // 4)[:, 1]
    if not (counts == 1).all():
        raise StateFormatError("not a single sequence's cells")
    return end


def _skip_data(view: memoryview, at: int, cells: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Offset past the data, and each V layer's (type, row bytes or element bytes, start)."""
    trans, layers = _unpack("<II", view, at)
    if trans not in (0, 1) or not 0 < layers < 4096:
        raise StateFormatError("implausible layer header")
    at += 8
    for _ in range(layers):  # K: type, row bytes, rows
        _type, row = _unpack("<iQ", view, at)
        at += 12 + cells * row
    v_layers = []
    for _ in range(layers):
        if trans:
            v_type, size, embd = _unpack("<iII", view, at)
            v_layers.append((v_type, size * embd, at))
            at += 12 + cells * size * embd
        else:
            v_type, row = _unpack("<iQ", view, at)
            v_layers.append((v_type, row, at))
            at += 12 + cells * row
        if at > len(view):
            raise StateFormatError("truncated layer data")
    return at, v_layers


def _convert_cells(block: memoryview, cells: int, v_trans: bool) -> bytes | memoryview:
    """One stream's meta and data with V in the asked layout."""
    meta = _meta_size(block, cells)
    (trans,) = _unpack("<I", block, meta)
    if bool(trans) == v_trans:
        return block
    end, v_layers = _skip_data(block, meta, cells)
    k_end = v_layers[0][2] if v_layers else end
    parts: list[bytes | memoryview] = [
        block[:meta],
        struct.pack("<I", int(v_trans)),
        block[meta + 4 : k_end],
    ]
    for v_type, row, start in v_layers:
        size = _V_ELEMENT_BYTES.get(v_type)
        if size is None:
            raise StateFormatError(f"V cache of ggml type {v_type} cannot change layout")
        embd = row // size
        values = np.frombuffer(block[start + 12 : start + 12 + cells * row], dtype=f"<u{size}")
        if v_trans:  # rows of cells -> a row per element
            parts.append(struct.pack("<iII", v_type, size, embd))
            parts.append(values.reshape(cells, embd).T.tobytes())
        else:
            parts.append(struct.pack("<iQ", v_type, row))
            parts.append(values.reshape(embd, cells).T.tobytes())
    return b"".join(parts)


def _meta_size(block: memoryview, cells: int) -> int:
    for ext in (0, _CELL_EXT_BYTES):
        try:
            meta = _skip_meta(block, 0, cells, ext)
            if _skip_data(block, meta, cells)[0] == len(block):
                return meta
        except (StateFormatError, struct.error):
            continue
    raise StateFormatError("unrecognised KV cell layout")


def _unpack(fmt: str, view: memoryview, at: int) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if at + size > len(view):
        raise StateFormatError("truncated state")
    return struct.unpack_from(fmt, view, at)


def fill_sequence(batch: Any, tokens: Sequence[int], at: int) -> None:
    """Write ``tokens`` into a llama_batch as sequence 0 from position ``at``, with logits
    for the last one only (a prompt chunk)."""
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = at + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    batch.n_tokens = len(tokens)


def save_seq(lib: Any, ctx: Any, seq_id: int) -> bytes:
    """``seq_id``'s KV state in ``ctx`` (llama_state_seq_get_data)."""
    size = lib.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    written = lib.llama_state_seq_get_data(ctx, buf, size, seq_id)
    if written != size:
        raise RuntimeError(f"llama.cpp saved {written} of {size} state bytes")
    return bytes(buf)


def load_seq(lib: Any, ctx: Any, seq_id: int, state: bytes) -> bool:
    """Put a saved state into ``seq_id`` of ``ctx`` (replacing what it held); False when the
    context has no room for its cells (or refuses it), in which case the sequence is empty."""
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    return lib.llama_state_seq_set_data(ctx, buf, len(state), seq_id) == len(state)


class PrefillContext:
    """A single-sequence llama.cpp context with flash attention on, sharing the engine's
    loaded weights, in which long prompts are read (see the module docstring).

    It keeps what it last read as a prefix cache of its own (``tokens``), so prompts that
    share a long start (a RAG system prompt, an agent's tool list) read only the rest.
    Only the compute thread touches it.
    """

    def __init__(self, lib: Any, ctx: Any, n_vocab: int, n_batch: int):
        self._lib = lib
        self.ctx = ctx  # a llama_cpp._internals.LlamaContext
        self._n_vocab = n_vocab
        self.n_batch = n_batch
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._mem = lib.llama_get_memory(ctx.ctx)
        self.tokens: list[int] = []  # what sequence 0 holds, positions 0..len-1
        self.prompts = 0  # prompts read here

    def start(self, prompt: Sequence[int]) -> int:
        """Get ready to read ``prompt``: keep the longest prefix already held (leaving at
        least one token to read, whose logits give the first token); return its length."""
        keep = 0
        for a, b in zip(self.tokens, prompt, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)
        self._lib.llama_memory_seq_rm(self._mem, 0, keep, -1)
        del self.tokens[keep:]
        return keep

    def adopt(self, state: bytes, tokens: Sequence[int]) -> bool:
        """Take a prefix from the decoding context (its saved state in this context's layout)
        when it holds more of the next prompt than this context does."""
        if load_seq(self._lib, self.ctx.ctx, 0, state):
            self.tokens = list(tokens)
            return True
        self.tokens = []
        return False

    def read(self, chunk: Sequence[int], threads: int) -> int:
        """Evaluate the next ``chunk`` of the prompt; logits for its last row. Returns
        llama_decode's status (0: done)."""
        fill_sequence(self._batch, chunk, len(self.tokens))
        if self._lib.llama_n_threads(self.ctx.ctx) != threads:
            self._lib.llama_set_n_threads(self.ctx.ctx, threads, threads)
        status = int(self._lib.llama_decode(self.ctx.ctx, self._batch))
        if status == 0:
            self.tokens.extend(chunk)
        return status

    def logits(self) -> np.ndarray:
        """A copy of the last evaluated row's logits."""
        pointer = self._lib.llama_get_logits_ith(self.ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()

    def state(self) -> bytes:
        return save_seq(self._lib, self.ctx.ctx, 0)

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self.ctx.close()
