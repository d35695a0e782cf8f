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
    """Load ``entry`` with the engine it names (or the configured default)."""
    name = entry.engine_name(settings.compute.engine)
    if name == "fake":
        from edgelm.engines.fake import FakeEngine, FakeScript

        return FakeEngine(entry.alias, FakeScript.from_options(entry.options))
    cls = engine_class(name)
    return cls.from_entry(entry, settings, path)  # type: ignore[attr-defined]
