"""The pool hands a batching engine as many concurrent streams as it runs together."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.engines.fake import FakeEngine, FakeScript
from edgelm.errors import ConfigError, Overloaded
from edgelm.pool import ModelPool
from edgelm.settings import Settings, load_settings
from edgelm.types import Chunk, GenerationRequest, Message

REQ = GenerationRequest(messages=[Message(role="user", content="one two three four five six")])


class CountingEngine(FakeEngine):
    """A fake engine that records how many of its streams ran at the same time."""

    def __init__(self, model_id: str, script: FakeScript):
        super().__init__(model_id, script)
        self.active = 0
        self.peak = 0
        self._count = threading.Lock()

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        with self._count:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield from super().stream(request, cancel)
        finally:
            with self._count:
                self.active -= 1


def make_pool(home: Path, streams: int, **overrides: object) -> ModelPool:
    settings = load_settings(overrides, env={"EDGELM_HOME": str(home)})
    entry = CatalogEntry(
        alias="m",
        engine="fake",
        size_bytes=2**20,
        options={"streams": streams, "token_delay_s": 0.02, "memory_mb": 1},
    )

    def factory(e: CatalogEntry, s: Settings, path: Path | None) -> CountingEngine:
        return CountingEngine(e.alias, FakeScript.from_options(e.options))

    return ModelPool(settings, Catalog([entry]), engine_factory=factory)


async def drain(pool: ModelPool) -> str:
    return "".join([c.text async for c in pool.stream("m", REQ)])


@pytest.mark.parametrize("streams", [1, 3])
def test_engine_gets_exactly_as_many_streams_as_it_batches(
    isolated_home: Path, streams: int
) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, streams)
        answers = await asyncio.gather(*(drain(pool) for _ in range(7)))
        engine = pool.models["m"].engine
        assert isinstance(engine, CountingEngine)
        assert answers == [answers[0]] * 7 and answers[0]
        assert engine.peak == streams  # all it can batch at once, never more
        assert pool.models["m"].requests == 7
        await pool.close()

    asyncio.run(main())


def test_wide_batches_are_not_capped_by_a_thread_pool(isolated_home: Path) -> None:
    """Each stream holds a thread for its whole answer; asyncio's default executor has at most
    32 (cores + 4 on small machines), which once made the 7th and 8th streams on 2 cores wait
    for whole answers."""

    async def main() -> None:
        pool = make_pool(isolated_home, 40, **{"compute.parallel": 40})
        await asyncio.gather(*(drain(pool) for _ in range(40)))
        engine = pool.models["m"].engine
        assert isinstance(engine, CountingEngine)
        assert engine.peak == 40
        await pool.close()

    asyncio.run(main())


def test_requests_beyond_the_batch_wait_in_the_bounded_queue(isolated_home: Path) -> None:
    async def main() -> None:
        pool = make_pool(isolated_home, 2, **{"service.max_queue": 1})
        running = [asyncio.create_task(drain(pool)) for _ in range(3)]
        await asyncio.sleep(0.05)  # two are in the engine's batch, one waits
        loaded = pool.models["m"]
        assert (loaded.active, loaded.waiting) == (2, 1)
        with pytest.raises(Overloaded):
            await drain(pool)
        await asyncio.gather(*running)
        assert (loaded.active, loaded.waiting) == (0, 0)
        await pool.close()

    asyncio.run(main())


def test_settings_carry_the_batch_width() -> None:
    settings = load_settings({"compute.parallel": 8}, env={})
    assert settings.compute.parallel == 8
    with pytest.raises(ConfigError, match=r"compute\.parallel"):
        load_settings({"compute.parallel": 0}, env={})
