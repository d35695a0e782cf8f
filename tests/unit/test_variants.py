"""The fastest variant by measurement: which variant a bare alias loads, from recorded figures.

No model runs here: the figures are written by hand (or by a fake measurement), and the
variants are fake-engine entries or an ONNX entry whose files are a stand-in file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.errors import InvalidRequest, ModelNotFound
from edgelm.pool import ModelPool
from edgelm.settings import Settings, load_settings
from edgelm.variants import (
    Figure,
    Record,
    VariantChooser,
    VariantRecords,
    engine_versions,
    machine_identity,
    optimize,
    variants_of,
)

BASE = "fake-a"
ONNX = "fake-a:onnx-cpu-int4"
INT8 = "fake-a:onnx-cpu-int8"


def variant(alias: str, **extra: Any) -> CatalogEntry:
    return CatalogEntry(alias=alias, engine="fake", options={"variant_of": BASE}, **extra)


def make_catalog(home: Path, *extra: CatalogEntry) -> Catalog:
    entries = [
        CatalogEntry(alias=BASE, engine="fake", tier="slm"),
        variant(ONNX),
        variant(INT8),
        CatalogEntry(alias="fake-other", engine="fake"),
        *extra,
    ]
    return Catalog(entries, user_file=home / "models.toml")


def settings_for(home: Path, **overrides: Any) -> Settings:
    return load_settings(overrides, env={"EDGELM_HOME": str(home)})


def record(*figures: tuple[str, float, float | None], **fields: Any) -> Record:
    return Record(
        alias=BASE,
        figures=[Figure(variant=v, engine="fake", tg=tg, pp=pp) for v, tg, pp in figures],
        **fields,
    )


def everything_present(_entry: CatalogEntry) -> bool:
    return True


def choose(home: Path, name: str = BASE, available=everything_present, **overrides: Any):  # type: ignore[no-untyped-def]
    chooser = VariantChooser(settings_for(home, **overrides), available)
    return chooser.choose(make_catalog(home), name)


def test_without_a_record_the_base_model_serves(isolated_home: Path) -> None:
    choice = choose(isolated_home)
    assert choice.entry.alias == BASE
    assert choice.how == "default"
    assert "model optimize fake-a" in choice.reason


def test_the_fastest_recorded_variant_serves_the_bare_alias(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(
        record((BASE, 28.0, 228.0), (ONNX, 45.0, 200.0), (INT8, 30.0, 150.0))
    )
    choice = choose(isolated_home)
    assert choice.entry.alias == ONNX
    assert choice.how == "measured"
    assert "tg 45.0" in choice.reason and "tg 28.0" in choice.reason
    # Other models are untouched by another model's record.
    assert choose(isolated_home, "fake-other").entry.alias == "fake-other"


def test_the_base_model_wins_when_it_is_measured_fastest(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(record((BASE, 40.0, 228.0), (ONNX, 30.0, 228.0)))
    choice = choose(isolated_home)
    assert (choice.entry.alias, choice.how) == (BASE, "measured")


def test_a_much_slower_prompt_phase_loses_despite_faster_decode() -> None:
    # 256/20 + 128/50 = 15.4 s against 256/250 + 128/40 = 4.2 s for the typical request.
    slow_prompt = Figure(ONNX, "onnx", tg=50.0, pp=20.0)
    balanced = Figure(BASE, "llamacpp", tg=40.0, pp=250.0)
    assert record().__class__(BASE, [slow_prompt, balanced]).fastest is balanced


def test_an_explicit_variant_name_is_used_as_named(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    choice = choose(isolated_home, INT8)
    assert (choice.entry.alias, choice.how) == (INT8, "explicit")


def test_alias_gguf_names_the_base_model_itself(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    assert make_catalog(isolated_home).resolve(f"{BASE}:gguf").alias == BASE
    choice = choose(isolated_home, f"{BASE}:gguf")
    assert (choice.entry.alias, choice.how, choice.name) == (BASE, "explicit", f"{BASE}:gguf")
    assert choose(isolated_home).name == ONNX
    with pytest.raises(ModelNotFound):
        make_catalog(isolated_home).resolve("nothing:gguf")


def test_a_pin_beats_the_measurements(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    to_base = choose(isolated_home, models={"pin": {BASE: "gguf"}})
    assert (to_base.entry.alias, to_base.how) == (BASE, "pinned")
    assert "models.pin" in to_base.reason
    to_int8 = choose(isolated_home, models={"pin": {BASE: "onnx-cpu-int8"}})
    assert to_int8.entry.alias == INT8
    full_name = choose(isolated_home, models={"pin": {BASE: INT8}})
    assert full_name.entry.alias == INT8


def test_a_pin_naming_no_variant_is_a_clear_error(isolated_home: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"not a variant of it.*onnx-cpu-int4"):
        choose(isolated_home, models={"pin": {BASE: "onnx-gpu-int4"}})
    with pytest.raises(InvalidRequest, match="names 'fake-other:x', which is not a variant"):
        choose(isolated_home, models={"pin": {BASE: "fake-other:x"}})


def test_the_choice_can_be_switched_off(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    choice = choose(isolated_home, models={"fastest_variant": False})
    assert (choice.entry.alias, choice.how) == (BASE, "default")


def test_a_record_from_another_machine_is_ignored(isolated_home: Path) -> None:
    other = {**machine_identity(), "cpu": "Some Other CPU @ 5 GHz"}
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None), machine=other))
    choice = choose(isolated_home)
    assert choice.entry.alias == BASE
    assert "another machine (Some Other CPU" in choice.reason
    assert "optimize fake-a again" in choice.reason


def test_a_record_made_with_other_engine_versions_is_ignored(isolated_home: Path) -> None:
    old = {**engine_versions(), "onnx": "0.0.1"}
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None), engines=old))
    choice = choose(isolated_home)
    assert choice.entry.alias == BASE and "other engine versions" in choice.reason


def test_a_chosen_variant_whose_files_are_gone_falls_back_with_a_log_line(
    isolated_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "fake-a-onnx-cpu-int4"
    model_dir.mkdir()
    config = model_dir / "genai_config.json"
    config.write_text("{}")
    onnx = CatalogEntry(
        alias="fake-a:onnx-cpu-int2", engine="onnx", path=config, options={"variant_of": BASE}
    )
    VariantRecords(isolated_home).put(
        record((BASE, 28.0, None), ("fake-a:onnx-cpu-int2", 45.0, None), (INT8, 35.0, None))
    )
    from edgelm.model_cache import ModelStore

    settings = settings_for(isolated_home)
    chooser = VariantChooser(settings, ModelStore(settings).is_ready)
    catalog = make_catalog(isolated_home, onnx)
    assert chooser.choose(catalog, BASE).entry.alias == "fake-a:onnx-cpu-int2"
    config.unlink()  # the user removed the conversion
    with caplog.at_level(logging.WARNING, logger="edgelm.variants"):
        choice = chooser.choose(catalog, BASE)
    assert choice.entry.alias == INT8  # the next fastest that is present
    assert "fake-a:onnx-cpu-int2 was measured fastest" in caplog.text
    # A measured variant that left the catalog altogether is skipped the same way.
    gone = make_catalog(isolated_home)
    VariantRecords(isolated_home).put(record(("fake-a:onnx-cpu-int2", 45.0, None), (BASE, 9.0, None)))
    assert chooser.choose(gone, BASE).entry.alias == BASE


def test_records_survive_a_bad_file_and_keep_other_models(isolated_home: Path) -> None:
    records = VariantRecords(isolated_home)
    isolated_home.mkdir(parents=True, exist_ok=True)
    records.path.write_text("{not json")
    assert records.get(BASE) is None
    records.put(record((BASE, 28.0, None)))
    other = Record(alias="fake-other", figures=[Figure("fake-other", "fake", 10.0)])
    records.put(other)
    data = json.loads(records.path.read_text())
    assert set(data["models"]) == {BASE, "fake-other"}
    assert data["models"][BASE]["machine"] == machine_identity()
    assert data["models"][BASE]["measured_at"].endswith("Z")


def test_variants_of_lists_the_base_first(isolated_home: Path) -> None:
    names = [e.alias for e in variants_of(make_catalog(isolated_home), BASE)]
    assert names == [BASE, ONNX, INT8]


class FakeMeasure:
    """The micro bench's rows with fixed figures per alias; one alias can fail."""

    def __init__(self, tg: dict[str, float], fail: str | None = None):
        self.tg, self.fail = tg, fail
        self.calls: list[str] = []

    def __call__(self, alias: str, settings: Settings) -> Sequence[dict[str, Any]]:
        self.calls.append(alias)
        if alias == self.fail:
            raise RuntimeError("no such engine here")
        return [
            {"model": alias, "engine": "fake", "threads": 2, "test": "pp32", "tokens_per_s": 300.0},
            {"model": alias, "engine": "fake", "threads": 2, "test": "tg8", "tokens_per_s": self.tg[alias]},
        ]


