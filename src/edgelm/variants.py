"""Which variant of a model serves its bare alias: the fastest one, as measured on this machine.

A catalog model can exist in several forms: its GGUF (llama.cpp) and the variants
``edgelm model convert`` builds (``qwen2.5-0.5b:onnx-cpu-int4``). They are the same weights at
4 bits, so answers are of the same quality, but their speed depends on the CPU: ONNX
Runtime's int4 kernels decode Qwen2.5-0.5B 1.6x faster than llama.cpp on one machine and not
on another. So ``edgelm model optimize ALIAS`` measures every variant this machine can run
with the bench's micro mode (raw pp/tg, the same figures as ``bench run --micro``) and records
them in ``$EDGELM_HOME/variants.json`` with the CPU's identity, the engines' versions and the
date. From then on the bare alias resolves to the fastest variant wherever a model is loaded
(``model run``, the service, the router: all load through the pool, which asks
:func:`choose`).

The choice never overrides the user: an explicit ``alias:variant`` (or ``alias:gguf`` for the
base model itself) is used as named, a pin
in the settings (``models.pin``) beats the record, and ``models.fastest_variant = false``
turns the choice off. A record made on another CPU or with other engine versions is ignored
(the figures do not carry over), and a chosen variant whose files are gone falls back to the
base model with a log line, so removing a conversion never breaks the alias.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.catalog import BASE_VARIANT, Catalog, CatalogEntry, named_as
from edgelm.errors import InvalidRequest, ModelNotFound
from edgelm.reporting import write_atomically
from edgelm.settings import Settings

log = logging.getLogger("edgelm.variants")

FORMAT = 1
FILE_NAME = "variants.json"
BASE_PIN = BASE_VARIANT
"""The pin value (and the name tag, ``alias:gguf``) for the base GGUF model itself."""
WORKLOAD = (256, 128)
"""The request the variants are compared on: a 256-token prompt and a 128-token answer.
Decode speed dominates it, but a variant with a much slower prompt phase cannot win on
decode alone (its time to first token would be worse than its faster decode repays)."""

Availability = Callable[[CatalogEntry], bool]


# -- what this machine is -----------------------------------------------------------------------


def machine_identity() -> dict[str, Any]:
    """The CPU figures were measured on: another CPU (or a resized VM) measures again."""
    from edgelm.sysinfo import cpu_info

    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "architecture": cpu["architecture"],
        "logical_cores": cpu["logical_cores"],
        "simd": cpu["simd"],
    }


def engine_versions() -> dict[str, str | None]:
    """The engine libraries the figures were measured with; a new version measures again."""
    from edgelm.sysinfo import engines

    return {name: v for name, v in engines().items() if name in ("llamacpp", "onnx")}


# -- the record ---------------------------------------------------------------------------------


@dataclass
class Figure:
    """One variant's raw speed on this machine (tokens/s), and the workload time it implies."""

    variant: str
    engine: str
    tg: float
    pp: float | None = None
    threads: int | None = None

    @property
    def workload_seconds(self) -> float:
        prompt, answer = WORKLOAD
        seconds = answer / self.tg if self.tg > 0 else float("inf")
        if self.pp:
            seconds += prompt / self.pp
        return seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "engine": self.engine,
            "pp_tokens_per_s": self.pp,
            "tg_tokens_per_s": self.tg,
            "threads": self.threads,
            "workload_seconds": round(self.workload_seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        return cls(
            variant=str(data["variant"]),
            engine=str(data.get("engine", "")),
            tg=float(data["tg_tokens_per_s"]),
            pp=float(data["pp_tokens_per_s"]) if data.get("pp_tokens_per_s") else None,
            threads=data.get("threads"),
        )


@dataclass
class Record:
    """The measurements of one model's variants on one machine."""

    alias: str
    figures: list[Figure]
    machine: dict[str, Any] = field(default_factory=machine_identity)
    engines: dict[str, str | None] = field(default_factory=engine_versions)
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ranking(self) -> list[Figure]:
        """Fastest first (shortest time for :data:`WORKLOAD`)."""
        return sorted(self.figures, key=lambda f: f.workload_seconds)

    @property
    def fastest(self) -> Figure | None:
        ranking = self.ranking
        return ranking[0] if ranking else None

    def stale_because(
        self, here: dict[str, Any] | None = None, versions: dict[str, str | None] | None = None
    ) -> str | None:
        """Why these figures do not describe this machine now, or None if they do."""
        here = machine_identity() if here is None else here
        if self.machine != here:
            return f"measured on another machine ({self.machine.get('cpu')})"
        versions = engine_versions() if versions is None else versions
        if self.engines != versions:
            return f"measured with other engine versions ({self.engines}, now {versions})"
        return None

    def as_dict(self) -> dict[str, Any]:
        fastest = self.fastest
        return {
            "alias": self.alias,
            "chosen": fastest.variant if fastest else None,
            "measured_at": self.measured_at,
            "machine": self.machine,
            "engines": self.engines,
            "workload": {"prompt_tokens": WORKLOAD[0], "answer_tokens": WORKLOAD[1]},
            "figures": [f.as_dict() for f in self.ranking],
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(
            alias=str(data["alias"]),
            figures=[Figure.from_dict(f) for f in data.get("figures", [])],
            machine=dict(data.get("machine") or {}),
            engines=dict(data.get("engines") or {}),
            measured_at=str(data.get("measured_at", "")),
            skipped=dict(data.get("skipped") or {}),
        )


class VariantRecords:
    """``$EDGELM_HOME/variants.json``: one record per base alias, written atomically."""

    def __init__(self, home: Path):
        self.path = Path(home) / FILE_NAME
        self._cache: tuple[int, dict[str, Any]] | None = None

    def _read(self) -> dict[str, Any]:
        """The file's models, re-read only when it changed (the pool asks on every request)."""
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            return {}
        if self._cache is not None and self._cache[0] == stamp:
            return dict(self._cache[1])
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        models = data.get("models") if isinstance(data, dict) else None
        if data.get("format") != FORMAT or not isinstance(models, dict):
            models = {}
        self._cache = (stamp, models)
        return dict(models)

    def get(self, alias: str) -> Record | None:
        row = self._read().get(alias)
        if not isinstance(row, dict):
            return None
        try:
            return Record.from_dict(row)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a malformed record for %s in %s: %s", alias, self.path, exc)
            return None

    def aliases(self) -> list[str]:
        return sorted(self._read())

    def put(self, record: Record) -> None:
        models = self._read()
        models[record.alias] = record.as_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps({"format": FORMAT, "models": models}, indent=2))


# -- the choice ---------------------------------------------------------------------------------


def variants_of(catalog: Catalog, base: str) -> list[CatalogEntry]:
    """The base model and its converted variants, base first."""
    entry = catalog.resolve(base)
    found = [e for e in catalog if e.options.get("variant_of") == entry.alias]
    return [entry, *sorted(found, key=lambda e: e.alias)]


@dataclass
class Choice:
    """The entry a name resolves to for loading, and why (shown by ``model info``)."""

    entry: CatalogEntry
    reason: str
    how: str  # "explicit", "pinned", "measured", "default"
    record: Record | None = None
    name: str = ""
    """A name that loads this same entry again (``alias:gguf`` when the base was named so)."""

    def __post_init__(self) -> None:
        self.name = self.name or self.entry.alias


class VariantChooser:
    """Resolves names to the entries that load, for the pool and the CLI.

    Holds what does not change while a process runs (the machine's identity, the engines'
    versions) and the record file, re-read only when it changes.
    """

    def __init__(self, settings: Settings, available: Availability):
        self.settings = settings
        self.available = available
        self.records = VariantRecords(settings.home)
        self._here: tuple[dict[str, Any], dict[str, str | None]] | None = None

    def _identity(self) -> tuple[dict[str, Any], dict[str, str | None]]:
        if self._here is None:
            self._here = (machine_identity(), engine_versions())
        return self._here

    def choose(self, catalog: Catalog, name: str) -> Choice:
        """The variant that serves ``name``.

        Order: an explicit variant name; a pin in ``models.pin``; the fastest variant recorded
        for this machine whose files are present; the base model.
        """
        settings = self.settings
        entry = catalog.resolve(name)
        if entry.options.get("variant_of") or ":" in name:
            return Choice(entry, "named explicitly", "explicit", name=named_as(name, entry))
        pin = settings.models.pin.get(entry.alias)
        if pin:
            target = entry if pin in (BASE_PIN, entry.alias) else _pinned(catalog, entry, pin)
            why = f"pinned by the setting models.pin ({entry.alias} = {pin})"
            return Choice(target, why, "pinned")
        if not settings.models.fastest_variant:
            return Choice(entry, "measured choice switched off (models.fastest_variant)", "default")
        record = self.records.get(entry.alias)
        if record is None or record.fastest is None:
            why = f"not measured here (edgelm model optimize {entry.alias})"
            return Choice(entry, why, "default")
        stale = record.stale_because(*self._identity())
        if stale:
            why = f"{stale}; run edgelm model optimize {entry.alias} again"
            return Choice(entry, why, "default", record)
        figures = ", ".join(f"{f.variant} tg {f.tg:.1f} tok/s" for f in record.ranking)
        for figure in record.ranking:
            if figure.variant == entry.alias:
                return Choice(entry, f"fastest measured ({figures})", "measured", record)
            try:
                variant: CatalogEntry | None = catalog.resolve(figure.variant)
            except ModelNotFound:
                variant = None
            if variant is not None and self.available(variant):
                return Choice(variant, f"fastest measured ({figures})", "measured", record)
            log.warning(
                "%s was measured fastest for %s but its files are gone; trying the next",
                figure.variant,
                entry.alias,
            )
        why = "the measured variants are gone; using the base model"
        return Choice(entry, why, "default", record)


def _pinned(catalog: Catalog, entry: CatalogEntry, pin: str) -> CatalogEntry:
    """The variant a pin names: a tag (``onnx-cpu-int4``) or a full variant alias."""
    name = pin if ":" in pin else f"{entry.alias}:{pin}"
    try:
        target: CatalogEntry | None = catalog.resolve(name)
    except ModelNotFound:
        target = None
    if target is None or target.options.get("variant_of") != entry.alias:
        raise InvalidRequest(
            f"models.pin for '{entry.alias}' names '{pin}', which is not a variant of it; "
            f"choose '{BASE_PIN}' or one of: "
            + ", ".join(e.alias for e in variants_of(catalog, entry.alias)[1:]),
            param="model",
        )
    return target


# -- measuring ----------------------------------------------------------------------------------

Measure = Callable[[str, Settings], Sequence[dict[str, Any]]]
"""Runs the micro bench on one catalog alias; returns its rows (pp and tg)."""


def optimize(
    alias: str,
    settings: Settings,
    measure: Measure,
    available: Availability,
    progress: Callable[[str], None] | None = None,
) -> Record:
    """Measure every variant of ``alias`` this machine can run, record the result, return it.

    A variant that is not present, or fails to load or run here (a missing engine, a GPU
    build), is skipped with the reason, so one bad variant does not stop the others.
    """
    say = progress or (lambda _line: None)
    catalog = Catalog.load(settings.home)
    base = catalog.resolve(alias)
    if base.options.get("variant_of"):
        raise InvalidRequest(
            f"'{base.alias}' is a variant; optimize its base model "
            f"'{base.options['variant_of']}'",
            param="model",
        )
    figures: list[Figure] = []
    skipped: dict[str, str] = {}
    for entry in variants_of(catalog, base.alias):
        if not available(entry):
            skipped[entry.alias] = "not downloaded or converted"
            say(f"{entry.alias}: skipped (not present)")
            continue
        say(f"measuring {entry.alias}")
        # The base by its explicit name: its bare alias may already load a faster variant.
        name = entry.alias if entry is not base else f"{entry.alias}:{BASE_PIN}"
        try:
            rows = measure(name, settings)
        except Exception as exc:  # one variant failing must not stop the others
            skipped[entry.alias] = f"{type(exc).__name__}: {exc}"
            say(f"{entry.alias}: failed ({exc})")
            continue
        tg = next((r for r in rows if str(r.get("test", "")).startswith("tg")), None)
        pp = next((r for r in rows if str(r.get("test", "")).startswith("pp")), None)
        if tg is None:
            skipped[entry.alias] = "no tg figure"
            continue
        figure = Figure(
            variant=entry.alias,
            engine=str(tg.get("engine", entry.engine_name(settings.compute.engine))),
            tg=float(tg["tokens_per_s"]),
            pp=float(pp["tokens_per_s"]) if pp else None,
            threads=tg.get("threads"),
        )
        figures.append(figure)
        pp_text = f"pp {figure.pp:.1f}, " if figure.pp else ""
        say(f"{entry.alias}: {pp_text}tg {figure.tg:.1f} tok/s")
    if not figures:
        raise InvalidRequest(
            f"no variant of '{base.alias}' could be measured here: "
            + "; ".join(f"{k}: {v}" for k, v in skipped.items()),
            param="model",
        )
    record = Record(alias=base.alias, figures=figures, skipped=skipped)
    VariantRecords(settings.home).put(record)
    return record
