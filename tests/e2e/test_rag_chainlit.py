"""The RAG Chainlit app in a real browser: a service on the fake engine, ``edgelm rag chat``
on a loopback port, Playwright driving Debian's chromium. Ask, watch the answer stream in,
see and open its sources, upload a file and ask about it; screenshots go to test-artifacts/."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.rag.chainlit_setup import chainlit_command, chainlit_env
from edgelm.rag.collection_db import RagStore
from edgelm.rag.evaluate import corpus_dir
from edgelm.rag.ingest import ingest_paths
from edgelm.server.app import create_app
from edgelm.settings import load_settings, set_in_file
from tests.unit.conftest import free_port, serve_app  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
REPLY = (
    "A full battery runs the mast for about 45 days without sun [1]. The solar panel charges "
    "it during the day, so several weeks of dark winter weather are not a problem for the "
    "station, and the console keeps its history on its own backup battery meanwhile."
)
LAST_WORDS = "backup battery meanwhile."

if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
# find_spec, not importorskip: importing chainlit creates ".files/" in the current directory
if importlib.util.find_spec("chainlit") is None:
    pytest.skip("chainlit is not installed", allow_module_level=True)


@pytest.fixture
def stack(isolated_home: Path, tmp_path: Path, serve_app) -> Iterator[str]:  # type: ignore[no-untyped-def]  # noqa: F811
    # This test watches the first answer stream into the page. The default rag.fallback_policy
    # also runs the answer checks, which hold an answer until it ends (an invented figure must
    # not be shown first), so the app is configured without them here.
    set_in_file(isolated_home, "rag.fallback_policy", "insufficient")
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
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # what `edgelm rag chat -c demo --headless` runs (tested in tests/unit/test_rag_cli.py)
    env = chainlit_env(isolated_home, service, "demo")
    log = (tmp_path / "chainlit.log").open("w")
    proc = subprocess.Popen(
        chainlit_command(port, "127.0.0.1", headless=True),
        cwd=workdir,
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
    # Chainlit's config, translations and uploads live under EDGELM_HOME, not where it ran
    assert list(workdir.iterdir()) == []
    assert (isolated_home / "chainlit" / ".chainlit" / "config.toml").exists()


def _send(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.locator("textarea").first.fill(text)
    time.sleep(1.0)  # let the socket settle (Enter alone did not send)
    page.locator("#chat-submit").click()


def test_ask_stream_sources_and_upload(stack: str, tmp_path: Path) -> None:
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
            _send(page, "How long does a full mast battery last without sun?")
            # streamed: the page shows the start of the answer while its end is still to come
            page.wait_for_function(
                "([first, last]) => document.body.innerText.includes(first)"
                " && !document.body.innerText.includes(last)",
                arg=["A full battery runs the mast", LAST_WORDS],
                timeout=30_000,
            )
            page.get_by_text(LAST_WORDS, exact=False).first.wait_for(timeout=30_000)
            page.get_by_text("Sources").first.wait_for(timeout=30_000)
            assert page.get_by_text("power.txt", exact=False).count() >= 1
            page.screenshot(path=str(ARTIFACTS / "rag_chainlit.png"), full_page=True)
            # open source [1] (its element is named by chunk id): its text shows in the side panel
            page.get_by_text("power.txt#0", exact=True).first.click()
            page.get_by_text("2600 mAh", exact=False).first.wait_for(timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "rag_chainlit_source.png"), full_page=True)

            # a question the collection cannot answer is refused without a model ...
            _send(page, "What colour is the garden gnome?")
            page.get_by_text("refused: nothing relevant retrieved").first.wait_for(timeout=30_000)
            # ... until a file that answers it is uploaded into the collection
            gnome = tmp_path / "gnome.md"
            gnome.write_text("# Garden\n\nThe garden gnome is painted bright red.\n")
            page.locator("input[type=file]").first.set_input_files(str(gnome))
            page.get_by_text("gnome.md", exact=False).first.wait_for(timeout=10_000)
            _send(page, "What colour is the garden gnome?")
            page.get_by_text("Ingested into", exact=False).first.wait_for(timeout=30_000)
            page.get_by_text("1 added", exact=False).first.wait_for(timeout=10_000)
            page.get_by_text("gnome.md#0", exact=True).first.click()
            page.get_by_text("painted bright red", exact=False).first.wait_for(timeout=10_000)
            assert page.get_by_text("2600 mAh", exact=False).count() == 0  # only this answer's
            page.screenshot(path=str(ARTIFACTS / "rag_chainlit_upload.png"), full_page=True)
        finally:
            browser.close()
