"""KV cache bytes per token by cache type: what the memory estimate and the automatic
``compute.parallel`` count streams by."""

from __future__ import annotations

import pytest

from edgelm.engines.llamacpp import kv_bytes_per_token

# Qwen2.5-0.5B's attention: 24 layers, 14 query heads, 2 KV heads of 64 values.
QWEN_05B = {
    "general.architecture": "qwen2",
    "qwen2.block_count": "24",
    "qwen2.attention.head_count": "14",
    "qwen2.attention.head_count_kv": "2",
    "qwen2.embedding_length": "896",
}


def test_bytes_per_token_follow_the_cache_type() -> None:
    f16 = kv_bytes_per_token(QWEN_05B)
    assert f16 == kv_bytes_per_token(QWEN_05B, "f16") == 2 * 24 * 2 * 64 * 2
    assert kv_bytes_per_token(QWEN_05B, "q8_0") == 2 * 24 * 2 * 64 // 32 * 34
    assert kv_bytes_per_token(QWEN_05B, "q4_0") == 2 * 24 * 2 * 64 // 32 * 18
    # The target: q8_0 fits at least 1.8x the streams of f16 in the same memory.
    assert f16 / kv_bytes_per_token(QWEN_05B, "q8_0") >= 1.8


def test_unknown_type_and_missing_metadata() -> None:
    with pytest.raises(ValueError, match="unknown KV cache type"):
        kv_bytes_per_token(QWEN_05B, "q2_k")
    assert kv_bytes_per_token({"general.architecture": "bert"}, "q8_0") == 0
