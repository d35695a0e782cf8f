"""What the "auto" compute settings come to on this machine, for ``edgelm config list``.

Apart from :mod:`edgelm.engines.sizing` (the pure computation, which the llama.cpp engine
imports) because explaining the stream count reads the default model's GGUF through the
llama.cpp engine's planner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgelm.settings import Settings


def explain_auto(settings: Settings) -> dict[str, str]:
    """What the "auto" compute settings mean on this machine, for ``edgelm config list``:
    the threads' range, and the stream count for the service's default model when its file
    is in the cache (the model's status shows the choice of every loaded model)."""
    from edgelm.engines.base import default_threads

    out: dict[str, str] = {}
    if settings.compute.threads == "auto":
        out["compute.threads"] = (
            f"up to {default_threads()} (the physical cores), fewer while other "
            "processes take cores; the status shows the count now and why"
        )
    if settings.compute.parallel == "auto":
        out["compute.parallel"] = _default_model_streams(settings)
    return out


def _default_model_streams(settings: Settings) -> str:
    from edgelm.catalog import Catalog
    from edgelm.errors import EdgelmError
    from edgelm.model_cache import ModelStore

    alias = settings.service.default_model
    try:
        entry = Catalog.load(settings.home).resolve(alias)
        if (entry.engine or settings.compute.engine) != "llamacpp":
            return f"decided when a model loads ({alias} is not a llama.cpp model)"
        store = ModelStore(settings)
        if not store.is_cached(entry):
            return f"decided when a model loads ({alias} is not downloaded)"
        from edgelm.engines.llamacpp import planned_streams

        choice = planned_streams(store.path_for(entry), settings)
    except (EdgelmError, ImportError, OSError, ValueError) as exc:
        return f"decided when a model loads ({alias}: {exc})"
    return f"{choice.streams} for {alias} ({choice.reason})"
