"""What a benchmark talks to: a model run in-process, an edgelm service, or any
OpenAI-compatible URL (Ollama, llama.cpp's server, vLLM, Foundry Local, a cloud endpoint).

Every target answers one prompt at a time through :meth:`Target.request`, measured on the
client side, and may be called from several threads at once (the runner's concurrency).
Spec strings, as typed on the command line:

    qwen2.5-0.5b                  the edgelm service if it is running, else in-process
    local:qwen2.5-0.5b            in-process engine (no HTTP)
    service:qwen2.5-0.5b          the edgelm service at settings.endpoint
    http://host:8080/v1#model     any OpenAI-compatible endpoint, model name after '#'
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import httpx

from edgelm.bench.results import ColdStart, RequestResult
from edgelm.bench.wire import WireClient
from edgelm.bench.workloads import Prompt
from edgelm.catalog import Catalog
from edgelm.client import ChatResult, EdgelmClient, is_up, resolve_service
from edgelm.engines import create_engine
from edgelm.engines.base import Engine
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.model_cache import ModelStore
from edgelm.settings import Settings
from edgelm.types import GenerationRequest, Message, decode_rate, prompt_rate


class Target(ABC):
    name: str
    kind: str
    model: str

    @abstractmethod
    def open(self) -> ColdStart:
        """Make the model ready, measuring the load and the first request after it."""

    @abstractmethod
    def request(self, prompt: Prompt, params: dict[str, Any]) -> RequestResult:
        """Send one prompt; never raises for a failed request (``ok=False`` instead)."""

    def pid(self) -> int | None:
        """The process whose memory and CPU the runner samples, when known."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (in-process targets) or the connection."""


def _failed(exc: BaseException, prompt: Prompt, start: float) -> RequestResult:
    message = exc.message if isinstance(exc, EdgelmError) else f"{type(exc).__name__}: {exc}"
    return RequestResult(
        ok=False, error=message, prompt_id=prompt.id, e2e_s=time.perf_counter() - start
    )


def _derive(result: RequestResult) -> RequestResult:
    """TPOT and tokens/s from the measured times and counts."""
    rate = decode_rate(result.completion_tokens, result.ttft_s, result.e2e_s)
    if rate is not None:
        result.decode_tokens_per_s = rate
        result.tpot_s = 1 / rate
    rate = prompt_rate(result.prompt_tokens, result.ttft_s)
    if rate is not None:
        result.prompt_tokens_per_s = rate
    return result


