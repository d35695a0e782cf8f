"""``edgelm model export-web`` and :mod:`edgelm.web_export`: everything short of the real
conversion (that runs, and is cached, in tests/e2e/test_playground.py): bad models, missing
build tools, failures mid-way, the cache, and the tokenizer fixes transformers.js needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelm import web_export
from edgelm.errors import InvalidRequest, MissingExtra, ModelNotFound
from edgelm.settings import Settings
from edgelm.web_export import (
    MARKER,
    ExportError,
    MissingWebTools,
    _fix_tokenizer,
    export_web_model,
)


@pytest.fixture
def local_gguf(settings: Settings, tmp_path: Path) -> Path:
    """A user-registered 'GGUF' (only the header is real: nothing here reads further)."""
    path = tmp_path / "little.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "models.toml").write_text(
        f'[[model]]\nalias = "little"\nname = "little"\nengine = "llamacpp"\ntier = "custom"\n'
        f'path = "{path}"\nfilename = "little.gguf"\nsize_bytes = {path.stat().st_size}\n'
        '\n[[model]]\nalias = "echo"\nname = "echo"\nengine = "fake"\ntier = "tiny"\n'
    )
    return path


def test_unknown_model(settings: Settings) -> None:
    with pytest.raises(ModelNotFound, match="not in the catalog"):
        export_web_model("no-such-model", settings)


def test_model_without_weights_is_a_clear_error(settings: Settings, local_gguf: Path) -> None:
    with pytest.raises(InvalidRequest, match="no weights to export"):
        export_web_model("echo", settings)


def test_model_not_downloaded_says_how(settings: Settings) -> None:
    with pytest.raises(ModelNotFound, match="edgelm model download smollm2-135m") as caught:
        export_web_model("smollm2-135m", settings)
    assert caught.value.code == "model_not_downloaded"


def test_missing_tools_fail_before_any_work_and_name_the_extra(
    settings: Settings, local_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_export, "missing_dependencies", lambda: ["torch", "optimum-onnx"])
    with pytest.raises(MissingExtra) as caught:
        export_web_model("little", settings)
    message = caught.value.message
    assert "torch, optimum-onnx" in message and "are not installed" in message
    assert "pip install 'edgelm[web]'" in message
    assert not (settings.home / "browser-models").exists()


def test_missing_dependencies_checks_real_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = (*web_export.REQUIRED_MODULES, ("edgelm_no_such_module.sub", "nothing"))
    monkeypatch.setattr(web_export, "REQUIRED_MODULES", extra)
    assert web_export.missing_dependencies() == ["nothing"]  # the real ones are installed


def test_a_failing_step_names_itself_and_leaves_nothing_behind(
    settings: Settings, local_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_export, "missing_dependencies", list)

    def broken(source: Path, hf_dir: Path) -> None:
        hf_dir.mkdir(parents=True)
        (hf_dir / "partial.bin").write_bytes(b"x")
        raise ValueError("unsupported architecture 'mystery'")

    monkeypatch.setattr(web_export, "_gguf_to_hf", broken)
    with pytest.raises(ExportError, match=r"reading the GGUF failed: ValueError: unsupported"):
        export_web_model("little", settings)
    root = settings.home / "browser-models"
    assert list(root.iterdir()) == []  # the temporary build directory is gone too


def test_an_import_error_mid_way_is_reported_as_the_extra(
    settings: Settings, local_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_export, "missing_dependencies", list)

    def needs_module(source: Path, hf_dir: Path) -> None:
        raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")

    monkeypatch.setattr(web_export, "_gguf_to_hf", needs_module)
    with pytest.raises(MissingWebTools, match=r"sentencepiece.*edgelm\[web\]"):
        export_web_model("little", settings)


def fake_steps(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Stand-ins for the two heavy steps that write what the real ones would."""

    def to_hf(source: Path, hf_dir: Path) -> None:
        calls.append("hf")
        hf_dir.mkdir(parents=True)
        added = [{"id": 0, "content": "<|endoftext|>"}, {"id": 2, "content": "<|im_end|>"}]
        (hf_dir / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        (hf_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")

    def to_onnx(hf_dir: Path, onnx_dir: Path) -> None:
        calls.append("onnx")
        onnx_dir.mkdir(parents=True)
        (onnx_dir / "model.onnx").write_bytes(b"onnx")
        (onnx_dir / "config.json").write_text(json.dumps({"eos_token_id": 0}))
        (onnx_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))

    monkeypatch.setattr(web_export, "missing_dependencies", list)
    monkeypatch.setattr(web_export, "_gguf_to_hf", to_hf)
    monkeypatch.setattr(web_export, "_hf_to_onnx", to_onnx)


def test_export_lays_out_files_for_transformers_js_and_is_cached(
    settings: Settings, local_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fake_steps(monkeypatch, calls)
    said: list[str] = []
    target = export_web_model("little", settings, progress=said.append)
    assert target == settings.home / "browser-models" / "little"
    assert (target / "onnx" / "model.onnx").read_bytes() == b"onnx"
    assert (target / "config.json").exists() and not (target / "onnx" / "config.json").exists()
    tokenizer = json.loads((target / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>"  # or transformers.js never stops
    assert "for m in messages" in tokenizer["chat_template"]
    for name in ("config.json", "generation_config.json"):
        assert json.loads((target / name).read_text())["eos_token_id"] == 2
    meta = json.loads((target / MARKER).read_text())
    assert meta["source"] == "little.gguf" and meta["dtype"] == "fp32"
    assert any("exporting ONNX" in line for line in said)
    assert calls == ["hf", "onnx"]

    # second call: the export is current, nothing runs (not even the tool check)
    monkeypatch.setattr(web_export, "missing_dependencies", lambda: ["torch"])
    assert export_web_model("little", settings, progress=said.append) == target
    assert calls == ["hf", "onnx"]
    assert "already exported" in said[-1]

    # the source changed: the cache is stale and the export runs again
    local_gguf.write_bytes(b"GGUF" + b"\1" * 60)
    monkeypatch.setattr(web_export, "missing_dependencies", list)
    export_web_model("little", settings)
    assert calls == ["hf", "onnx", "hf", "onnx"]


def test_a_gguf_without_chat_template_cannot_chat_in_the_browser(tmp_path: Path) -> None:
    hf, out = tmp_path / "hf", tmp_path / "out"
    hf.mkdir()
    out.mkdir()
    (out / "tokenizer_config.json").write_text("{}")
    (out / "tokenizer.json").write_text('{"added_tokens": []}')
    with pytest.raises(ExportError, match="no chat template"):
        _fix_tokenizer(hf, out)


def flat(text: str) -> str:
    """Rich wraps long lines at the terminal width; compare without the wrapping."""
    return " ".join(text.split())


def test_cli_export_web_errors_are_one_line(settings: Settings, local_gguf: Path) -> None:
    from edgelm.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["model", "export-web", "echo"])
    assert result.exit_code == 1
    assert "no weights to export" in flat(result.output)
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["model", "export-web", "smollm2-135m"])
    assert result.exit_code == 1
    assert "edgelm model download smollm2-135m" in flat(result.output)


def test_cli_export_web_names_the_extra(
    settings: Settings, local_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgelm.cli.main import app

    monkeypatch.setattr(web_export, "missing_dependencies", lambda: ["torch"])
    result = CliRunner().invoke(app, ["model", "export-web", "little"])
    assert result.exit_code == 1
    assert "pip install 'edgelm[web]'" in flat(result.output)


def test_cli_export_web_reports_progress_and_the_result(
    settings: Settings, local_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgelm.cli.main import app

    fake_steps(monkeypatch, [])
    result = CliRunner().invoke(app, ["model", "export-web", "little"])
    assert result.exit_code == 0, result.output
    assert "exporting ONNX" in flat(result.output)
    assert "in-browser model ready" in flat(result.output)
