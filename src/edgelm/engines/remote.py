"""An engine that fronts any OpenAI-compatible upstream: vLLM, Ollama, llama.cpp's server,
Foundry Local, or a cloud endpoint.

Putting a remote model behind the same :class:`Engine` interface is what lets the bench, the
compare table and the hybrid router treat "the big model over there" exactly like a local one:
the upstream's SSE stream (decoded by :mod:`edgelm.openai_stream`, as every client in edgelm
decodes it) is turned into :class:`Chunk` objects timed here, on this side of the network, so
TTFT includes the round trip a user would really wait for.

The client is synchronous (httpx) because the service runs every engine in a worker thread.

A model may have several upstreams, replicas of the same model (see
:mod:`edgelm.engines.replicas`): each request goes to the least busy one, and moves to another
while nothing has been streamed yet (a connect error, a 5xx, a timeout or a broken stream
before the first chunk). Once a chunk has reached the caller a failure ends the stream with an
error instead: a retry elsewhere would repeat text the caller already has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from edgelm import __version__
from edgelm.engines.base import Engine, StopBuffer, check_capabilities
from edgelm.engines.replicas import (
    HealthChecker,
    Replica,
    ReplicaPolicy,
    ReplicaSet,
    parse_replica,
)
from edgelm.errors import ConfigError, EdgelmError, UpstreamError
from edgelm.openai_stream import ErrorFields, MalformedEvent, error_fields, first_choice, sse_events
from edgelm.tools import tool_dicts
from edgelm.types import Chunk, FinishReason, GenerationRequest

if TYPE_CHECKING:
    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings


class RemoteEngine(Engine):
    """A model served by an OpenAI-compatible HTTP upstream.

    ``model_id`` is the name edgelm serves it under (the catalog alias); ``model`` is the name
    the upstream knows it by. ``transport`` lets tests (and users testing their own code) swap
    the network for an :class:`httpx.MockTransport`.

    ``cancel`` is checked as each SSE event arrives, and the response is closed on the way
    out, which is what makes the upstream stop generating. An upstream that stalls without
    sending anything is bounded by the read timeout (``remote.timeout_s``), not by ``cancel``.
    """

    name = "remote"
    supports_logprobs = True
    supports_embeddings = True
    supports_grammar = True  # response_format is passed through; the upstream enforces it
    supports_seed = True
    supports_tools = True  # tools go to the upstream, its calls come back as they are
    reads_media = True  # image/audio parts go to the upstream, which may read them
    concurrent_streams = 64  # the upstream does its own batching and queueing

    def __init__(
        self,
        base_url: str | Sequence[str | dict[str, Any]],
        model: str,
        api_key: str | None = None,
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        timeout_s: float = 120.0,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.BaseTransport | None = None,
        policy: ReplicaPolicy | None = None,
    ):
        """``base_url`` is one upstream's URL or a list of replicas (URLs, ``URL#model`` or
        ``{url, model, api_key}`` tables, see :func:`~edgelm.engines.replicas.parse_replica`).
        ``policy`` sets the circuit breaker and health checks (default: no health checks)."""
        specs = [base_url] if isinstance(base_url, str) else list(base_url)
        if not specs or not all(specs):
            raise ConfigError("a remote model needs a base URL, e.g. http://127.0.0.1:8000/v1")
        self.model = model
        self.model_id = model_id or model
        self.n_ctx = n_ctx
        # Engine-specific knobs (top_k, repeat_penalty, ...) that strict upstreams such as
        # OpenAI's would reject; sent only when the catalog entry asks for them.
        self.extra_body = dict(extra_body or {})
        headers = {"User-Agent": f"edgelm/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        policy = policy or ReplicaPolicy()
        self.replicas = ReplicaSet([parse_replica(s, model, headers) for s in specs], policy)
        self.base_url = self.replicas.replicas[0].url
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            transport=transport,
        )
        self._health: HealthChecker | None = None
        if policy.health_interval_s > 0:
            self._health = HealthChecker(self.replicas, transport, name=self.model_id)
            self._health.start()

    @classmethod
    def from_entry(
        cls,
        entry: CatalogEntry,
        settings: Settings,
        path: Path | None,
        transport: httpx.BaseTransport | None = None,
    ) -> RemoteEngine:
        """Build from a catalog entry; entry options win over the ``remote.*`` settings.

        ``options.replicas`` lists several upstreams of the model; else ``options.base_url``
        (or ``remote.base_url``) is its one upstream. ``path`` is unused (a remote model has
        no local file) and is accepted only so that every engine is built the same way by
        :func:`edgelm.engines.create_engine`.
        """
        options = entry.options
        upstreams = options.get("replicas") or options.get("base_url") or settings.remote.base_url
        if not upstreams:
            raise ConfigError(
                f"model '{entry.alias}' uses the remote engine but has no upstream URL; set "
                "options.base_url on the model or 'edgelm config set remote.base_url "
                "http://host:port/v1'"
            )
        if not isinstance(upstreams, str | list):
            raise ConfigError(f"model '{entry.alias}': options.replicas must be a list of URLs")
        return cls(
            upstreams,
            entry.upstream_model or entry.alias,
            api_key=options.get("api_key") or settings.remote.api_key,
            model_id=entry.alias,
            n_ctx=entry.context_length,
            timeout_s=float(options.get("timeout_s") or settings.remote.timeout_s),
            extra_body=options.get("extra_body"),
            transport=transport,
            policy=ReplicaPolicy.from_settings(settings.remote),
        )

    # -- request building -----------------------------------------------------------------
    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,  # each replica's own name replaces it when sent
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.is_chat:
            body["messages"] = [m.model_dump(exclude_none=True) for m in request.messages or []]
        else:
            body["prompt"] = request.prompt or ""
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.presence_penalty:
            body["presence_penalty"] = request.presence_penalty
        if request.frequency_penalty:
            body["frequency_penalty"] = request.frequency_penalty
        if request.ignore_eos:  # vLLM's and llama.cpp's servers take it; OpenAI's ignores it
            body["ignore_eos"] = True
        if request.logprobs:
            if request.is_chat:
                body["logprobs"] = True
                if request.top_logprobs:
                    body["top_logprobs"] = request.top_logprobs
            else:  # the completions API takes the number of alternatives instead
                body["logprobs"] = request.top_logprobs
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            body["response_format"] = fmt.model_dump(exclude_none=True)
        if request.tools:
            body["tools"] = tool_dicts(request.tools)
            body["tool_choice"] = (
                request.tool_choice
                if request.tool_choice in ("auto", "none", "required")
                else {"type": "function", "function": {"name": request.tool_choice}}
            )
            if not request.parallel_tool_calls:
                body["parallel_tool_calls"] = False
        body.update(self.extra_body)
        return body

    def _prompt_estimate(self, request: GenerationRequest) -> int:
        if request.is_chat:
            text = "\n".join(f"{m.role}: {m.text()}" for m in request.messages or [])
        else:
            text = request.prompt or ""
        return self.count_tokens(text)

    # -- streaming ------------------------------------------------------------------------
    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        check_capabilities(self, request)
        start = time.perf_counter()
        path = "chat/completions" if request.is_chat else "completions"
        body = self._body(request)
        tried: list[tuple[Replica, EdgelmError]] = []
        while True:  # until a replica has produced the first chunk
            replica = self.replicas.pick({id(r) for r, _ in tried})
            if replica is None:
                raise self.replicas.exhausted(tried)
            url = f"{replica.url}/{path}"
            response: httpx.Response | None = None
            try:
                response = self._open(replica, url, {**body, "model": replica.model})
                chunks = self._read(response, url, request, start, cancel)
                first = next(chunks)
                break
            except UpstreamError as exc:
                if response is not None:
                    response.close()
                self.replicas.done(replica)
                if not _moves_on(exc, len(self.replicas)):
                    raise  # the request's own fault (a bad parameter): no other replica helps
                self.replicas.failed(replica, exc.message, counts=exc.status != 429)
                tried.append((replica, exc))
            except BaseException:
                if response is not None:
                    response.close()
                self.replicas.done(replica)
                raise
        assert response is not None
        self.replicas.first_chunk(replica, first.t)
        try:
            yield first
            yield from chunks
        except UpstreamError as exc:
            self.replicas.failed(replica, exc.message)
            cut = UpstreamError(
                f"{exc.message} (after the answer had started streaming from {replica.url}; "
                "it is not retried on another replica, which would repeat text)",
                param=exc.param,
                code=exc.code,
            )
            cut.status = exc.status
            raise cut from None
        else:
            self.replicas.succeeded(replica)
        finally:
            response.close()
            self.replicas.done(replica)

    def _open(self, replica: Replica, url: str, body: dict[str, Any]) -> httpx.Response:
        """Send the request and return the streaming response once its status is 2xx.

        Some upstreams (older vLLM, llama.cpp and Ollama builds) refuse ``stream_options``;
        the request is then retried once without it and usage is estimated.
        """
        response = self._send(replica, url, body)
        if response.status_code == 400 and "stream_options" in body:
            response.read()
            if "stream_options" in response.text:
                response.close()
                body = {k: v for k, v in body.items() if k != "stream_options"}
                response = self._send(replica, url, body)
        if response.status_code >= 400:
            response.read()
            response.close()
            raise upstream_http_error(response, url)
        return response

    def _send(self, replica: Replica, url: str, body: dict[str, Any]) -> httpx.Response:
        request = self._http.build_request(
            "POST", url, json=body, headers={**replica.headers, "Accept": "text/event-stream"}
        )
        try:
            return self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise upstream_transport_error(exc, url) from None

    def _read(
        self,
        response: httpx.Response,
        url: str,
        request: GenerationRequest,
        start: float,
        cancel: threading.Event | None,
    ) -> Iterator[Chunk]:
        # Estimates until the upstream's usage chunk (if any) arrives at the end.
        prompt_tokens = self._prompt_estimate(request)
        completion_tokens = 0
        usage: dict[str, Any] | None = None
        finish: FinishReason | None = None
        done = False
        stopped_here = False
        stops = StopBuffer(request.stop)  # a guard for upstreams that ignore "stop"
        try:
            for event in sse_events(response.iter_lines()):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if event is None:  # [DONE]
                    done = True
                    break
                if "error" in event:
                    raise _in_band_error(event["error"], url)
                if event.get("usage"):
                    usage = event["usage"]
                delta = first_choice(event)
                if delta.tool_calls:
                    completion_tokens += 1
                    yield Chunk(
                        text="",
                        t=time.perf_counter() - start,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        tool_calls=delta.tool_calls,
                    )
                if delta.text or delta.logprobs:
                    # Without a usage chunk, each content event counts as one token (vLLM,
                    # llama.cpp and Ollama send one per token), or one per logprob entry
                    # when an upstream batches several tokens.
                    completion_tokens += len(delta.logprobs) or 1
                    text, hit = stops.push(delta.text)
                    yield Chunk(
                        text=text,
                        logprobs=delta.logprobs,
                        t=time.perf_counter() - start,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                    )
                    if hit:
                        finish = "stop"
                        done = stopped_here = True
                        break
                if delta.finish_reason:
                    reason = delta.finish_reason
                    finish = reason if reason in ("length", "tool_calls") else "stop"
        except MalformedEvent as exc:
            raise UpstreamError(f"the upstream at {url} sent a {exc}") from None
        except httpx.TransportError as exc:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
            else:
                raise upstream_transport_error(exc, url) from None
        if finish is None and not done:
            raise UpstreamError(
                f"the upstream at {url} closed the stream before the answer finished"
            )
        if usage:
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            completion_tokens = int(usage.get("completion_tokens") or completion_tokens)
        yield Chunk(
            text="" if stopped_here else stops.flush(),
            t=time.perf_counter() - start,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish or "stop",
        )

    # -- embeddings -----------------------------------------------------------------------
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embed on the least busy replica; any replica may take the request again after
        a failure, since nothing has been returned yet."""
        tried: list[tuple[Replica, EdgelmError]] = []
        while True:
            replica = self.replicas.pick({id(r) for r, _ in tried})
            if replica is None:
                raise self.replicas.exhausted(tried)
            start = time.perf_counter()
            try:
                result = self._embed_on(replica, texts)
            except UpstreamError as exc:
                if not _moves_on(exc, len(self.replicas)):
                    raise
                self.replicas.failed(replica, exc.message, counts=exc.status != 429)
                tried.append((replica, exc))
                continue
            finally:
                self.replicas.done(replica)
            self.replicas.first_chunk(replica, time.perf_counter() - start)
            return result

    def _embed_on(self, replica: Replica, texts: list[str]) -> tuple[list[list[float]], int]:
        url = f"{replica.url}/embeddings"
        try:
            response = self._http.post(
                url, json={"model": replica.model, "input": texts}, headers=replica.headers
            )
        except httpx.TransportError as exc:
            raise upstream_transport_error(exc, url) from None
        if response.status_code >= 400:
            raise upstream_http_error(response, url)
        try:
            payload = response.json()
            rows = sorted(payload["data"], key=lambda row: row.get("index", 0))
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"the upstream at {url} sent an unreadable answer: {exc}") from None
        usage = payload.get("usage") or {}
        used = usage.get("prompt_tokens") or usage.get("total_tokens")
        if not used:
            used = sum(self.count_tokens(t) for t in texts)
        return vectors, int(used)

    def live_info(self) -> dict[str, object]:
        """Each replica's record: healthy, in flight, requests, failures, last error, time to
        first chunk (``/openai/status``, ``/metrics``)."""
        return {"replicas": self.replicas.info()}

    def close(self) -> None:
        if self._health is not None:
            self._health.stop()
        self._http.close()


