"""The routes that serve in-browser models and the playground's own files.

The weights are read from disk by path, so the containment check is what stands between a
browser and the rest of the file system: every traversal attempt must be a 4xx error body.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgelm.server.app import create_app
from edgelm.settings import Settings
from edgelm.web_export import MARKER


def export_fake(root: Path, alias: str, *, marker: bool = True, weights: bool = True) -> Path:
    """A directory laid out like a real export, with tiny stand-in files."""
    target = root / alias
    (target / "onnx").mkdir(parents=True)
    (target / "config.json").write_text('{"model_type": "llama"}')
    (target / "tokenizer.json").write_text("{}")
    if weights:
        (target / "onnx" / "model.onnx").write_bytes(b"\x08\x01onnx-bytes")
    if marker:
        meta = {"source": f"{alias}.gguf", "dtype": "fp32", "format": 1}
        (target / MARKER).write_text(json.dumps(meta))
    return target


@pytest.fixture
def browser_root(settings: Settings) -> Path:
    root = settings.home / "browser-models"
    root.mkdir(parents=True)
    export_fake(root, "tiny")
    (settings.home / "secret.txt").write_text("do not serve me")
    return root


def test_listing_is_empty_with_a_hint_when_nothing_is_exported(client: TestClient) -> None:
    body = client.get("/browser-models").json()
    assert body["data"] == []
    assert "edgelm model export-web" in body["hint"]


def test_listing_shows_complete_exports_only(client: TestClient, browser_root: Path) -> None:
    export_fake(browser_root, "half-built", marker=False)
    export_fake(browser_root, "no-weights", weights=False)
    export_fake(browser_root, ".tiny-tmp123")  # an export still in progress
    broken = export_fake(browser_root, "bad-marker")
    (broken / MARKER).write_text("{not json")
    data = client.get("/browser-models").json()["data"]
    assert [card["id"] for card in data] == ["tiny"]
    assert data[0]["dtype"] == "fp32"
    assert data[0]["bytes"] == len(b"\x08\x01onnx-bytes")


def test_serves_files_of_an_export(client: TestClient, browser_root: Path) -> None:
    res = client.get("/browser-models/tiny/onnx/model.onnx")
    assert res.status_code == 200
    assert res.content == b"\x08\x01onnx-bytes"
    assert res.headers["cache-control"] == "no-cache"
    assert client.get("/browser-models/tiny/config.json").json() == {"model_type": "llama"}


@pytest.mark.parametrize(
    "path",
    [
        "/browser-models/tiny/%2e%2e/%2e%2e/secret.txt",
        "/browser-models/tiny/..%2f..%2fsecret.txt",
        "/browser-models/%2e%2e/secret.txt",
        "/browser-models/tiny/%2fetc%2fpasswd",
        "/browser-models/tiny//etc/passwd",
        "/browser-models/tiny/onnx/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/browser-models/.tiny-tmp/config.json",
        "/browser-models/tiny/",
        "/browser-models/tiny/onnx",
        "/browser-models/tiny/missing.json",
        "/browser-models/nope/config.json",
    ],
)
def test_traversal_and_missing_files_are_404_error_bodies(
    client: TestClient, browser_root: Path, path: str
) -> None:
    export_fake(browser_root, ".tiny-tmp")
    res = client.get(path)
    assert 400 <= res.status_code < 500, path
    assert res.status_code != 200
    if res.headers.get("content-type", "").startswith("application/json"):
        error = res.json()["error"]
        assert error["type"] == "invalid_request_error"
    assert b"do not serve me" not in res.content
    assert b"root:" not in res.content


def test_symlink_out_of_the_export_is_refused(client: TestClient, browser_root: Path) -> None:
    (browser_root / "tiny" / "leak.json").symlink_to(browser_root.parent / "secret.txt")
    (browser_root / "linked").symlink_to(browser_root.parent)
    assert client.get("/browser-models/tiny/leak.json").status_code == 404
    assert client.get("/browser-models/linked/secret.txt").status_code == 404


def test_playground_page_is_served_cross_origin_isolated(client: TestClient) -> None:
    res = client.get("/")
    assert res.status_code == 200
    assert 'id="prompt"' in res.text
    # isolation lets the WASM runtime use threads (SharedArrayBuffer)
    assert res.headers["cross-origin-opener-policy"] == "same-origin"
    assert res.headers["cross-origin-embedder-policy"] == "require-corp"
    worker = client.get("/static/browser-worker.js")
    assert worker.headers["cross-origin-embedder-policy"] == "require-corp"


def test_runtime_files_have_the_media_types_browsers_insist_on(client: TestClient) -> None:
    base = "/static/vendor/transformers/"
    mjs = client.get(base + "ort-wasm-simd-threaded.asyncify.mjs")
    assert mjs.headers["content-type"].startswith("text/javascript")
    head = client.head(base + "ort-wasm-simd-threaded.asyncify.wasm")
    assert head.headers["content-type"] == "application/wasm"
    assert client.get("/static/playground.js").headers["content-type"].startswith("text/javascript")


def _static() -> Path:
    return Path(str(resources.files("edgelm").joinpath("server/static")))


def test_page_loads_nothing_from_other_hosts() -> None:
    """Offline: our page, scripts and styles reference no absolute URL at all."""
    for path in _static().glob("*.*"):
        text = path.read_text("utf-8")
        found = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.IGNORECASE)
        assert not found, f"{path.name} references {found}"


def test_vendored_runtime_is_complete_and_matches_its_readme() -> None:
    vendor = _static() / "vendor" / "transformers"
    readme = (vendor / "README.md").read_text("utf-8")
    pinned = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})\s+(\S+)$", readme, re.M)
    )
    assert set(pinned) == {
        "transformers.min.js",
        "ort-wasm-simd-threaded.asyncify.mjs",
        "ort-wasm-simd-threaded.asyncify.wasm",
    }
    for name, digest in pinned.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    for licence in ("transformers", "onnxruntime-web", "jinja", "tokenizers"):
        assert (vendor / f"LICENSE.{licence}.txt").stat().st_size > 500


def test_cors_allows_a_configured_origin(isolated_home: Path) -> None:
    from edgelm.settings import load_settings

    settings = load_settings(
        {"service": {"cors_origins": ["http://pages.example:8080"]}},
        env={"EDGELM_HOME": str(isolated_home)},
    )
    with TestClient(create_app(settings)) as client:
        allowed = client.get("/browser-models", headers={"Origin": "http://pages.example:8080"})
        other = client.get("/browser-models", headers={"Origin": "http://elsewhere.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://pages.example:8080"
    assert "access-control-allow-origin" not in other.headers
