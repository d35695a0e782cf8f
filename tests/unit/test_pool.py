"""Load on demand, idle unload, memory budget, queue limits and cancellation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.errors import Busy, EngineFailed, GenerationTimeout, ModelLoadError, Overloaded
from edgelm.pool import ModelPool
from edgelm.settings import load_settings
from edgelm.types import GenerationRequest, Message


def entry(alias: str, memory_mb: int = 10, **options) -> CatalogEntry:
    return CatalogEntry(
        alias=alias,
        engine="fake",
        size_bytes=memory_mb * 2**20,
        options={"memory_mb": memory_mb, **options},
    )


def make_pool(home: Path, entries: list[CatalogEntry], **overrides) -> ModelPool:
    settings = load_settings(overrides, env={"EDGELM_HOME": str(home)})
    return ModelPool(settings, Catalog(entries))


REQ = GenerationRequest(messages=[Message(role="user", content="hi")])


async def drain(pool: ModelPool, name: str) -> str:
    return "".join([c.text async for c in pool.stream(name, REQ)])


def test_loads_on_demand_once(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, [entry("a", load_delay_s=0.05)])
        results = await asyncio.gather(*(drain(pool, "a") for _ in range(5)))
        assert results == ["Fake answer to: hi"] * 5
        assert pool.stats.loads == 1
        assert pool.models["a"].requests == 5
        await pool.close()

    asyncio.run(main())


def test_idle_unload(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, [entry("a")], **{"pool.idle_ttl_s": 0.1})
        await pool.start()
        await drain(pool, "a")
        assert "a" in pool.models
        await asyncio.sleep(0.4)
        assert "a" not in pool.models and pool.stats.unloads == 1
        await pool.close()

    asyncio.run(main())


def test_memory_budget_evicts_least_recently_used(isolated_home: Path) -> None:
    async def main() -> None:
        entries = [entry("a", 40), entry("b", 40), entry("c", 40)]
        pool = make_pool(isolated_home, entries, **{"pool.memory_budget_mb": 100})
        await drain(pool, "a")
        await drain(pool, "b")
        await drain(pool, "a")  # b is now the least recently used
        await drain(pool, "c")
        assert set(pool.models) == {"a", "c"} and pool.stats.evictions == 1
        await pool.close()

    asyncio.run(main())


def test_budget_too_small_is_clear(isolated_home: Path) -> None:
    async def main() -> None:
        big = CatalogEntry(alias="big", engine="llamacpp", size_bytes=10 * 2**30)
        pool = make_pool(isolated_home, [big], **{"pool.memory_budget_mb": 1024})
        with pytest.raises(ModelLoadError, match="memory budget"):
            await pool.get("big")

    asyncio.run(main())


def test_max_loaded(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, [entry("a"), entry("b")], **{"pool.max_loaded": 1})
        await drain(pool, "a")
        await drain(pool, "b")
        assert list(pool.models) == ["b"]
        await pool.close()

    asyncio.run(main())


def test_serialised_engine_and_queue_limit(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(
            isolated_home,
            [entry("slow", reply="a b c d e", token_delay_s=0.02)],
            **{"service.max_queue": 2},
        )
        loaded = await pool.get("slow")
        loaded.slots = asyncio.Semaphore(1)  # behave like a single-stream engine
        results = await asyncio.gather(
            *(drain(pool, "slow") for _ in range(5)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if isinstance(r, Overloaded)]
        assert len(ok) == 3 and len(refused) == 2
        assert all(r == "a b c d e" for r in ok)
        await pool.close()

    asyncio.run(main())


async def wait_idle(loaded) -> None:  # type: ignore[no-untyped-def]
    """Until the model's last stream has let go of its slot (or a second has passed)."""
    for _ in range(100):
        if loaded.active == 0:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("on_loop", [False, True], ids=["thread", "on-loop"])
def test_closing_stream_cancels_generation(isolated_home: Path, on_loop: bool) -> None:
    async def main() -> None:
        pool = make_pool(
            isolated_home,
            [entry("slow", reply="w " * 200, token_delay_s=0.01, on_loop=on_loop)],
        )
        stream = pool.stream("slow", REQ)
        async for _chunk in stream:
            break
        await stream.aclose()
        loaded = pool.models["slow"]
        await wait_idle(loaded)
        assert loaded.active == 0 and loaded.cancelled == 1
        engine = loaded.engine
        assert len(engine.requests) == 1
        await pool.close()

    asyncio.run(main())


def test_unload_refuses_while_busy(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, [entry("slow", reply="w " * 20, token_delay_s=0.01)])
        stream = pool.stream("slow", REQ)
        await anext(stream)
        with pytest.raises(Busy):
            await pool.unload("slow")
        await stream.aclose()
        await asyncio.sleep(0.1)
        assert await pool.unload("slow")

    asyncio.run(main())


def test_failed_load_is_reported_and_retried(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, [entry("bad", fail_load="corrupt"), entry("good")])
        with pytest.raises(ModelLoadError, match="corrupt"):
            await pool.get("bad")
        assert await drain(pool, "good")
        assert pool.stats.load_failures == 1 and "bad" not in pool.models
        await pool.close()

    asyncio.run(main())


# -- an engine that streams on the event loop (as llama.cpp's does) -------------------------


def test_an_on_loop_engine_streams_without_a_thread(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, [entry("loop", reply="a b c", on_loop=True)])
        before = {t.name for t in threading.enumerate()}
        assert await drain(pool, "loop") == "a b c"
        started = {t.name for t in threading.enumerate()} - before
        assert not [name for name in started if name.startswith("edgelm-stream")]
        loaded = pool.models["loop"]
        assert loaded.engine.native_async and loaded.active == 0
        await pool.close()

    asyncio.run(main())


def test_an_on_loop_engine_failure_reaches_the_consumer(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(
            isolated_home, [entry("loop", reply="a b c d", fail_after_tokens=2, on_loop=True)]
        )
        seen = []
        # Named for the client: the model, the cause, a code (not a bare internal error).
        with pytest.raises(EngineFailed, match=r"model 'loop' failed .*RuntimeError: scripted"):
            async for chunk in pool.stream("loop", REQ):
                seen.append(chunk.text)
        assert "".join(seen) == "a b "
        await asyncio.sleep(0.01)  # the slot is released by the finished producer's callback
        assert pool.models["loop"].active == 0
        await pool.close()

    asyncio.run(main())


def test_an_on_loop_stream_past_its_deadline_is_stopped(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(
            isolated_home,
            [entry("loop", reply="w " * 200, token_delay_s=0.02, on_loop=True)],
            **{"service.request_timeout_s": 0.2},
        )
        with pytest.raises(GenerationTimeout, match="request_timeout_s"):
            await drain(pool, "loop")
        loaded = pool.models["loop"]
        await wait_idle(loaded)
        assert loaded.active == 0 and loaded.cancelled == 1
        await pool.close()

    asyncio.run(main())