# -- helpers ------------------------------------------------------------------------------


def _moves_on(exc: UpstreamError, replicas: int) -> bool:
    """Whether a failure before the first chunk sends the request to another replica.

    Yes for what is the replica's fault: connection errors, timeouts, 5xx, a broken or
    malformed stream (all 5xx here), a refused key (401/403, kept as 502) and a busy replica
    (429). A 404 means this replica does not serve the model: another may, when there are
    several. Any other 4xx is the request's own fault and every replica would refuse it.
    """
    status = getattr(exc, "upstream_status", None) or exc.status
    return exc.status >= 500 or status in (401, 403, 429) or (status == 404 and replicas > 1)


def upstream_http_error(response: httpx.Response, url: str) -> UpstreamError:
    """An upstream's HTTP error as an :class:`UpstreamError` a caller can act on.

    A 4xx other than 401/403 is the caller's problem (unknown model, bad parameter, too
    long a prompt, rate limit), so it keeps the upstream's status: a 404 stays a 404. A 401
    or 403 means *edgelm's* key for the upstream is wrong, which a client of edgelm cannot
    fix, so it stays a 502 with a hint. 5xx stay 502. ``upstream_status`` keeps the original.
    """
    status = response.status_code
    try:
        fields = error_fields(response.json())
    except ValueError:
        fields = ErrorFields()
    code, param = fields.code, fields.param
    message = fields.message or response.text.strip()[:300] or response.reason_phrase
    text = f"upstream {url} answered {status}: {message}"
    if status in (401, 403):
        text += " (check the API key: the model's options.api_key or remote.api_key)"
    err = UpstreamError(text, param=param, code=code)
    err.upstream_status = status  # type: ignore[attr-defined]
    if 400 <= status < 500 and status not in (401, 403):
        err.status = status
        err.type = "rate_limit_error" if status == 429 else "invalid_request_error"
    return err


def upstream_transport_error(exc: httpx.TransportError, url: str) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        err = UpstreamError(f"the upstream at {url} timed out ({type(exc).__name__})")
        err.status = 504
        return err
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(f"cannot connect to the upstream at {url}: {exc}")
    return UpstreamError(f"the connection to the upstream at {url} failed: {exc}")


def _in_band_error(raw: Any, url: str) -> UpstreamError:
    fields = error_fields({"error": raw})
    return UpstreamError(
        f"upstream {url} failed mid-stream: {fields.message or raw}",
        param=fields.param,
        code=fields.code,
    )
