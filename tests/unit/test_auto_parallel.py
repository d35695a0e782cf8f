"""compute.parallel "auto": the stream count from model sizes, memory share and cores."""

from __future__ import annotations

import pytest

from edgelm.engines.sizing import (
    MAX_STREAMS,
    auto_parallel,
    memory_budget_bytes,
    memory_share,
)
from edgelm.errors import ConfigError
from edgelm.settings import PoolSettings, load_settings

MiB, GiB = 2**20, 2**30
# Qwen2.5-0.5B: 24 layers x 2 KV heads x 64 dims x (K, V) x 2 bytes; 14 query heads
QWEN05_KV = 24 * 2 * 64 * 2 * 2
QWEN05_SCRATCH = 512 * 14 * 4  # a 512-row prompt micro-batch's f32 scores per KV cell
QWEN05_WEIGHTS = 491_400_064
# Qwen2.5-1.5B: 28 layers x 2 KV heads x 128 dims
QWEN15_KV = 28 * 2 * 128 * 2 * 2
QWEN15_WEIGHTS = 1_117_320_768


def test_two_cores_and_plenty_of_memory_give_eight_streams() -> None:
    choice = auto_parallel(
        kv_bytes_per_token=QWEN05_KV,
        n_ctx=4096,
        weights_bytes=QWEN05_WEIGHTS,
        memory_bytes=int(4.5 * GiB),
        cores=2,
        scratch_bytes_per_token=QWEN05_SCRATCH,
    )
    assert choice.streams == 8 and choice.by_compute == 8
    # (4608 - 468.6 - 64) MiB over 160 MiB a stream
    assert choice.by_memory == 25
    assert "bounded by 4 per core" in choice.reason
    assert "160 MiB a stream" in choice.reason


def test_memory_bounds_a_big_context() -> None:
    """32k-token streams of the 0.5B model in a 2 GiB share: 384 MiB of f16 KV each."""
    choice = auto_parallel(
        kv_bytes_per_token=QWEN05_KV,
        n_ctx=32768,
        weights_bytes=QWEN05_WEIGHTS,
        memory_bytes=2 * GiB,
        cores=4,
    )
    assert choice.streams == 3 and choice.by_memory == 3
    assert "bounded by memory" in choice.reason


