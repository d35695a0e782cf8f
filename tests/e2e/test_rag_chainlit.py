"""The RAG Chainlit app in a real browser: a service on the fake engine, chainlit on a
loopback port, Playwright driving Debian's chromium. Ask, see the streamed answer and its
sources, open a source, and keep a screenshot under test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.rag.evaluate import corpus_dir
from edgelm.rag.ingest import ingest_paths
from edgelm.rag.store import RagStore
from edgelm.server.app import create_app
from edgelm.settings import load_settings
from tests.unit.conftest import free_port, serve_app  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
REPLY = "A full battery runs the mast for about 45 days without sun [1]."

if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("chainlit", reason="chainlit is not installed")


@pytest.fixture
def stack(isolated_home: Path, tmp_path: Path, serve_app) -> Iterator[str]:  # type: ignore[no-untyped-def]  # noqa: F811
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    with RagStore.open(settings.home, "demo") as store:
        ingest_paths(store, [corpus_dir()])
    catalog = Catalog(
        [
            CatalogEntry(
                alias="fake-slm",
                aliases=["slm"],
                engine="fake",
                tier="slm",
                options={"reply": REPLY, "token_delay_s": 0.05},
            ),
            CatalogEntry(alias="fake-llm", aliases=["llm"], engine="fake", tier="llm"),
        ],
        user_file=isolated_home / "models.toml",
    )
    service = serve_app(create_app(settings, catalog=catalog, virtual=[]))
    port = free_port()
    app_dir = tmp_path / "chainlit"
    app_dir.mkdir()
    app_file = Path(__file__).resolve().parents[2] / "src/edgelm/rag/chainlit_app.py"
    chainlit = shutil.which("chainlit") or str(Path(sys.executable).parent / "chainlit")
    env = {
        **os.environ,
        "EDGELM_HOME": str(isolated_home),
        "EDGELM_ENDPOINT": service,
        "EDGELM_RAG_COLLECTION": "demo",
    }
    log = (tmp_path / "chainlit.log").open("w")
    proc = subprocess.Popen(
        [chainlit, "run", str(app_file), "--headless", "--host", "127.0.0.1", "--port", str(port)],
        cwd=app_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "chainlit.log").read_text())
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_ask_and_see_streamed_answer_with_sources(stack: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless=new",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(stack)
            page.get_by_text("Ask about the documents").wait_for(timeout=30_000)
            box = page.locator("textarea").first
            box.fill("How long does a full mast battery last without sun?")
            time.sleep(1.0)  # let the socket settle (Enter alone did not send)
            page.locator("#chat-submit").click()
            # streaming: the first words show before the last ones
            page.get_by_text("A full battery", exact=False).first.wait_for(timeout=30_000)
            page.get_by_text("Sources").first.wait_for(timeout=30_000)
            assert page.get_by_text("45 days without sun", exact=False).count() >= 1
            assert page.get_by_text("power.txt", exact=False).count() >= 1
            page.screenshot(path=str(ARTIFACTS / "rag_chainlit.png"), full_page=True)
            # open source [1]: its chunk text appears in the side panel
            page.get_by_text("[1]", exact=True).first.click()
            page.get_by_text("2600 mAh", exact=False).first.wait_for(timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "rag_chainlit_source.png"), full_page=True)
        finally:
            browser.close()
