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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgelm.catalog import Catalog
from edgelm.engines import create_engine
from edgelm.errors import InvalidRequest, Unsupported
from edgelm.settings import Settings
from edgelm.store import ModelStore


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


def micro_bench(
    alias: str, settings: Settings, n_prompt: int = 512, n_gen: int = 128, reps: int = 3
) -> list[dict[str, Any]]:
    """Rows like llama-bench's: one for pp{n_prompt} and one for tg{n_gen}, mean ± std t/s."""
    catalog = Catalog.load(settings.home)
    entry = catalog.resolve(alias)
    store = ModelStore(settings)
    if entry.needs_file and not store.is_cached(entry):
        raise InvalidRequest(
            f"'{entry.alias}' is not downloaded; run: edgelm model download {alias}"
        )
    engine = create_engine(entry, settings, store.path_for(entry) if entry.needs_file else None)
    try:
        raw_speed = getattr(engine, "raw_speed", None)
        if raw_speed is None:
            raise Unsupported(f"the {engine.name} engine has no raw pp/tg benchmark")
        raw_speed(min(n_prompt, 32), min(n_gen, 4))  # warm-up: page in weights, build graphs
        pp_rates, tg_rates = [], []
        for rep in range(reps):
            # Two tests, as in llama-bench: tg starts from an empty context, not after the
            # prompt (at 512 tokens of context attention already costs Qwen2.5-0.5B ~5%).
            if n_prompt:
                pp_rates.append(n_prompt / raw_speed(n_prompt, 0, seed=rep)[0])
            if n_gen:
                tg_rates.append(n_gen / raw_speed(0, n_gen, seed=rep)[1])
        threads = getattr(engine, "threads", None)
        weights = getattr(engine, "model_path", None)
        weights_bytes = weights.stat().st_size if weights is not None else None
    finally:
        engine.close()
    rows = []
    for test, rates in ((f"pp{n_prompt}", pp_rates), (f"tg{n_gen}", tg_rates)):
        if rates:
            rows.append(
                {
                    "model": entry.alias,
                    "engine": entry.engine_name(settings.compute.engine),
                    "threads": threads,
                    "test": test,
                    "reps": reps,
                    "tokens_per_s": round(statistics.fmean(rates), 2),
                    "std": round(statistics.stdev(rates), 2) if len(rates) > 1 else 0.0,
                }
            )
    if tg_rates and weights_bytes:
        bandwidth = memory_bandwidth(threads or 1)
        need = statistics.fmean(tg_rates) * weights_bytes / 1e9
        rows[-1].update(
            weights_mb=round(weights_bytes / 2**20, 1),
            weights_gb_per_s=round(need, 2),
            memory_gb_per_s=round(bandwidth, 2),
            bandwidth_share=round(need / bandwidth, 3),
        )
    return rows
