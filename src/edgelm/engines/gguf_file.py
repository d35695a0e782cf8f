"""A GGUF file's own description of its size, checked before llama.cpp maps it.

llama.cpp refuses most broken files with one message for every cause ("failed to load
model"); a cut-off download deserves one that says so and by how much. The header lists every
tensor with its type, shape and offset, so the bytes the file must hold are known from the
first few kilobytes: :func:`check_gguf_size` reads them and compares with the file's size.
Tensor types this table does not know leave the check to llama.cpp.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from edgelm.errors import ModelLoadError

# ggml type id → (bytes per block, values per block), from ggml's type traits.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (4, 1),  # F32
    1: (2, 1),  # F16
    2: (18, 32),  # Q4_0
    3: (20, 32),  # Q4_1
    6: (22, 32),  # Q5_0
    7: (24, 32),  # Q5_1
    8: (34, 32),  # Q8_0
    9: (36, 32),  # Q8_1
    10: (84, 256),  # Q2_K
    11: (110, 256),  # Q3_K
    12: (144, 256),  # Q4_K
    13: (176, 256),  # Q5_K
    14: (210, 256),  # Q6_K
    15: (292, 256),  # Q8_K
    16: (66, 256),  # IQ2_XXS
    17: (74, 256),  # IQ2_XS
    18: (98, 256),  # IQ3_XXS
    19: (50, 256),  # IQ1_S
    20: (18, 32),  # IQ4_NL
    21: (110, 256),  # IQ3_S
    22: (82, 256),  # IQ2_S
    23: (136, 256),  # IQ4_XS
    24: (1, 1),  # I8
    25: (2, 1),  # I16
    26: (4, 1),  # I32
    27: (8, 1),  # I64
    28: (8, 1),  # F64
    29: (56, 256),  # IQ1_M
    30: (2, 1),  # BF16
}
# Sizes of GGUF metadata value types (8: string and 9: array are read specially).
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# Sanity bounds: a header claiming more is not a model file but damage.
MAX_ENTRIES = 1 << 20
MAX_STRING = 1 << 26


class _Damaged(Exception):
    pass


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_UINTS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: _U32, 8: _U64}


class _Reader:
    """Reads the header from a memory map (a vocabulary is 150,000 strings: one small read
    each through a file object took a quarter of a second)."""

    def __init__(self, data: mmap.mmap):
        self.data = data
        self.at = 0

    def uint(self, codec: struct.Struct) -> int:
        if self.at + codec.size > len(self.data):
            raise _Damaged("the header ends early")
        (value,) = codec.unpack_from(self.data, self.at)
        self.at += codec.size
        return int(value)

    def string(self) -> bytes:
        length = self.uint(_U64)
        if length > MAX_STRING or self.at + length > len(self.data):
            raise _Damaged(f"a string of {length} bytes in the header")
        value = self.data[self.at : self.at + length]
        self.at += length
        return value

    def skip_strings(self, count: int) -> None:
        data, at, size, unpack = self.data, self.at, len(self.data), _U64.unpack_from
        for _ in range(count):
            if at + 8 > size:
                raise _Damaged("the header ends early")
            at += 8 + unpack(data, at)[0]
        if at > size:
            raise _Damaged("the header ends early")
        self.at = at

    def skip_value(self, kind: int) -> int | None:
        """Skip one metadata value; return it when it is an unsigned integer (alignment)."""
        if kind == _STRING:
            self.string()
            return None
        if kind == _ARRAY:
            inner, count = self.uint(_U32), self.uint(_U64)
            if count > MAX_STRING:
                raise _Damaged(f"an array of {count} values in the header")
            if inner in _SCALARS:
                self.at += _SCALARS[inner] * count
            elif inner == _STRING:
                self.skip_strings(count)
            else:
                for _ in range(count):
                    self.skip_value(inner)
            return None
        if kind not in _SCALARS:
            raise _Damaged(f"unknown metadata type {kind}")
        value = self.uint(_UINTS[_SCALARS[kind]])
        return value if kind in (0, 2, 4, 10) else None


def gguf_data_size(path: Path) -> int | None:
    """Bytes the file must have to hold every tensor its header lists, or None when it uses a
    tensor type this module does not know. Raises ModelLoadError for a damaged header."""
    with path.open("rb") as handle:
        if path.stat().st_size < 24:
            raise ModelLoadError(f"{path} is not a GGUF model file: it has only a few bytes")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reader = _Reader(data)
            try:
                data_start, end, known = _tensor_extent(reader)
            except _Damaged as exc:
                raise ModelLoadError(f"{path} is not a readable GGUF model file: {exc}") from None
    return data_start + end if known else None


def _tensor_extent(reader: _Reader) -> tuple[int, int, bool]:
    """(where tensor data starts, where the last tensor ends after that, every type known)."""
    if reader.data[:4] != b"GGUF":
        raise _Damaged("it does not start with 'GGUF'")
    reader.at = 4
    version = reader.uint(_U32)
    if version not in (2, 3):
        raise _Damaged(f"GGUF version {version} is not one llama.cpp reads")
    n_tensors, n_kv = reader.uint(_U64), reader.uint(_U64)
    if n_tensors > MAX_ENTRIES or n_kv > MAX_ENTRIES:
        raise _Damaged(f"the header claims {n_tensors} tensors and {n_kv} keys")
    alignment = 32
    for _ in range(n_kv):
        key = reader.string()
        value = reader.skip_value(reader.uint(_U32))
        if key == b"general.alignment" and value:
            alignment = value
    end = 0
    known = True
    for _ in range(n_tensors):
        reader.string()
        dims = reader.uint(_U32)
        if dims > 8:
            raise _Damaged(f"a tensor with {dims} dimensions")
        count = 1
        for _ in range(dims):
            count *= reader.uint(_U64)
        kind, offset = reader.uint(_U32), reader.uint(_U64)
        if kind not in GGML_TYPES:
            known = False
            continue
        block_bytes, block_values = GGML_TYPES[kind]
        end = max(end, offset + count // block_values * block_bytes)
    return -(-reader.at // alignment) * alignment, end, known


def check_gguf_size(path: Path, model_id: str) -> None:
    """Refuse a file shorter than its own header says, naming how much is missing."""
    need = gguf_data_size(path)
    have = path.stat().st_size
    if need is not None and have < need:
        raise ModelLoadError(
            f"the file of '{model_id}' ({path}) is truncated: it has {have:,} bytes of the "
            f"{need:,} its tensors need (an interrupted download?); re-download it with "
            f"'edgelm model download {model_id} --force'"
        )
