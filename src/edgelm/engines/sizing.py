"""How many streams a llama.cpp model decodes together when ``compute.parallel`` is "auto".

Streams queue beyond ``compute.parallel``: with 4 on 2 cores, 8 concurrent clients waited
2.4-3.8 s for their first token (TTFT p90) against 0.46 s with 8, and 8 also gave more tokens
per second in all, because a decode step for N sequences reads the weights once. What bounds
the count is memory (each stream has n_ctx cells of KV cache, and without flash attention a
prompt batch's attention scores span every cell of the shared pool) and compute (past ~4
streams a core, a step's matmuls are compute-bound and every stream slows as much as the
batch grows, so more streams only queue inside the batch instead of outside it).

:func:`auto_parallel` is pure: sizes in, a count and the reasoning out, so ``config list``,
the model's status and tests compute it the same way; the KV bytes per token are an input
(they depend on ``compute.kv_type``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgelm.settings import PoolSettings

MAX_STREAMS = 16
"""More streams than this make each one too slow to be worth serving at once on a CPU."""
STREAMS_PER_CORE = 4
"""Measured on 2 cores (Qwen2.5-0.5B): a step for 8 sequences took 89 ms where 1 took 36 ms;
past ~4 per core the step time grows as fast as the batch."""
OVERHEAD_BYTES = 64 * 2**20
"""Buffers besides weights and KV (output logits, graph), per model."""


@dataclass(frozen=True)
class ParallelChoice:
    streams: int
    by_memory: int
    by_compute: int
    reason: str


def memory_budget_bytes(pool: PoolSettings) -> int:
    """``pool.memory_budget_mb``, or 75% of the RAM when it is 0: what all loaded models may
    use together."""
    if pool.memory_budget_mb:
        return pool.memory_budget_mb * 2**20
    import psutil

    return int(psutil.virtual_memory().total * 0.75)


def auto_parallel(
    *,
    kv_bytes_per_token: int,
    n_ctx: int,
    weights_bytes: int,
    memory_bytes: int,
    cores: int,
    scratch_bytes_per_token: int = 0,
    shared_bytes: int = 0,
    cap: int = MAX_STREAMS,
) -> ParallelChoice:
    """The stream count for a model: as many as ``memory_bytes`` (this model's share of the
    memory budget) holds after its weights, at ``(kv_bytes_per_token +
    scratch_bytes_per_token) × n_ctx`` a stream, at most ``STREAMS_PER_CORE`` per core and
    ``cap``, at least 1. ``scratch_bytes_per_token``: attention scratch per KV cell (a prompt
    micro-batch's scores without flash attention, when they span every stream's cells; 0 with
    it). ``shared_bytes``: held once whatever the count (those scores when they span one
    stream's cells, a prefill context's cache)."""
    per_stream = max(0, kv_bytes_per_token + scratch_bytes_per_token) * max(1, n_ctx)
    room = memory_bytes - weights_bytes - OVERHEAD_BYTES - shared_bytes
    by_memory = room // per_stream if per_stream else cap
    by_memory = max(0, int(by_memory))
    by_compute = STREAMS_PER_CORE * max(1, cores)
    streams = max(1, min(cap, by_memory, by_compute))
    limits = {
        "memory": by_memory,
        f"{STREAMS_PER_CORE} per core": by_compute,
        "the cap": cap,
    }
    bound = min(limits, key=lambda k: limits[k])
    why = (
        f"{streams} stream{'s' if streams != 1 else ''}, bounded by {bound}: "
        f"{per_stream / 2**20:.0f} MiB a stream (KV {kv_bytes_per_token / 1024:.1f} KiB"
        f"{f' + scratch {scratch_bytes_per_token / 1024:.1f} KiB' if scratch_bytes_per_token else ''}"
        f" a token x {n_ctx} tokens); {max(0, room) / 2**20:.0f} MiB of the "
        f"{memory_bytes / 2**20:.0f} MiB memory share left after the "
        f"{weights_bytes / 2**20:.0f} MiB weights"
        f"{f' and {shared_bytes / 2**20:.0f} MiB held once' if shared_bytes else ''}"
        f" hold {by_memory}; {cores} cores x "
        f"{STREAMS_PER_CORE} = {by_compute}; cap {cap}"
    )
    if by_memory < 1:
        why += " (memory holds not even one: 1 anyway, the pool's budget check decides)"
    return ParallelChoice(streams, by_memory, by_compute, why)


def memory_share(pool: PoolSettings) -> int:
    """One model's share of the memory budget: the budget over ``pool.max_loaded``, so that
    the most models the pool keeps can all be loaded with their streams."""
    return memory_budget_bytes(pool) // max(1, pool.max_loaded)
