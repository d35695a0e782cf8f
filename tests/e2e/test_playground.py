"""The browser playground at ``/`` in a real browser (Playwright + Debian's chromium, headless).

Two services back the page:

- ``real``: ``edgelm service start`` in a subprocess with the real SmolLM2-135M (streaming,
  switching models, the chart, and the in-browser model beside it), plus a fake model to switch
  to, and the in-browser export of SmolLM2 (built once, cached under ~/.edgelm/browser-models);
- ``fake``: an in-process app on the fake engine, where timing and replies are scripted, for
  stop/cancel, RAG citations and failure messages.

Screenshots land in test-artifacts/ (gitignored). Run with ``-s`` to see the in-browser vs
service figures the WASM test prints.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.server.app import create_app
from edgelm.settings import load_settings
from tests.service_process import free_port, spawn_service, stop_service
from tests.unit.conftest import serve_app  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TINY = "smollm2-135m"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SLOW_REPLY = " ".join(f"word{i}" for i in range(200))
RAG_REPLY = "The mast battery lasts about 45 days without sun [1]."
STREAM_PROMPT = "Write a short story about a robot who learns to paint."
# Read at import: the autouse isolated_home fixture clears EDGELM_* variables before each test.
REPEAT = int(os.environ.get("EDGELM_PLAYGROUND_REPEAT") or "1")
BROWSER_MODELS = Path(os.environ.get("EDGELM_TEST_BROWSER_MODELS") or "~/.edgelm/browser-models")

if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def models_dir() -> Path:
    return Path(os.environ.get("EDGELM_TEST_MODELS") or "~/.edgelm/models").expanduser()


def browser_cache() -> Path:
    """Exports are cached across runs here (the export takes a minute or two)."""
    return BROWSER_MODELS.expanduser()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgelm.model_cache import ModelStore

    home = tmp_path_factory.mktemp("tiny-home")
    env = {"EDGELM_HOME": str(home), "EDGELM_MODELS__DIR": str(models_dir())}
    settings = load_settings(env=env)
    return ModelStore(settings).download(Catalog.load(home).resolve(TINY))


@pytest.fixture(scope="module")
def web_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 exported for transformers.js; built on the first run only."""
    from edgelm import web_export

    missing = web_export.missing_dependencies()
    if missing:
        pytest.skip(f"the web export needs {missing}: pip install 'edgelm[web]'")
    home = tmp_path_factory.mktemp("export-home")
    settings = load_settings(
        env={"EDGELM_HOME": str(home), "EDGELM_MODELS__DIR": str(models_dir())}
    )
    root = browser_cache().expanduser()
    return web_export.export_web_model(TINY, settings, out_root=root, progress=print)