def test_optimize_measures_each_present_variant_and_records_the_fastest(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = make_catalog(isolated_home)
    monkeypatch.setattr(Catalog, "load", classmethod(lambda cls, home: catalog))
    measure = FakeMeasure({f"{BASE}:gguf": 28.0, ONNX: 45.0, INT8: 30.0}, fail=INT8)
    lines: list[str] = []
    result = optimize(
        BASE,
        settings_for(isolated_home),
        measure,
        available=lambda e: e.alias != "fake-a:absent",
        progress=lines.append,
    )
    # The base by its explicit name: its bare alias may already serve with a variant.
    assert measure.calls == [f"{BASE}:gguf", ONNX, INT8]
    assert result.fastest is not None and result.fastest.variant == ONNX
    assert "no such engine here" in result.skipped[INT8]
    stored = VariantRecords(isolated_home).get(BASE)
    assert stored is not None and [f.variant for f in stored.ranking] == [ONNX, BASE]
    assert stored.ranking[1].tg == 28.0
    assert stored.ranking[0].pp == 300.0 and stored.ranking[0].threads == 2
    assert any("tg 45.0" in line for line in lines)
    assert choose(isolated_home).entry.alias == ONNX


def test_optimize_refuses_a_variant_and_says_when_nothing_ran(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = make_catalog(isolated_home)
    monkeypatch.setattr(Catalog, "load", classmethod(lambda cls, home: catalog))
    settings = settings_for(isolated_home)
    with pytest.raises(InvalidRequest, match="optimize its base model 'fake-a'"):
        optimize(ONNX, settings, FakeMeasure({}), everything_present)
    with pytest.raises(InvalidRequest, match="no variant of 'fake-a' could be measured"):
        optimize(BASE, settings, FakeMeasure({}), lambda e: False)


def test_bench_targets_run_what_the_name_serves_with(isolated_home: Path) -> None:
    from edgelm.bench.targets import InProcessTarget

    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    settings = settings_for(isolated_home)
    catalog = make_catalog(isolated_home)
    chosen = InProcessTarget(BASE, settings, catalog)
    assert (chosen.entry.alias, chosen.model) == (ONNX, ONNX)
    base = InProcessTarget(f"{BASE}:gguf", settings, catalog)
    # The row's model name brings the micro bench (RawEngine) to the same base model.
    assert (base.entry.alias, base.model) == (BASE, f"{BASE}:gguf")


def test_the_pool_loads_the_chosen_variant_for_the_bare_alias(isolated_home: Path) -> None:
    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    pool = ModelPool(settings_for(isolated_home), make_catalog(isolated_home))

    async def main() -> None:
        loaded = await pool.get(BASE)
        assert loaded.entry.alias == ONNX
        assert (await pool.get(ONNX)) is loaded  # the same model, not a second copy
        int8 = await pool.get(INT8)
        assert int8.entry.alias == INT8
        assert await pool.unload(BASE)  # unloads what the alias serves with
        assert set(pool.models) == {INT8}
        base = await pool.get(f"{BASE}:gguf")
        assert base.entry.alias == BASE
        assert set(pool.models) == {INT8, BASE}
        assert await pool.unload(BASE)  # the base itself, now that it is what is loaded
        assert set(pool.models) == {INT8}
        await pool.close()

    asyncio.run(main())


def test_a_request_naming_the_base_gguf_is_served_by_it_not_by_the_chosen_variant(
    isolated_home: Path,
) -> None:
    """``alias:gguf`` in a request keeps the tag all the way to the pool: the response names
    it and the base model answers, while the bare alias goes to the faster variant."""
    from fastapi.testclient import TestClient

    from edgelm.server.app import create_app

    VariantRecords(isolated_home).put(record((BASE, 28.0, None), (ONNX, 45.0, None)))
    app = create_app(settings_for(isolated_home), catalog=make_catalog(isolated_home))
    question = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with TestClient(app) as http:
        pool = app.state.edgelm.pool
        named = http.post("/v1/chat/completions", json={"model": f"{BASE}:gguf", **question})
        assert named.status_code == 200, named.text
        assert named.json()["model"] == f"{BASE}:gguf"
        assert set(pool.models) == {BASE}
        bare = http.post("/v1/chat/completions", json={"model": BASE, **question})
        assert bare.json()["model"] == BASE
        assert set(pool.models) == {BASE, ONNX}
        assert pool.models[ONNX].requests == 1 and pool.models[BASE].requests == 1


def test_model_info_and_system_info_say_which_variant_and_why(
    isolated_home: Path, tmp_path: Path
) -> None:
    from edgelm.cli.main import app

    onnx_dir = tmp_path / "smollm2-135m-onnx-cpu-int4"
    onnx_dir.mkdir()
    (onnx_dir / "genai_config.json").write_text("{}")
    Catalog.load(isolated_home).add_user_entry(
        CatalogEntry(
            alias="smollm2-135m:onnx-cpu-int4",
            engine="onnx",
            path=onnx_dir / "genai_config.json",
            options={"variant_of": "smollm2-135m"},
        )
    )
    VariantRecords(isolated_home).put(
        Record(
            alias="smollm2-135m",
            figures=[
                Figure("smollm2-135m", "llamacpp", tg=150.0, pp=280.0),
                Figure("smollm2-135m:onnx-cpu-int4", "onnx", tg=210.0, pp=400.0),
            ],
        )
    )
    runner = CliRunner()
    result = runner.invoke(app, ["model", "info", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    serves = json.loads(result.output)["serves_with"]
    assert serves["variant"] == "smollm2-135m:onnx-cpu-int4"
    assert serves["engine"] == "onnx" and serves["how"] == "measured"
    assert serves["measured"]["figures"][0]["tg_tokens_per_s"] == 210.0
    table = runner.invoke(app, ["model", "info", "smollm2-135m"], env={"COLUMNS": "200"})
    assert "serves with" in table.output and "tg 210.0" in table.output
    system = runner.invoke(app, ["system", "info", "--json"])
    assert system.exit_code == 0, system.output
    variants = json.loads(system.output)["variants"]
    assert variants["smollm2-135m"].startswith("smollm2-135m:onnx-cpu-int4: fastest measured")
