"""Which models are loaded, and who may use them when.

Models load on first use, stay while used, unload after an idle TTL, and never exceed the
memory budget (the least recently used idle model goes first). Engines that cannot run two
streams at once get one slot; a bounded queue in front of it turns overload into a clear 503
instead of an ever-growing wait. Engine calls are blocking, so they run in worker threads and
stream back to the event loop through :meth:`ModelPool.stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.engines import load_engine
from edgelm.engines.base import Engine, check_capabilities
from edgelm.engines.sizing import memory_budget_bytes
from edgelm.errors import (
    Busy,
    EdgelmError,
    EngineFailed,
    GenerationTimeout,
    ModelLoadError,
    Overloaded,
)
from edgelm.settings import Settings
from edgelm.types import Chunk, GenerationRequest
from edgelm.variants import VariantChooser

log = logging.getLogger("edgelm.pool")

CATALOG_SWEEP_S = 2.0
"""How often the pool looks for models removed from the catalog while loaded."""
EngineFactory = Callable[[CatalogEntry, Settings, Path | None], Engine]
_DONE = object()
_TIMED_OUT = object()


def _engine_failure(alias: str, exc: BaseException) -> BaseException:
    """What the client is told when an engine raises: our own errors as they are, anything
    else as :class:`EngineFailed` naming the model and the cause (and logged with its
    traceback), never a bare 500 "internal error"."""
    if isinstance(exc, EdgelmError) or not isinstance(exc, Exception):
        return exc
    log.error("engine of %s failed", alias, exc_info=exc)
    return EngineFailed(f"model '{alias}' failed while generating: {type(exc).__name__}: {exc}")


@dataclass
class LoadedModel:
    entry: CatalogEntry
    engine: Engine
    loaded_at: float
    load_seconds: float
    last_used: float
    slots: asyncio.Semaphore
    active: int = 0
    waiting: int = 0
    requests: int = 0
    cancelled: int = 0

    def info(self) -> dict[str, object]:
        return {
            "id": self.entry.alias,
            "engine": self.engine.name,
            "tier": self.entry.tier,
            "memory_bytes": self.engine.memory_bytes,
            "n_ctx": self.engine.n_ctx,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
            "idle_seconds": round(max(0.0, time.monotonic() - self.last_used), 1),
            "active": self.active,
            "waiting": self.waiting,
            "requests": self.requests,
            "cancelled": self.cancelled,
            "runtime": self.engine.live_info(),
        }


@dataclass
class PoolStats:
    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    evictions: int = 0
    runner_crashes: int = 0  # runner processes that died under a loaded model
    extra: dict[str, int] = field(default_factory=dict)


class ModelPool:
    """Loads, shares and unloads engines. One instance per service (no module globals)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        resolve_path: Callable[[CatalogEntry], Path | None] | None = None,
        engine_factory: EngineFactory = load_engine,
    ):
        self.settings = settings
        self.catalog = catalog
        self.resolve_path = resolve_path or (lambda entry: entry.path)
        self.engine_factory = engine_factory
        # A bare alias loads its fastest variant measured here (edgelm model optimize).
        self.variants = VariantChooser(settings, _store_availability(settings))
        self.models: dict[str, LoadedModel] = {}
        self.stats = PoolStats()
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        # A stream of an engine without a native astream() (ONNX, remote) holds a thread for
        # its whole answer. asyncio's default executor has cores + 4 threads (6 here), so the
        # 7th and 8th concurrent streams waited for whole answers before starting (TTFT p50
        # 0.93 s at 8 streams instead of 0.2 s); and loads, downloads and embeddings share that
        # executor. Streams get threads of their own, created on demand and bounded by the
        # models' slots.
        self._stream_threads = ThreadPoolExecutor(
            max_workers=max(32, settings.pool.max_loaded * 64), thread_name_prefix="edgelm-stream"
        )

    def entry_for(self, name: str) -> CatalogEntry:
        """The catalog entry that serves ``name`` (its chosen variant for a bare alias)."""
        return self.variants.choose(self.catalog, name).entry

    # -- budget ---------------------------------------------------------------------------
    @property
    def memory_budget(self) -> int:
        return memory_budget_bytes(self.settings.pool)

    def _estimate(self, entry: CatalogEntry) -> int:
        """Memory a model will take before it is loaded: weights plus ~25% for KV and buffers."""
        return int(entry.size_bytes * 1.25)

    def used_memory(self) -> int:
        return sum(m.engine.memory_bytes for m in self.models.values())

    async def _make_room(self, entry: CatalogEntry) -> None:
        self._forget_crashed()
        need = self._estimate(entry)
        budget = self.memory_budget
        if need > budget:
            raise ModelLoadError(
                f"model '{entry.alias}' needs about {need // 2**20} MiB but the memory budget "
                f"is {budget // 2**20} MiB (setting pool.memory_budget_mb)"
            )
        while self.models and (
            self.used_memory() + need > budget or len(self.models) >= self.settings.pool.max_loaded
        ):
            idle = [m for m in self.models.values() if m.active == 0 and m.waiting == 0]
            if not idle:
                raise Overloaded(
                    f"cannot load '{entry.alias}': the memory budget is taken by models that are "
                    "busy; retry shortly"
                )
            victim = min(idle, key=lambda m: m.last_used)
            log.info("evicting %s to make room for %s", victim.entry.alias, entry.alias)
            self.stats.evictions += 1
            await self.unload(victim.entry.alias)

    # -- load / unload -----------------------------------------------------------------------
    async def get(self, name: str) -> LoadedModel:
        """The loaded model for ``name`` (alias, extra alias or full name), loading it if needed.

        A bare alias may be served by one of its converted variants, the fastest measured on
        this machine, unless the user named or pinned one (see :mod:`edgelm.variants`).
        """
        entry = self.entry_for(name)
        loaded = self.models.get(entry.alias)
        if (
            loaded is not None
            and loaded.engine.failure() is None
            and (loaded.entry == entry or _busy(loaded))
        ):
            return loaded  # a changed entry is reloaded once its model is idle
        self._forget_crashed()
        lock = self._load_locks.setdefault(entry.alias, asyncio.Lock())
        async with lock:
            self._forget_crashed()  # one that died while this request waited for the lock
            loaded = self.models.get(entry.alias)
            if loaded is not None:
                if loaded.entry == entry or _busy(loaded):
                    return loaded
                log.info("%s changed in the catalog; reloading it", entry.alias)
                await self.unload(entry.alias)
            await self._make_room(entry)
            start = time.perf_counter()
            try:
                path = self.resolve_path(entry) if entry.needs_file else None
                engine = await asyncio.to_thread(self.engine_factory, entry, self.settings, path)
            except EdgelmError:
                self.stats.load_failures += 1
                raise
            except MemoryError:
                self.stats.load_failures += 1
                raise ModelLoadError(f"out of memory while loading '{entry.alias}'") from None
            except Exception as exc:  # a backend failing in any way must not take the service down
                self.stats.load_failures += 1
                log.exception("loading %s failed", entry.alias)
                raise ModelLoadError(f"could not load '{entry.alias}': {exc}") from exc
            now = time.monotonic()
            # A batching engine gets as many requests at once as it runs together; the rest
            # wait here, where the queue bound and the request timeout apply.
            slots = max(1, int(engine.concurrent_streams))
            loaded = LoadedModel(
                entry=entry,
                engine=engine,
                loaded_at=time.time(),
                load_seconds=time.perf_counter() - start,
                last_used=now,
                slots=asyncio.Semaphore(slots),
            )
            self.models[entry.alias] = loaded
            self.stats.loads += 1
            log.info("loaded %s in %.2fs", entry.alias, loaded.load_seconds)
            return loaded

    async def unload(self, name: str, force: bool = False) -> bool:
        """Unload a model; refuse (409) while it serves requests, so no stream is cut off.

        A loaded model is found by its alias even when it has left the catalog meanwhile, and
        a bare alias finds the variant that serves it."""
        alias = name
        if alias not in self.models:
            alias = self.catalog.resolve(name).alias
        if alias not in self.models:
            alias = self.entry_for(name).alias
        loaded = self.models.get(alias)
        if loaded is None:
            return False
        if _busy(loaded) and not force:
            raise Busy(f"model '{alias}' is serving {loaded.active} request(s); unload it later")
        del self.models[alias]
        await asyncio.to_thread(loaded.engine.close)
        self.stats.unloads += 1
        log.info("unloaded %s", alias)
        return True

    async def unload_stale(self) -> list[str]:
        """Unload idle models that left the catalog, or whose entry changed, since they were
        loaded (``edgelm model remove`` / ``add`` while the service runs). A busy one finishes
        its requests first: it is unloaded on a later sweep, and takes no new ones if removed."""
        stale = []
        for alias, loaded in list(self.models.items()):
            current = self.catalog.entries.get(alias)
            if current != loaded.entry and not _busy(loaded):
                stale.append(alias)
        for alias in stale:
            log.info("%s left or changed in the catalog; unloading it", alias)
            await self.unload(alias)
        return stale

    def _forget_crashed(self) -> None:
        """Drop models whose runner process died (see :mod:`edgelm.engines.isolated`): their
        requests have ended with the reason, and the next one loads the model again."""
        for alias, loaded in list(self.models.items()):
            failure = loaded.engine.failure()
            if failure is None:
                continue
            del self.models[alias]
            self.stats.runner_crashes += 1
            log.warning("dropped %s: %s", alias, failure)
            loaded.engine.close()  # the process is gone already: this only reaps it

    async def unload_idle(self) -> list[str]:
        ttl = self.settings.pool.idle_ttl_s
        if not ttl:
            return []
        now = time.monotonic()
        stale = [
            alias
            for alias, m in self.models.items()
            if m.active == 0 and m.waiting == 0 and now - m.last_used >= ttl
        ]
        for alias in stale:
            await self.unload(alias)
        return stale

    async def start(self) -> None:
        """Start the idle reaper (called from the app's lifespan)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        """Every few seconds: pick up catalog changes (unloading removed models once idle),
        and unload models idle for longer than the TTL."""
        ttl = self.settings.pool.idle_ttl_s
        interval = max(0.05, min(CATALOG_SWEEP_S, ttl / 4)) if ttl else CATALOG_SWEEP_S
        while True:
            await asyncio.sleep(interval)
            try:
                self.catalog.refresh()
                await self.unload_stale()
                await self.unload_idle()
            except Exception:  # keep reaping whatever one unload did
                log.exception("idle unload failed")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for alias in list(self.models):
            await self.unload(alias, force=True)
        self._stream_threads.shutdown(wait=False, cancel_futures=True)

    # -- use ---------------------------------------------------------------------------------
    async def _acquire(self, loaded: LoadedModel) -> Engine:
        """Take one of the model's slots; refuse with 503 when its queue is full."""
        if loaded.slots.locked() and loaded.waiting >= self.settings.service.max_queue:
            raise Overloaded(
                f"model '{loaded.entry.alias}' has {loaded.waiting} requests waiting; retry later"
            )
        loaded.waiting += 1
        try:
            await loaded.slots.acquire()
        finally:
            loaded.waiting -= 1
        loaded.active += 1
        loaded.requests += 1
        loaded.last_used = time.monotonic()
        return loaded.engine

    @staticmethod
    def _release(loaded: LoadedModel) -> None:
        loaded.active -= 1
        loaded.last_used = time.monotonic()
        loaded.slots.release()

    @contextlib.asynccontextmanager
    async def slot(self, loaded: LoadedModel) -> AsyncIterator[Engine]:
        engine = await self._acquire(loaded)
        try:
            yield engine
        finally:
            self._release(loaded)

    async def stream(self, name: str, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Run the engine's stream and yield its chunks on the event loop.

        An engine with a native :meth:`~Engine.astream` runs as a task on the loop; any other
        runs ``engine.stream`` in a worker thread. Closing this iterator early (a client went
        away) sets the engine's cancel event, so the model stops at the next token; the slot is
        released only once the producer has really finished, so an engine that cannot run two
        streams never sees two. A request the engine cannot honour is refused before it
        queues for a slot.
        """
        loaded = await self.get(name)
        check_capabilities(loaded.engine, request)
        engine = await self._acquire(loaded)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            try:
                for chunk in engine.stream(request, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                    if cancel.is_set():
                        break
            except BaseException as exc:  # handed to the consumer and re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        async def produce_on_loop() -> None:
            try:
                async for chunk in engine.astream(request, cancel):
                    queue.put_nowait(chunk)
            except asyncio.CancelledError:
                raise  # the consumer left and cancelled this task; nobody is listening
            except BaseException as exc:  # handed to the consumer and re-raised there
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(_DONE)

        worker: asyncio.Future[None]
        try:
            if engine.native_async:
                worker = loop.create_task(produce_on_loop())
            else:
                worker = loop.run_in_executor(self._stream_threads, produce)
        except BaseException:
            self._release(loaded)
            raise
        finished = False
        # The deadline arrives through the queue like a chunk: one timer for the whole answer
        # (asyncio.wait_for around each get made a task per token on Python 3.11).
        timer = loop.call_later(
            self.settings.service.request_timeout_s, queue.put_nowait, _TIMED_OUT
        )
        try:
            while True:
                item = await queue.get()
                if item is _TIMED_OUT:
                    raise GenerationTimeout(
                        f"generation on '{loaded.entry.alias}' ran past "
                        f"{self.settings.service.request_timeout_s:g} s and was stopped "
                        "(setting service.request_timeout_s)"
                    )
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise _engine_failure(loaded.entry.alias, item)
                assert isinstance(item, Chunk)
                yield item
        finally:
            timer.cancel()
            if finished:
                self._release(loaded)  # the engine's generator has returned
            else:
                cancel.set()
                loaded.cancelled += 1
                worker.add_done_callback(lambda _f: self._release(loaded))
                if isinstance(worker, asyncio.Task):
                    worker.cancel()

    async def embed(self, name: str, texts: list[str]) -> tuple[list[list[float]], int]:
        loaded = await self.get(name)
        loaded.engine.require("embeddings")  # refused before it queues for a slot
        async with self.slot(loaded) as engine:
            try:
                return await asyncio.to_thread(engine.embed, texts)
            except Exception as exc:
                raise _engine_failure(loaded.entry.alias, exc) from exc

    def loaded_info(self) -> list[dict[str, object]]:
        self._forget_crashed()
        return [m.info() for m in self.models.values()]


def _busy(loaded: LoadedModel) -> bool:
    return bool(loaded.active or loaded.waiting)


def _store_availability(settings: Settings) -> Callable[[CatalogEntry], bool]:
    """Whether a variant's files are present (the model cache's own notion of "ready")."""
    from edgelm.model_cache import ModelStore

    return ModelStore(settings).is_ready
