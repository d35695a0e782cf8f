"""llama-bench style micro benchmark: the raw engine's prompt-processing (pp) and token
generation (tg) speed, without HTTP, templates or sampling. It is the reference that the
service's own decode speed and TTFT are compared against, as a ratio measured in the same run.

The tg row also says where decode stands against the machine: each generated token reads
(nearly) all the weights once, so weights × tokens/s is the read traffic decode needs, set
against the memory read bandwidth measured here with the same number of threads. Far below
100% means decode is compute-bound (the case on 2 cores), near it means bandwidth-bound.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelm.catalog import Catalog
from edgelm.engines import create_engine
from edgelm.model_cache import ModelStore
from edgelm.settings import Settings

if TYPE_CHECKING:
    from edgelm.variants import Measure


def memory_bandwidth(threads: int, size_mb: int = 512, reps: int = 3) -> float:
    """Memory read bandwidth in GB/s: ``threads`` threads each summing their part of a buffer
    far larger than the caches (numpy releases the GIL while it sums); the best of ``reps``."""
    threads = max(1, threads)
    data = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            start = time.perf_counter()
            total = sum(pool.map(np.sum, parts))
            seconds = time.perf_counter() - start
            if total != data.size:  # the sums were really computed
                raise RuntimeError("bandwidth probe read wrong data")
            best = max(best, data.nbytes / seconds / 1e9)
    return best


class RawEngine:
    """One catalog model loaded for raw measurements, warmed up (weights paged in, graphs
    built): the llama-bench-style reference that ``micro_bench`` and the interleaved runs of
    ``edgelm bench run --interleave --micro`` read."""

    def __init__(self, alias: str, settings: Settings):
        from edgelm.variants import VariantChooser

        catalog = Catalog.load(settings.home)
        store = ModelStore(settings)
        # The name its rows carry: the one asked for, as the bench's targets name it
        # ("qwen2.5-0.5b:gguf" is not the variant its bare alias may be served by).
        self.name = alias
        # What the alias serves with (its fastest variant measured here, unless named/pinned),
        # so raw figures line up with the service's for the same name.
        self.entry = VariantChooser(settings, store.is_ready).choose(catalog, alias).entry
        self.engine_name = self.entry.engine_name(settings.compute.engine)
        path = store.require(self.entry) if self.entry.needs_file else None
        self.engine = create_engine(self.entry, settings, path)
        try:
            self.engine.require("raw_speed")
            self.engine.raw_speed(32, 4)
        except BaseException:
            self.engine.close()
            raise
        self.threads = self.engine.threads
        weights = getattr(self.engine, "model_path", None)
        self.weights_bytes: int | None = weights.stat().st_size if weights is not None else None

    def pp(self, n: int, seed: int = 0) -> float:
        """Prompt processing: tokens/s reading ``n`` random tokens from an empty context."""
        return n / self.engine.raw_speed(n, 0, seed=seed)[0]

    def tg(self, n: int, seed: int = 0) -> float:
        """Token generation: tokens/s of ``n`` single-token steps from an empty context (as
        llama-bench: at 512 tokens of context attention already costs Qwen2.5-0.5B ~5%)."""
        return n / self.engine.raw_speed(0, n, seed=seed)[1]

    def close(self) -> None:
        self.engine.close()


def tg_row(raw: RawEngine, test: str, rates: list[float]) -> dict[str, Any]:
    """A tg row: mean ± std tokens/s, and where that stands against memory bandwidth."""
    row = _row(raw, test, rates)
    if raw.weights_bytes:
        bandwidth = memory_bandwidth(raw.threads or 1)
        need = row["tokens_per_s"] * raw.weights_bytes / 1e9
        row.update(
            weights_mb=round(raw.weights_bytes / 2**20, 1),
            weights_gb_per_s=round(need, 2),
            memory_gb_per_s=round(bandwidth, 2),
            bandwidth_share=round(need / bandwidth, 3),
        )
    return row


def _row(raw: RawEngine, test: str, rates: list[float]) -> dict[str, Any]:
    return {
        "model": raw.name,
        "engine": raw.engine_name,
        "threads": raw.threads,
        "test": test,
        "reps": len(rates),
        "tokens_per_s": round(statistics.fmean(rates), 2),
        "std": round(statistics.stdev(rates), 2) if len(rates) > 1 else 0.0,
    }


def micro_bench(
    alias: str, settings: Settings, n_prompt: int = 512, n_gen: int = 128, reps: int = 3
) -> list[dict[str, Any]]:
    """Rows like llama-bench's: one for pp{n_prompt} and one for tg{n_gen}, mean ± std t/s."""
    raw = RawEngine(alias, settings)
    try:
        pp_rates = [raw.pp(n_prompt, seed=rep) for rep in range(reps)] if n_prompt else []
        tg_rates = [raw.tg(n_gen, seed=rep) for rep in range(reps)] if n_gen else []
        rows = [_row(raw, f"pp{n_prompt}", pp_rates)] if pp_rates else []
        if tg_rates:
            rows.append(tg_row(raw, f"tg{n_gen}", tg_rates))
        return rows
    finally:
        raw.close()


def micro_measure(n_prompt: int, n_gen: int, reps: int) -> Measure:
    """The micro bench as ``edgelm model optimize`` measures each variant with it."""

    def measure(alias: str, settings: Settings) -> Sequence[dict[str, Any]]:
        return micro_bench(alias, settings, n_prompt=n_prompt, n_gen=n_gen, reps=reps)

    return measure
