"""Engines found by name. Heavy imports happen inside each backend module, only when used."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.engines.base import Engine
from edgelm.errors import ConfigError

if TYPE_CHECKING:
    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

# name → (module, class). A backend module imports its library lazily and raises MissingExtra.
BACKENDS: dict[str, tuple[str, str]] = {
    "llamacpp": ("edgelm.engines.llamacpp", "LlamaCppEngine"),
    "onnx": ("edgelm.engines.onnx", "OnnxEngine"),
    "remote": ("edgelm.engines.remote", "RemoteEngine"),
    "fake": ("edgelm.engines.fake", "FakeEngine"),
    "sentence": ("edgelm.engines.sentence", "SentenceEngine"),
}


def engine_class(name: str) -> type[Engine]:
    if name not in BACKENDS:
        raise ConfigError(f"unknown engine '{name}'; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def create_engine(entry: CatalogEntry, settings: Settings, path: Path | None) -> Engine:
    """Load ``entry`` with the engine it names (or the configured default), through the
    engine's :meth:`~edgelm.engines.base.Engine.from_entry`."""
    return engine_class(entry.engine_name(settings.compute.engine)).from_entry(
        entry, settings, path
    )


def load_engine(entry: CatalogEntry, settings: Settings, path: Path | None) -> Engine:
    """How the service loads a model: in a runner process of its own when its engine asks
    for one and ``compute.isolation`` is "process" (a crash in the engine then ends only that
    model's requests, see :mod:`edgelm.engines.isolated`), else in this process."""
    cls = engine_class(entry.engine_name(settings.compute.engine))
    if settings.compute.isolation == "process" and cls.wants_isolation(entry):
        from edgelm.engines.isolated import IsolatedEngine

        return IsolatedEngine.start(entry, settings, path)
    return cls.from_entry(entry, settings, path)
