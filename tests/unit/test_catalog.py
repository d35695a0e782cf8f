"""The shipped catalog and user registrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.errors import ConfigError, InvalidRequest, ModelNotFound


def test_shipped_catalog(isolated_home: Path) -> None:
    cat = Catalog.load(isolated_home)
    assert {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"} <= set(cat.names())
    tiny, slm, llm = cat.for_tier("tiny"), cat.for_tier("slm"), cat.for_tier("llm")
    assert (tiny.alias, slm.alias, llm.alias) == ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b")
    for entry in (tiny, slm, llm):
        assert len(entry.sha256 or "") == 64 and entry.size_bytes > 0 and entry.license
        kinds = [s.kind for s in entry.source]
        assert kinds == ["hub", "pypi"]
    assert len(llm.source[1].parts) == 22 and len(slm.source[1].parts) == 6
    assert cat.resolve("Qwen2.5-Coder-0.5B-Instruct").alias == "qwen2.5-0.5b"
    assert cat.resolve("slm").alias == "qwen2.5-0.5b"


def test_unknown_model_lists_aliases(isolated_home: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        Catalog.load(isolated_home).resolve("gpt-4")
    assert "smollm2-135m" in info.value.message


def test_user_entries_round_trip(isolated_home: Path, tmp_path: Path) -> None:
    cat = Catalog.load(isolated_home)
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF....")
    cat.add_user_entry(CatalogEntry(alias="mine", path=gguf, filename="mine.gguf"))
    again = Catalog.load(isolated_home)
    assert again.resolve("mine").path == gguf and again.resolve("mine").user
    with pytest.raises(InvalidRequest):
        again.add_user_entry(CatalogEntry(alias="smollm2-135m"))
    assert again.remove_user_entry("mine")
    assert not again.remove_user_entry("smollm2-135m")
    assert "mine" not in Catalog.load(isolated_home).names()


def test_bad_user_catalog_is_clear(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "models.toml").write_text('[[model]]\nalias = "Bad Name!"\n')
    with pytest.raises(ConfigError, match="alias"):
        Catalog.load(isolated_home)
    with pytest.raises(ValueError):
        CatalogEntry(alias="../escape")