class InProcessTarget(Target):
    """The engine in this process: the reference that service overhead is measured against."""

    kind = "in-process"

    def __init__(self, alias: str, settings: Settings, catalog: Catalog | None = None):
        self.settings = settings
        from edgelm.variants import VariantChooser

        self.catalog = catalog or Catalog.load(settings.home)
        # What the alias serves with, as in the service and the micro bench (edgelm.variants).
        choice = VariantChooser(settings, ModelStore(settings).is_ready).choose(self.catalog, alias)
        self.entry = choice.entry
        self.model = choice.name
        self.name = f"local:{self.model}"
        self.engine: Engine | None = None
        # llama.cpp contexts run one stream at a time; concurrent callers queue here, as they
        # would in front of any single-stream engine.
        self._lock = threading.Lock()

    def open(self) -> ColdStart:
        store = ModelStore(self.settings)
        path = store.require(self.entry) if self.entry.needs_file else None
        start = time.perf_counter()
        self.engine = create_engine(self.entry, self.settings, path)
        return ColdStart(load_s=time.perf_counter() - start)

    def request(self, prompt: Prompt, params: dict[str, Any]) -> RequestResult:
        assert self.engine is not None, "open() first"
        start = time.perf_counter()
        try:
            gen = GenerationRequest(
                messages=[Message.model_validate(m) for m in prompt.messages],
                **{k: v for k, v in params.items() if v is not None},
            )
            prepared = time.perf_counter() - start
            lock = contextlib.nullcontext() if self.engine.concurrent_streams > 1 else self._lock
            with lock:
                queued = time.perf_counter() - start
                result = RequestResult(prompt_id=prompt.id, prepare_s=prepared)
                last: float | None = None
                for chunk in self.engine.stream(gen):
                    now = time.perf_counter() - start
                    if chunk.text:
                        if result.ttft_s is None:
                            result.ttft_s = now
                        elif last is not None:
                            result.itl_s.append(now - last)
                        last = now
                        result.text += chunk.text
                    result.prompt_tokens = chunk.prompt_tokens
                    result.completion_tokens = chunk.completion_tokens
            result.send_s = queued - prepared
            result.e2e_s = time.perf_counter() - start
            return _derive(result)
        except Exception as exc:  # a failed request is a data point, not a crash
            return _failed(exc, prompt, start)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class HttpTarget(Target):
    """An OpenAI-compatible HTTP endpoint: the edgelm service or anyone else's."""

    def __init__(
        self,
        base: str,
        model: str,
        kind: str = "openai",
        api_key: str | None = None,
        stream: bool = True,
        pid: int | None = None,
    ):
        base = base.rstrip("/")
        self.root = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.kind = kind
        self.stream = stream
        self.name = model if kind == "service" else f"{model}@{self.root}"
        self._pid = pid
        self.client = EdgelmClient(self.root, api_key=api_key or None)
        self.wire = WireClient(self.root, api_key=api_key or None)  # what answers are timed by

    def open(self) -> ColdStart:
        cold = ColdStart()
        if self.kind != "service":
            return cold  # an external server loads models its own way; nothing to time
        loaded = {m["id"] for m in self.client.loaded()}
        if self.model not in loaded:
            start = time.perf_counter()
            self.client.load(self.model)
            cold.load_s = time.perf_counter() - start
        if self._pid is None:
            status = self.client.status()
            self._pid = status.get("pid")
        return cold

    def request(self, prompt: Prompt, params: dict[str, Any]) -> RequestResult:
        start = time.perf_counter()
        try:
            if not self.stream:
                return self._non_streaming(prompt, params, start)
            result: ChatResult = self.wire.chat_once(self.model, prompt.messages, **params)
        except Exception as exc:  # a failed request is a data point, not a crash
            return _failed(exc, prompt, start)
        return _derive(
            RequestResult(
                prompt_id=prompt.id,
                prepare_s=result.prepare_s,
                send_s=result.send_s,
                ttft_s=result.ttft_s,
                itl_s=result.itl_s,
                e2e_s=result.total_s,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                text=result.text,
                server_timings=result.server_timings,
            )
        )

    def _non_streaming(self, prompt: Prompt, params: dict[str, Any], start: float) -> RequestResult:
        body = {
            "model": self.model,
            "messages": prompt.messages,
            **{k: v for k, v in params.items() if v is not None},
        }
        prepared = time.perf_counter() - start
        try:
            response = self.client.http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return _failed(exc, prompt, start)
        e2e = time.perf_counter() - start
        if response.status_code >= 400:
            return RequestResult(
                ok=False,
                error=f"HTTP {response.status_code}: {response.text[:200]}",
                prompt_id=prompt.id,
                e2e_s=e2e,
            )
        data = response.json()
        usage = data.get("usage") or {}
        return RequestResult(
            prompt_id=prompt.id,
            prepare_s=prepared,
            send_s=e2e - prepared,
            e2e_s=e2e,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            text=data["choices"][0]["message"].get("content") or "",
            server_timings=data.get("timings"),
        )

    def pid(self) -> int | None:
        return self._pid

    def close(self) -> None:
        self.client.close()
        self.wire.close()


def make_target(
    spec: str,
    settings: Settings,
    stream: bool = True,
    api_key: str | None = None,
    pid: int | None = None,
) -> Target:
    """Turn a spec string (see the module docstring) into a target."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise InvalidRequest(f"say which model to use at {url}: write '{url}#MODEL'")
        return HttpTarget(url, model, kind="openai", api_key=api_key, stream=stream, pid=pid)
    kind, _, alias = spec.partition(":")
    if kind not in ("local", "service"):  # a plain alias, or a variant such as a:onnx-cpu-int4
        if alias and spec not in Catalog.load(settings.home).entries:
            raise InvalidRequest(
                f"unknown target kind '{kind}' in '{spec}'; use local: or service:, "
                "or a model alias from 'edgelm model list'"
            )
        kind, alias = "", spec
    if kind == "local":
        return InProcessTarget(alias, settings)
    service = resolve_service(settings, api_key=api_key)
    if kind == "service" or is_up(service.endpoint):
        return HttpTarget(
            service.endpoint, alias, kind="service", api_key=service.api_key, stream=stream, pid=pid
        )
    return InProcessTarget(alias, settings)
