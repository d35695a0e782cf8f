"""Everything one running service owns, built once by :func:`edgelm.server.app.create_app`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from edgelm.catalog import Catalog, CatalogEntry, named_as
from edgelm.model_cache import ModelStore
from edgelm.pool import ModelPool
from edgelm.server.metrics import Metrics
from edgelm.server.virtual import VirtualModel
from edgelm.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    catalog: Catalog
    store: ModelStore
    pool: ModelPool
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)
    virtual: list[VirtualModel] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        settings: Settings,
        catalog: Catalog | None = None,
        pool: ModelPool | None = None,
    ) -> ServiceState:
        catalog = catalog or Catalog.load(settings.home)
        store = ModelStore(settings)
        if pool is None:
            pool = ModelPool(settings, catalog, resolve_path=store.require)
        return cls(
            settings=settings,
            catalog=catalog,
            store=store,
            pool=pool,
            metrics=Metrics(pool_info=pool.loaded_info),
        )

    def model_card(self, entry: CatalogEntry) -> dict[str, Any]:
        return {
            "id": entry.alias,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "edgelm",
            "name": entry.name or entry.alias,
            "tier": entry.tier,
            "engine": entry.engine_name(self.settings.compute.engine),
            "context_length": entry.context_length,
            "loaded": entry.alias in self.pool.models,
            "cached": self.store.is_ready(entry),
        }

    def model_cards(self) -> list[dict[str, Any]]:
        cards = [self.model_card(e) for e in self.catalog]
        for family in self.virtual:
            cards.extend(family.cards(self))
        return cards

    def find_virtual(self, name: str) -> VirtualModel | None:
        return next((family for family in self.virtual if family.matches(name)), None)

    def model_name(self, name: str) -> str:
        """The canonical name a response reports and the pool loads: the alias, the virtual
        name as sent, or ``alias:gguf`` when the base GGUF was named explicitly (its bare alias
        may be served by a faster converted variant, see :mod:`edgelm.variants`)."""
        if self.find_virtual(name):
            return name
        return named_as(name, self.catalog.resolve(name))