@pytest.fixture(scope="module")
def real(
    tiny_model: Path, web_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``edgelm service start`` with SmolLM2 loaded, a fake model beside it, and the export."""
    home = tmp_path_factory.mktemp("playground-home")
    (home / "models.toml").write_text(
        '[[model]]\nalias = "fake-echo"\nname = "fake-echo"\nengine = "fake"\ntier = "custom"\n'
        'options = { token_delay_s = 0.02, reply = "A fake model answers quickly and the same '
        'way every time." }\n'
    )
    (home / "browser-models").symlink_to(web_model.parent, target_is_directory=True)
    env = {"EDGELM_MODELS__DIR": str(models_dir()), "EDGELM_COMPUTE__N_CTX": "2048"}
    proc, base = spawn_service(home, "--model", TINY, env=env, timeout_s=120)
    try:
        yield base
    finally:
        stop_service(proc)


@pytest.fixture
def fake(isolated_home: Path, serve_app) -> tuple[str, Any]:  # type: ignore[no-untyped-def]  # noqa: F811
    """An app on the fake engine (scripted replies and delays); returns (url, app)."""
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})

    def entry(alias: str, tier: str, **options: Any) -> CatalogEntry:
        return CatalogEntry(alias=alias, engine="fake", tier=tier, options=options)

    catalog = Catalog(
        [
            entry("fake-slm", "slm", reply=RAG_REPLY, token_delay_s=0.02),
            entry("fake-llm", "llm", reply="The large model's answer."),
            entry("fake-slow", "custom", reply=SLOW_REPLY, token_delay_s=0.1),
            entry("fake-broken", "custom", fail_load="weights are corrupt"),
        ],
        user_file=isolated_home / "models.toml",
    )
    app = create_app(settings, catalog=catalog)
    return serve_app(app), app


# ---------------------------------------------------------------- helpers


def open_page(page: Any, base: str) -> None:
    page.goto(base + "/")
    page.wait_for_selector("#service-status[data-state=up]")


def ask(page: Any, model: str, prompt: str, *, max_tokens: int = 32) -> Any:
    """Pick a model, type, press Enter (the keyboard path); returns the answer's locator."""
    page.select_option("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.locator("#temperature").evaluate(
        "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    count = page.locator("#messages > li.assistant").count()
    page.fill("#prompt", prompt)
    page.locator("#prompt").press("Enter")
    return page.locator("#messages > li.assistant").nth(count)


def wait_finished(answer: Any, timeout_ms: int = 120_000) -> str:
    answer.locator("xpath=self::*[not(@data-state='streaming')]").wait_for(timeout=timeout_ms)
    return answer.get_attribute("data-state")


def chart_rows(page: Any) -> list[list[str]]:
    rows = page.locator("#chart-data tbody tr")
    return [rows.nth(i).locator("td").all_text_contents() for i in range(rows.count())]


def record_lengths(page: Any) -> None:
    """Note the answer's length at every DOM change, to see tokens arrive one by one."""
    page.evaluate(
        """() => {
          window.__lengths = [];
          new MutationObserver(() => {
            const text = document.querySelector('#messages > li.assistant:last-child .text');
            if (text) window.__lengths.push(text.textContent.length);
          }).observe(document.getElementById('messages'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else f"{parts.scheme}:"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"playground-{name}.png"), full_page=True)


# ---------------------------------------------------------------- tests: fake engine


def test_page_loads_with_models_controls_and_labels(page: Any, fake: tuple[str, Any]) -> None:
    base, _ = fake
    open_page(page, base)
    values = page.locator("#model option").evaluate_all("os => os.map(o => o.value)")
    assert {"fake-slm", "fake-llm", "hybrid", "rag:inline"} <= set(values)
    # nothing exported in this home: the page says how to get an in-browser model
    assert "export-web" in page.locator("#model optgroup[label='In this browser']").inner_text()
    # headless chromium with --disable-gpu has no adapter: the page says WASM runs instead
    assert "WASM runs instead" in page.locator("#webgpu-status").inner_text()
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
                 .filter(el => !el.labels || el.labels.length === 0).map(el => el.id)"""
    )
    assert unlabeled == []
    assert page.locator("#chart").get_attribute("role") == "img"
    shot(page, "empty")


def test_stop_cancels_the_generation_on_the_server(page: Any, fake: tuple[str, Any]) -> None:
    base, _ = fake
    open_page(page, base)
    answer = ask(page, "fake-slow", "Count for me", max_tokens=500)
    answer.locator(".text").filter(has_text="word3").wait_for()
    assert page.locator("#stop").is_enabled()
    page.click("#stop")
    assert wait_finished(answer) == "stopped"
    assert "stopped" in answer.locator(".meta").inner_text()

    # the server noticed the client leaving and told the engine to stop
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/openai/status").json()
        slow = next(m for m in status["loaded"] if m["id"] == "fake-slow")
        if slow["cancelled"] == 1 and slow["active"] == 0:
            break
        time.sleep(0.1)
    assert slow["cancelled"] == 1 and slow["active"] == 0, slow
    metrics = httpx.get(f"{base}/metrics").text
    assert re.search(
        r'edgelm_generations_total\{finish="cancelled",model="fake-slow"\} 1\.0', metrics
    )
    produced = status["metrics"]["models"]["fake-slow"]["completion_tokens"]
    assert 0 < produced < 200  # cut short, not run to the end
    # a stopped answer does not go on the chart (its latency would mislead)
    assert chart_rows(page) == []
    assert page.locator("#send").is_enabled()
    shot(page, "stopped")


def test_escape_key_stops_too(page: Any, fake: tuple[str, Any]) -> None:
    base, _ = fake
    open_page(page, base)
    answer = ask(page, "fake-slow", "Count again", max_tokens=500)
    answer.locator(".text").filter(has_text="word2").wait_for()
    page.keyboard.press("Escape")
    assert wait_finished(answer) == "stopped"


def test_context_box_answers_from_it_with_citations(page: Any, fake: tuple[str, Any]) -> None:
    base, app = fake
    open_page(page, base)
    page.fill(
        "#context",
        "The weather mast runs on a battery.\n\nA full mast battery lasts about 45 days "
        "without sun, then the mast sleeps until the panel charges it again.",
    )
    answer = ask(page, "fake-slm", "How long does a full mast battery last without sun?")
    assert wait_finished(answer) == "done"
    assert "rag:inline@fake-slm" in answer.locator(".who").inner_text()
    citations = answer.locator(".citations")
    assert "Sources" in citations.inner_text()
    first = citations.locator("summary").first
    assert first.inner_text().startswith("[1]")
    first.click()  # open the cited text
    assert "45 days" in citations.locator("blockquote").first.inner_text()

    # the model was asked under the "only the provided context" rule, with the context
    engine = app.state.edgelm.pool.models["fake-slm"].engine
    sent = engine.requests[-1].messages
    assert "ONLY the provided context" in sent[0].text()
    assert "45 days" in sent[-1].text()
    shot(page, "context")


def test_model_failure_and_unreachable_service_are_clear(page: Any, fake: tuple[str, Any]) -> None:
    base, _ = fake
    open_page(page, base)
    answer = ask(page, "fake-broken", "Hello?")
    assert wait_finished(answer) == "error"
    error = page.locator("#error")
    assert "fake-broken" in error.inner_text() and "weights are corrupt" in error.inner_text()
    assert error.get_attribute("role") == "alert"

    # a page pointed at a service that is not there says so, and how to start one
    closed = f"http://127.0.0.1:{free_port()}"
    page.goto(f"{base}/?service={closed}")
    page.wait_for_selector("#service-status[data-state=down]")
    assert "edgelm service start" in page.locator("#error").inner_text()
    shot(page, "unreachable")


# ---------------------------------------------------------------- tests: the real model


def test_streams_switches_models_and_charts_them(page: Any, real: str) -> None:
    open_page(page, real)
    record_lengths(page)
    answer = ask(page, TINY, STREAM_PROMPT, max_tokens=40)
    assert wait_finished(answer) == "done"
    text = answer.locator(".text").inner_text()
    assert len(text) > 20
    lengths = page.evaluate("window.__lengths")
    growing = sorted(set(n for n in lengths if 0 < n < len(text)))
    assert len(growing) >= 3, f"tokens did not arrive incrementally: {lengths}"
    assert lengths == sorted(lengths)
    assert page.locator("#m-model").inner_text() == TINY
    assert page.locator("#m-where").inner_text() == "service"
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", page.locator("#m-ttft").inner_text())
    assert float(page.locator("#m-tps").inner_text()) > 0
    prompt_tokens, completion_tokens = page.locator("#m-tokens").inner_text().split(" / ")
    assert int(prompt_tokens) > 5 and 0 < int(completion_tokens) <= 40
    before = page.locator("#chart").evaluate("c => c.toDataURL()")

    answer = ask(page, "fake-echo", "And now you?")
    assert wait_finished(answer) == "done"
    assert "answers quickly" in answer.locator(".text").inner_text()
    assert page.locator("#chart").evaluate("c => c.toDataURL()") != before
    rows = chart_rows(page)
    assert [row[1] for row in rows] == [TINY, "fake-echo"]
    legend = page.locator("#chart-legend li").all_inner_texts()
    assert legend == [TINY, "fake-echo"]
    assert "2 answers" in page.locator("#chart").get_attribute("aria-label")
    page.locator("#chart-details summary").click()
    shot(page, "service")


def test_in_browser_model_runs_on_wasm_beside_the_service(page: Any, real: str) -> None:
    """The exported SmolLM2 runs inside the page (WASM: no GPU here), its files served by the
    service only; its figures and the service's for the same prompt land on one chart.

    Prints both sides' figures; EDGELM_PLAYGROUND_REPEAT=N asks N times each (medians).
    """
    origins: set[str] = set()
    page.on("request", lambda r: origins.add(origin_of(r.url)))
    open_page(page, real)
    prompt = "What is the capital of France?"
    for _ in range(REPEAT):
        for model in (TINY, f"browser:{TINY}"):
            page.click("#reset")  # the same prompt each time, no history
            answer = ask(page, model, prompt, max_tokens=32)
            state = wait_finished(answer, timeout_ms=300_000)
            assert state == "done", page.locator("#error").inner_text()
            assert answer.locator(".text").inner_text().strip()

    assert "in browser (WASM)" in answer.locator(".who").inner_text()
    assert page.locator("#m-where").inner_text() == "browser (WASM)"
    assert page.locator("#webgpu-status").get_attribute("data-ran") == "wasm"
    series = [row[1] for row in chart_rows(page)]
    assert series[-2:] == [TINY, f"{TINY} · browser (WASM)"]
    assert page.locator("#chart-legend li").count() == 2
    # offline: every request went to the service itself (or stayed inside the page)
    assert origins - {"data:", "blob:"} == {real}
    page.locator("#chart-details summary").click()
    shot(page, "in-browser")
    print("\n[COMPARISON RESULTS]\n" + json.dumps(figures(page), indent=1))


def figures(page: Any) -> list[dict[str, Any]]:
    """Median TTFT, decode tok/s and total per series, from the chart table's raw figures."""
    rows = page.locator("#chart-data tbody tr").evaluate_all(
        "rows => rows.map(r => ({...r.dataset}))"
    )
    out = []
    for name in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == name]

        def median(key: str, mine: list[dict[str, str]] = mine) -> float | None:
            values = sorted(float(r[key]) for r in mine if r[key])
            return round(values[len(values) // 2], 1) if values else None

        out.append(
            {
                "series": name,
                "answers": len(mine),
                "ttft_ms": median("ttftMs"),
                "decode_tok_s": median("tps"),
                "total_ms": median("totalMs"),
                "completion_tokens": median("completionTokens"),
            }
        )
    return out


def test_webgpu_adapter_is_detected_and_a_failing_webgpu_falls_back_to_wasm(
    page: Any, real: str
) -> None:
    """This machine has no usable GPU, so a WebGPU adapter is faked in the page: the page
    picks WebGPU, the runtime cannot use it, and the model runs on WASM, saying why."""
    page.add_init_script(
        """Object.defineProperty(navigator, 'gpu', {configurable: true, value: {
             requestAdapter: async () => ({isFallbackAdapter: false,
                                           info: {vendor: 'test-vendor', architecture: 'fake'}}),
           }});"""
    )
    open_page(page, real)
    assert "WebGPU: available" in page.locator("#webgpu-status").inner_text()
    assert page.locator("#webgpu-status").get_attribute("data-usable") == "true"
    answer = ask(page, f"browser:{TINY}", "Say hello.", max_tokens=8)
    assert wait_finished(answer, timeout_ms=300_000) == "done", page.locator("#error").inner_text()
    assert "WebGPU failed" in page.locator("#progress").inner_text()
    assert "in browser (WASM)" in answer.locator(".who").inner_text()
    assert page.locator("#webgpu-status").get_attribute("data-ran") == "wasm"
    shot(page, "webgpu-fallback")