def test_a_smaller_kv_type_fits_more_streams() -> None:
    """KV bytes per token are an input: a q8_0 cache (34 bytes per 32 values) about halves
    them, and the count roughly doubles where memory bounds it."""
    q8 = -(-(24 * 2 * 64 * 2) // 32) * 34
    f16 = auto_parallel(
        kv_bytes_per_token=QWEN05_KV,
        n_ctx=32768,
        weights_bytes=QWEN05_WEIGHTS,
        memory_bytes=2 * GiB,
        cores=4,
    )
    q8_0 = auto_parallel(
        kv_bytes_per_token=q8,
        n_ctx=32768,
        weights_bytes=QWEN05_WEIGHTS,
        memory_bytes=2 * GiB,
        cores=4,
    )
    assert q8_0.streams == 7 > f16.streams


def test_a_model_that_barely_fits_gets_one_stream() -> None:
    choice = auto_parallel(
        kv_bytes_per_token=QWEN15_KV,
        n_ctx=4096,
        weights_bytes=QWEN15_WEIGHTS,
        memory_bytes=1 * GiB,
        cores=2,
    )
    assert choice.streams == 1 and choice.by_memory == 0
    assert "not even one" in choice.reason


def test_many_cores_stop_at_the_cap() -> None:
    choice = auto_parallel(
        kv_bytes_per_token=QWEN05_KV,
        n_ctx=4096,
        weights_bytes=QWEN05_WEIGHTS,
        memory_bytes=64 * GiB,
        cores=16,
    )
    assert choice.streams == MAX_STREAMS == 16
    assert "bounded by the cap" in choice.reason


def test_one_core_gives_four_streams() -> None:
    choice = auto_parallel(
        kv_bytes_per_token=QWEN05_KV,
        n_ctx=2048,
        weights_bytes=QWEN05_WEIGHTS,
        memory_bytes=8 * GiB,
        cores=1,
    )
    assert choice.streams == 4


def test_budget_and_share_come_from_the_pool_settings() -> None:
    pool = PoolSettings(memory_budget_mb=8192, max_loaded=4)
    assert memory_budget_bytes(pool) == 8 * GiB
    assert memory_share(pool) == 2 * GiB
    default = PoolSettings()
    assert memory_budget_bytes(default) > 0
    assert memory_share(default) == memory_budget_bytes(default) // 4


def test_settings_take_auto_or_a_count() -> None:
    settings = load_settings({}, env={})
    assert settings.compute.parallel == "auto" and settings.compute.threads == "auto"
    assert settings.compute.fixed_threads == 0
    fixed = load_settings({"compute.parallel": 8, "compute.threads": 2}, env={})
    assert (fixed.compute.parallel, fixed.compute.threads, fixed.compute.fixed_threads) == (8, 2, 2)
    from_env = load_settings(env={"EDGELM_COMPUTE__PARALLEL": "6", "EDGELM_COMPUTE__THREADS": "1"})
    assert (from_env.compute.parallel, from_env.compute.threads) == (6, 1)
    for bad in ({"compute.parallel": 0}, {"compute.parallel": 65}, {"compute.threads": -1}):
        with pytest.raises(ConfigError, match="compute"):
            load_settings(bad, env={})
    with pytest.raises(ConfigError, match="auto"):
        load_settings({"compute.parallel": "many"}, env={})


def test_config_list_says_what_auto_comes_to(isolated_home) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_cli_scripting import as_json, run

    rows = {row["key"]: row for row in as_json("config", "list")}
    threads, parallel = rows["compute.threads"], rows["compute.parallel"]
    assert threads["value"] == "auto" and threads["type"] == "int | 'auto'"
    assert threads["effective"].startswith("up to ")
    assert parallel["value"] == "auto"
    assert "decided when a model loads" in parallel["effective"]
    assert "not downloaded" in parallel["effective"]
    assert "effective" not in rows["service.port"]
    assert run("config", "set", "compute.parallel", "6").exit_code == 0
    rows = {row["key"]: row for row in as_json("config", "list")}
    assert rows["compute.parallel"]["value"] == "6" and "effective" not in rows["compute.parallel"]
    table = run("config", "list", env={"COLUMNS": "250"}).stdout
    assert "auto (up to " in table


def test_service_status_shows_threads_streams_and_why(capsys) -> None:  # type: ignore[no-untyped-def]
    from edgelm.cli.service_cmd import _print_status

    runtime = {
        "threads": 1,
        "threads_max": 2,
        "threads_mode": "auto",
        "threads_reason": "other processes use 1.0 of 2 cores",
        "parallel_reason": "compute.parallel = auto: 8 streams, bounded by 4 per core",
        "slots": 8,
    }
    model = {"id": "m", "engine": "llamacpp", "memory_bytes": 10**9, "requests": 3}
    data = {
        "version": "x",
        "uptime_s": 1,
        "model_dir": "/m",
        "loaded": [
            {**model, "idle_seconds": 0.5, "runtime": runtime},
            {**model, "id": "fixed", "idle_seconds": 1, "runtime": {"threads": 2, "slots": 4}},
            {**model, "id": "remote", "idle_seconds": 1, "runtime": {}},
        ],
    }
    _print_status("http://x", data)
    out = capsys.readouterr().out
    assert "1 of 2 (auto)" in out
    assert "m: other processes use 1.0 of 2 cores" in out
    assert "m: compute.parallel = auto: 8 streams" in out
    lines = out.splitlines()
    assert any("fixed" in line and " 2 " in line and " 4 " in line for line in lines)
    assert any("remote" in line and " - " in line for line in lines)


def test_scratch_held_once_does_not_grow_with_the_streams() -> None:
    """With a KV stream per sequence a prompt micro-batch's attention scores span one
    stream's cells: held once, not per stream as in a shared pool."""
    per_cell = QWEN05_SCRATCH
    sizes = {
        "kv_bytes_per_token": QWEN05_KV,
        "n_ctx": 32768,
        "weights_bytes": QWEN05_WEIGHTS,
        "memory_bytes": 4 * GiB,
        "cores": 8,
    }
    shared_pool = auto_parallel(**sizes, scratch_bytes_per_token=per_cell)
    per_sequence = auto_parallel(**sizes, shared_bytes=per_cell * 32768)
    # (4096 - 468.6 - 64) MiB holds 2 streams of 1280 MiB (384 KV + 896 scores), or, once
    # 896 MiB of scores are set aside, 6 of 384 MiB
    assert (shared_pool.streams, per_sequence.streams) == (2, 6)
    assert "896 MiB held once" in per_sequence.reason


def test_the_flash_attention_prefill_context_is_reserved_once() -> None:
    """With long prompts read in a second context (flash_attn auto), the automatic stream
    count leaves room for that context's n_ctx cells, once: without it, streams sized to fill
    the share were pushed over it when the first long prompt opened the context."""
    from edgelm.engines.llamacpp import PREFILL_CONTEXT_EXTRA, plan_streams

    meta = {
        "general.architecture": "qwen2",
        "qwen2.block_count": "24",
        "qwen2.attention.head_count": "14",
        "qwen2.attention.head_count_kv": "2",
        "qwen2.embedding_length": "896",
    }
    n_ctx, share = 32768, 2 * GiB  # memory, not the cores, bounds it
    args = (meta, n_ctx, 512, QWEN05_WEIGHTS, share, True)  # flash attention: no scores
    without = plan_streams(*args)
    with_prefill = plan_streams(*args, prefill_context=True)
    per_stream = QWEN05_KV * n_ctx  # 384 MiB
    room = share - QWEN05_WEIGHTS - 64 * 2**20
    assert without.streams == room // per_stream == 3
    assert with_prefill.streams == (room - per_stream - PREFILL_CONTEXT_EXTRA) // per_stream == 2
    assert f"{(per_stream + PREFILL_CONTEXT_EXTRA) // 2**20} MiB held once" in with_prefill.reason
