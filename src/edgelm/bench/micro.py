"""llama-bench style micro benchmark: the raw engine's prompt-processing (pp) and token
generation (tg) speed, without HTTP, templates or sampling. It is the reference that the
service's own decode speed and TTFT are compared against, as a ratio measured in the same run.
"""

from __future__ import annotations

import statistics
from typing import Any

from edgelm.catalog import Catalog
from edgelm.engines import create_engine
from edgelm.errors import InvalidRequest, Unsupported
from edgelm.settings import Settings
from edgelm.store import ModelStore


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
            pp_s, tg_s = raw_speed(n_prompt, n_gen, seed=rep)
            if n_prompt:
                pp_rates.append(n_prompt / pp_s)
            if n_gen:
                tg_rates.append(n_gen / tg_s)
        threads = getattr(engine, "threads", None)
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
    return rows
