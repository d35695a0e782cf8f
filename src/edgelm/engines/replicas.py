"""Replicas of one remote model: balancing, a circuit breaker each, and health checks.

A remote model may list several upstreams serving the same model (vLLM, llama.cpp's server,
Ollama, other edgelm services). :class:`ReplicaSet` decides which one a request goes to and
keeps each one's record; :class:`HealthChecker` probes them in the background while the model
is loaded. The wire format stays in :mod:`edgelm.engines.remote`, which asks this module
*where* to send a request and tells it how that went.

- Balancing is least outstanding requests; among equals the one picked longest ago goes
  first, so sequential requests take turns too.
- A replica that fails ``failure_threshold`` times in a row (connect errors, 5xx, timeouts,
  a stream that breaks), or fails a health check, is taken out for a backoff that doubles each
  time it is taken out again (up to ``backoff_max_s``). When the backoff has passed the health
  checker probes it, and a successful probe puts it back. With health checks off, the first
  request after the backoff is its trial instead.
- Every figure is kept under one lock: the engine streams from many worker threads at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from edgelm.errors import ConfigError, EdgelmError, UpstreamError

if TYPE_CHECKING:
    from edgelm.settings import RemoteSettings

log = logging.getLogger("edgelm.replicas")


@dataclass(frozen=True)
class ReplicaPolicy:
    """When a replica is taken out and how it is checked (the ``remote.*`` settings)."""

    health_interval_s: float = 0.0
    health_timeout_s: float = 2.0
    failure_threshold: int = 3
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    @classmethod
    def from_settings(cls, remote: RemoteSettings) -> ReplicaPolicy:
        return cls(
            health_interval_s=remote.health_interval_s,
            health_timeout_s=remote.health_timeout_s,
            failure_threshold=remote.failure_threshold,
            backoff_s=remote.backoff_s,
            backoff_max_s=remote.backoff_max_s,
        )


@dataclass(eq=False)
class Replica:
    """One upstream of a remote model and its record."""

    url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    failures: int = 0
    in_flight: int = 0
    consecutive_failures: int = 0
    out_until: float | None = None  # monotonic time; None: in rotation
    backoff_s: float = 0.0
    last_error: str | None = None
    last_probe: float = 0.0  # monotonic time of the last health check
    last_pick: int = 0
    first_chunk_sum_s: float = 0.0
    first_chunk_count: int = 0
    first_chunk_s: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def healthy(self) -> bool:
        return self.out_until is None

    def info(self, now: float) -> dict[str, Any]:
        ordered = sorted(self.first_chunk_s)
        return {
            "url": self.url,
            "model": self.model,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "retry_in_s": None if self.out_until is None else round(self.out_until - now, 2),
            "last_error": self.last_error,
            "first_chunk_p50_s": round(ordered[len(ordered) // 2], 4) if ordered else None,
            "first_chunk_sum_s": round(self.first_chunk_sum_s, 6),
            "first_chunk_count": self.first_chunk_count,
        }


def parse_replica(spec: Any, model: str, headers: dict[str, str]) -> Replica:
    """A replica from a catalog option: ``"http://host:8000/v1"``, ``"http://host:11434/v1#
    qwen2.5:7b"`` (the part after ``#`` is the model name that replica knows; fragments are
    never sent, so the form is unambiguous) or a table ``{url, model, api_key}``."""
    key = None
    if isinstance(spec, dict):
        url, model, key = spec.get("url"), spec.get("model") or model, spec.get("api_key")
    elif isinstance(spec, str):
        url, _, named = spec.partition("#")
        model = named or model
    else:
        raise ConfigError(f"a replica is a URL or a table with 'url', not {spec!r}")
    if not url or not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"a replica needs an http(s) base URL, e.g. http://host:8000/v1; got {spec!r}")
    own = dict(headers)
    if key:
        own["Authorization"] = f"Bearer {key}"
    return Replica(url=url.rstrip("/"), model=model, headers=own)


class ReplicaSet:
    """The replicas of one model, who gets the next request, and who is taken out."""

    def __init__(
        self,
        replicas: list[Replica],
        policy: ReplicaPolicy,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not replicas:
            raise ConfigError("a remote model needs at least one upstream")
        self.replicas = replicas
        self.policy = policy
        self.clock = clock
        self._lock = threading.Lock()
        self._picks = 0

    def __len__(self) -> int:
        return len(self.replicas)

    # -- choosing -------------------------------------------------------------------------
    def pick(self, exclude: set[int] = frozenset()) -> Replica | None:  # type: ignore[assignment]
        """The replica for the next attempt (its in-flight count taken), or None when every
        replica not in ``exclude`` (ids) is taken out."""
        with self._lock:
            now = self.clock()
            candidates = [r for r in self.replicas if r.healthy and id(r) not in exclude]
            if self.policy.health_interval_s <= 0:
                # No health checks: a replica whose backoff has passed gets one trial request.
                candidates += [
                    r
                    for r in self.replicas
                    if id(r) not in exclude
                    and r.out_until is not None
                    and r.out_until <= now
                    and r.in_flight == 0
                ]
            if not candidates:
                return None
            chosen = min(candidates, key=lambda r: (r.in_flight, r.last_pick))
            self._picks += 1
            chosen.last_pick = self._picks
            chosen.in_flight += 1
            chosen.requests += 1
            return chosen

    def done(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    # -- outcomes ---------------------------------------------------------------------------
    def first_chunk(self, replica: Replica, seconds: float) -> None:
        """The replica answered: its first chunk came after ``seconds``."""
        with self._lock:
            replica.first_chunk_s.append(seconds)
            replica.first_chunk_sum_s += seconds
            replica.first_chunk_count += 1
            self._back_in(replica)

    def succeeded(self, replica: Replica) -> None:
        with self._lock:
            self._back_in(replica)

    def failed(self, replica: Replica, reason: str, *, counts: bool = True) -> None:
        """Record a failure; ``counts`` False for a refusal that says nothing about the
        replica's health (a 429: it is busy, try another)."""
        with self._lock:
            replica.last_error = reason
            if not counts:
                return
            replica.failures += 1
            replica.consecutive_failures += 1
            if replica.out_until is not None:
                # Out already: a failed trial (its backoff had passed) doubles the backoff;
                # requests that were in flight when it was taken out change nothing.
                if replica.out_until <= self.clock():
                    self._take_out(replica, reason)
            elif replica.consecutive_failures >= self.policy.failure_threshold:
                self._take_out(replica, reason)

    def probed(self, replica: Replica, error: str | None) -> None:
        """A health check's result: None puts the replica back, an error takes it out."""
        with self._lock:
            replica.last_probe = self.clock()
            if error is None:
                if not replica.healthy:
                    log.info("replica %s is back (health check passed)", replica.url)
                self._back_in(replica)
            else:
                replica.last_error = f"health check: {error}"
                replica.failures += 1
                self._take_out(replica, replica.last_error)

    def _back_in(self, replica: Replica) -> None:
        replica.consecutive_failures = 0
        replica.out_until = None
        replica.backoff_s = 0.0

    def _take_out(self, replica: Replica, reason: str) -> None:
        policy = self.policy
        replica.backoff_s = min(
            policy.backoff_max_s, replica.backoff_s * 2 if replica.backoff_s else policy.backoff_s
        )
        replica.out_until = self.clock() + replica.backoff_s
        log.warning(
            "replica %s taken out for %.1f s after %d failure(s): %s",
            replica.url,
            replica.backoff_s,
            replica.consecutive_failures,
            reason,
        )

    # -- health checks ----------------------------------------------------------------------
    def due_probes(self) -> tuple[list[Replica], float]:
        """Replicas to probe now (in rotation: every interval; taken out: once the backoff
        has passed), and the seconds until the next one is due."""
        interval = self.policy.health_interval_s
        with self._lock:
            now = self.clock()
            due, wait = [], interval
            for r in self.replicas:
                at = r.out_until if r.out_until is not None else r.last_probe + interval
                if at <= now:
                    due.append(r)
                else:
                    wait = min(wait, at - now)
            return due, max(0.05, wait)

    # -- reporting --------------------------------------------------------------------------
    def info(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.clock()
            return [r.info(now) for r in self.replicas]

    def exhausted(self, tried: list[tuple[Replica, EdgelmError]]) -> EdgelmError:
        """The error when no replica could take the request: each replica and why.

        A model with a single upstream that was tried keeps that upstream's own error (its
        status and message), as before replicas existed. Otherwise: 502 when every replica
        was tried and failed, 503 when some were not tried because they are taken out.
        """
        if len(self.replicas) == 1 and len(tried) == 1:
            return tried[0][1]
        reasons = {id(r): exc.message for r, exc in tried}
        now = self.clock()
        lines = []
        with self._lock:
            for r in self.replicas:
                if id(r) in reasons:
                    lines.append(f"{r.url}: {reasons[id(r)]}")
                else:
                    wait = max(0.0, (r.out_until or now) - now)
                    lines.append(
                        f"{r.url}: taken out after repeated failures, next check in "
                        f"{wait:.1f} s (last error: {r.last_error or 'none'})"
                    )
        untried = len(self.replicas) - len(tried)
        head = (
            f"all {len(self.replicas)} replicas failed"
            if not untried
            else f"no replica available ({len(tried)} tried and failed, {untried} taken out)"
        )
        err = UpstreamError(f"{head}: " + "; ".join(lines))
        if untried:
            err.status = 503
            err.code = "no_replica_available"
        else:
            err.code = "all_replicas_failed"
        return err


class HealthChecker:
    """Probes a :class:`ReplicaSet`'s replicas from a daemon thread until :meth:`stop`.

    A probe is ``GET <base>/models`` (every OpenAI-compatible server has it; vLLM, llama.cpp's
    server, Ollama and edgelm all answer it), falling back to ``GET /health`` at the server's
    root when that route is missing. Probes use their own short timeout and connection pool,
    so a hung replica cannot hold up the requests or the other probes for long.
    """

    def __init__(
        self,
        replicas: ReplicaSet,
        transport: httpx.BaseTransport | None = None,
        name: str = "remote",
    ):
        self.replicas = replicas
        timeout = replicas.policy.health_timeout_s
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), transport=transport)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"edgelm-health-{name}", daemon=True
        )
        with replicas._lock:  # the first probes come one interval after the load
            now = replicas.clock()
            for r in replicas.replicas:
                r.last_probe = now

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.replicas.policy.health_timeout_s + 1)
        self._http.close()

    def _run(self) -> None:
        while True:
            due, wait = self.replicas.due_probes()
            for replica in due:
                if self._stop.is_set():
                    return
                self.replicas.probed(replica, self.probe(replica))
            if self._stop.wait(wait if not due else 0.05):
                return

    def probe(self, replica: Replica) -> str | None:
        """None when the replica answers, else what went wrong."""
        try:
            response = self._http.get(f"{replica.url}/models", headers=replica.headers)
            if response.status_code == 404:
                root = replica.url.removesuffix("/v1")
                response = self._http.get(f"{root}/health", headers=replica.headers)
        except httpx.TimeoutException:
            return f"no answer within {self.replicas.policy.health_timeout_s:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code >= 400:
            return f"{response.request.url.path} answered {response.status_code}"
        return None
