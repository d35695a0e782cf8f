"""A bounded soak: loopback only, fixed duration and request cap, fake engine. It must end
with no errors and flat memory; the figures are printed for the record, not asserted as speed."""

from __future__ import annotations

import gc
import threading
import time

import httpx
import psutil

from edgelm.server.app import create_app

DURATION_S = 8.0
MAX_REQUESTS = 5000
WORKERS = 4


def test_soak_no_errors_and_flat_memory(settings, catalog, serve_app) -> None:
    base = serve_app(create_app(settings, catalog=catalog))
    counts = {"ok": 0, "errors": 0, "stream": 0}
    cap = {"total": MAX_REQUESTS}  # per burst: the warm-up alone can reach it on a fast machine
    lock = threading.Lock()
    process = psutil.Process()

    def worker(n: int) -> None:
        deadline = time.monotonic() + DURATION_S
        with httpx.Client(base_url=base, timeout=10) as client:
            i = 0
            while time.monotonic() < deadline:
                with lock:
                    if counts["ok"] + counts["errors"] >= cap["total"]:
                        return
                body = {
                    "model": "fake-a",
                    "messages": [{"role": "user", "content": f"q{n}-{i}"}],
                    "stream": i % 2 == 0,
                }
                try:
                    response = client.post("/v1/chat/completions", json=body)
                    text = response.text
                    if body["stream"]:
                        complete = text.endswith("data: [DONE]\n\n") and '"error"' not in text
                    else:
                        complete = "Fake answer" in text
                    good = response.status_code == 200 and complete
                except httpx.HTTPError:
                    good = False
                with lock:
                    counts["ok" if good else "errors"] += 1
                    counts["stream"] += int(body["stream"])
                i += 1

    def burst() -> None:
        cap["total"] = counts["ok"] + counts["errors"] + MAX_REQUESTS
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    burst()  # warm up allocators and caches before taking the baseline
    gc.collect()
    before = process.memory_info().rss
    warm = counts["ok"]
    start = time.monotonic()
    burst()
    elapsed = time.monotonic() - start
    gc.collect()
    after = process.memory_info().rss
    served = counts["ok"] - warm
    print(
        f"soak: {served} requests in {elapsed:.1f} s ({served / elapsed:.0f}/s), "
        f"{counts['errors']} errors, RSS {before / 1e6:.1f} → {after / 1e6:.1f} MB"
    )
    assert counts["errors"] == 0
    assert served > 100
    assert after - before < 40e6  # flat: bounded metrics history, no per-request leaks
