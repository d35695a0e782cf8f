"""Fuzzing a running service at volume: schemathesis cases per operation, schemathesis'
stateful workflows over the links it infers, and a state machine of our own that drives the
routes users chain (load, chat, completions, embeddings, RAG answer, responses and their
``previous_response_id`` chains, unload), sometimes several at once.

Every HTTP exchange is one case. The only verdicts are the ones a service owes every input:
no 5xx other than a documented engine or upstream failure (a model that cannot load, an
unreachable hub, a full queue: see :data:`DOCUMENTED_5XX`), and every refusal an OpenAI-style
error body. Nothing is raised mid-run: violations are collected with a curl command that
reproduces them, so one run reports them all.

Used by ``scripts/fuzz.py`` (10,000+ cases, fake engine and the real tiny model) and by the
quick CI subset in ``tests/unit/test_fuzz_service.py``: one harness for both.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

DOCUMENTED_5XX = {
    "model_load_failed": "a model that cannot load (corrupt weights, out of memory)",
    "download_failed": "no download source answered",
    "checksum_mismatch": "a source delivered wrong bytes",
    "upstream_failed": "a remote model's server failed",
    "overloaded": "the model's queue is full (Retry-After)",
    "generation_timeout": "the engine took longer than service.request_timeout_s",
    "missing_dependency": "an optional extra is not installed",
    "engine_crashed": "a model's runner process died (crash isolation)",
    "engine_failed": "an engine raised while generating (the fake-fails model does on purpose)",
}
"""5xx error codes that report a failure outside the service's own code; any other 5xx, or a
5xx without an error body, is a bug."""

FAKE_MODELS = {
    "fake-a": {},
    "fake-slow": {"token_delay_s": 0.01, "reply": "one two three four five six"},
    "fake-broken": {"fail_load": "weights are corrupt"},
    "fake-fails": {"fail_after_tokens": 2},
    "fake-embed": {},
}
"""The fuzz home's catalog: a working model, a slow one, one that cannot load, one that fails
mid-answer and one serving the RAG embeddings."""

MAX_BODY_SHOWN = 300


@dataclass
class Failure:
    label: str
    status: int | None
    detail: str
    curl: str


@dataclass
class FuzzReport:
    """What a fuzz run saw; thread-safe, as the state machine sends requests concurrently."""

    cases: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_phase: Counter[str] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    documented: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures

    def record(
        self, phase: str, label: str, status: int | None, text: str, curl: str, stream: bool = False
    ) -> None:
        """Count one exchange and judge it (see the module docstring)."""
        problem = judge(status, text, stream)
        with self._lock:
            self.cases += 1
            self.by_phase[phase] += 1
            self.by_operation[label] += 1
            self.by_class["no response" if status is None else f"{status // 100}xx"] += 1
            if problem is None and status is not None and status >= 500:
                self.documented[f"{status} {_code(text)}"] += 1
            if problem is not None:
                self.failures.append(Failure(label, status, problem, curl))

    def summary(self) -> str:
        lines = [f"fuzz: {self.cases} cases"]
        lines.append("  by phase: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_phase.items())))
        lines.append(
            "  by status: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_class.items()))
        )
        if self.documented:
            shown = ", ".join(f"{k} ×{v}" for k, v in sorted(self.documented.items()))
            lines.append(f"  documented engine/upstream 5xx: {shown}")
        busiest = ", ".join(f"{k} {v}" for k, v in self.by_operation.most_common(12))
        lines.append(f"  by operation: {busiest}")
        unique: dict[tuple[str, int | None, str], Failure] = {}
        for failure in self.failures:
            unique.setdefault((failure.label, failure.status, failure.detail[:80]), failure)
        lines.append(f"  failures: {len(self.failures)} ({len(unique)} distinct)")
        for failure in list(unique.values())[:20]:
            lines.append(f"  - {failure.label} → {failure.status}: {failure.detail}")
            lines.append(f"    {failure.curl}")
        return "\n".join(lines)


def _code(text: str) -> str | None:
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def _stream_errors(text: str) -> list[dict[str, Any]]:
    """The error objects a 200 event stream carried in-band."""
    found = []
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            continue
        error = event.get("error") if isinstance(event, dict) else None
        if isinstance(error, dict):
            found.append(error)
        elif isinstance(event, dict) and event.get("type") == "error":
            found.append(event)
    return found


def judge(status: int | None, text: str, stream: bool = False) -> str | None:
    """What is wrong with this answer, or None."""
    if status is None:
        return f"no response: {text[:MAX_BODY_SHOWN]}"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
            keys = set(error)
        except (ValueError, KeyError, TypeError):
            return f"not an OpenAI-style error body: {text[:MAX_BODY_SHOWN]!r}"
        if not keys >= {"message", "type", "code"}:
            return f"error body lacks message/type/code: {text[:MAX_BODY_SHOWN]!r}"
        if status >= 500 and error.get("code") not in DOCUMENTED_5XX:
            return f"server error: {text[:MAX_BODY_SHOWN]}"
        return None
    if stream:
        for error in _stream_errors(text):
            code = error.get("code")
            if error.get("type") == "server_error" and code not in DOCUMENTED_5XX:
                return f"in-band server error: {json.dumps(error)[:MAX_BODY_SHOWN]}"
    return None


def curl_for(base: str, method: str, path: str, body: Any = None) -> str:
    parts = ["curl", "-sS", "-X", method, shlex.quote(base + path)]
    if body is not None:
        parts += ["-H", "'Content-Type: application/json'", "-d", shlex.quote(json.dumps(body))]
    return " ".join(parts)


# ------------------------------------------------------------------ the service under test


def write_fuzz_home(home: Path, real_model: Path | None = None) -> dict[str, str]:
    """A home for the fuzzed service: the fake models, RAG answering with them, a hub nobody
    answers on (a fuzzed ``/openai/download`` must fail fast, not fetch gigabytes) and a small
    ingested collection. With ``real_model`` (the SmolLM2 GGUF), the tiny model is placed in
    the home's own model directory as a symlink, so no request can write beside the original.
    Returns the environment to start the service with."""
    from edgelm.catalog import Catalog, CatalogEntry
    from edgelm.rag.collection_db import RagStore
    from edgelm.rag.ingest import ingest_paths

    home.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.load(home)
    for alias, options in FAKE_MODELS.items():
        catalog.add_user_entry(CatalogEntry(alias=alias, engine="fake", options=options))
    models_dir = home / "models"
    if real_model is not None:
        entry = catalog.resolve("smollm2-135m")
        link = models_dir / entry.alias / Path(entry.filename).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(real_model)
    rag_model = "smollm2-135m" if real_model is not None else "fake-a"
    config = {
        "models": {"dir": str(models_dir), "sources": ["hub"], "hub_endpoint": "http://127.0.0.1:9"},
        "rag": {"model": rag_model, "fallback_model": "fake-slow", "embed_model": "fake-embed"},
        "service": {"request_timeout_s": 60},
    }
    if real_model is not None:
        # Fuzzed requests rarely set max_tokens: a small context bounds every answer (and
        # a slow one ends in the documented 504 instead of holding the run for minutes).
        config["compute"] = {"n_ctx": 512}
        config["service"] = {"request_timeout_s": 30}
    (home / "config.toml").write_text(tomli_w.dumps(config))
    docs = home / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "edge.md").write_text(
        "# Edge models\n\nSmall models run on the edge device. The SLM answers first.\n\n"
        "## Escalation\n\nWhen the small model is unsure, the large model is asked.\n"
    )
    with RagStore.open(home, "default") as store:
        ingest_paths(store, [docs])
    return {"EDGELM_HOME": str(home)}


# ------------------------------------------------------------------ phase 1: per operation


def fuzz_operations(
    base: str,
    report: FuzzReport,
    examples: int,
    exclude: Callable[[str], bool] | None = None,
    round_seed: int = 0,
) -> None:
    """Each operation of the service's OpenAPI schema, ``examples`` positive and as many
    negative (schema-violating) cases."""
    import requests
    import schemathesis
    from hypothesis import given
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if exclude is not None and exclude(label):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            def make(label: str, strategy: Any) -> Callable[[Any], None]:  # binds them
                @seed(round_seed)
                @given(case=strategy)
                @settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: Any) -> None:
                    _call_case(case, base, session, report, "operations", label)

                return check

            try:
                make(label, strategy)()  # type: ignore[call-arg]
            except Unsatisfiable:  # nothing to break: e.g. no parameters to make invalid
                continue


def _call_case(case: Any, base: str, session: Any, report: FuzzReport, phase: str, label: str):  # type: ignore[no-untyped-def]
    import requests

    curl = case.as_curl_command(base_url=base)
    try:
        response = case.call(base_url=base, session=session, timeout=120)
    except requests.RequestException as exc:
        report.record(phase, label, None, repr(exc), curl)
        return None
    text = response.content.decode("utf-8", "replace")
    stream = "text/event-stream" in response.headers.get("content-type", [""])[0]
    report.record(phase, label, response.status_code, text, curl, stream)
    return response


# ------------------------------------------------------------------ phase 2: schemathesis' workflows


def fuzz_workflows(base: str, report: FuzzReport, examples: int, steps: int = 8) -> None:
    """Schemathesis' state machine over the links it infers from the schema (model ids from
    ``/v1/models`` into chat, embeddings and RAG requests; a response's id into
    ``GET /v1/responses/{id}``)."""
    import requests
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    session = requests.Session()
    workflow = schema.as_state_machine()

    class Recorded(workflow):  # type: ignore[misc, valid-type]
        def call(self, case: Any, **kwargs: Any) -> Any:
            label = f"{case.operation.method.upper()} {case.operation.path}"
            response = _call_case(case, base, session, report, "workflows", label)
            if response is None:
                raise ConnectionError("the service did not answer")
            return response

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            return None  # judged in call, where every exchange is recorded

    Recorded.run(
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )


# ------------------------------------------------------------------ phase 3: our own sequences

texts = st.text(max_size=40)
junk = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | texts
small_json = st.recursive(
    junk,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def sequence_machine(
    base: str, report: FuzzReport, models: list[str], chat_model: str
) -> type[RuleBasedStateMachine]:
    """A state machine over the routes users chain. ``models`` are the catalog aliases it
    loads, unloads and asks (plus names that do not exist); ``chat_model`` is the one whose
    answers feed responses chains."""
    names = st.sampled_from([*models, "no-such-model", "rag:default", "rag:nope", "hybrid"])
    messages = st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"])},
            optional={"content": texts | small_json},
        ),
        min_size=0,
        max_size=4,
    )
    sampling = st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.integers(-1, 64),
            "temperature": st.floats(-1, 3, allow_nan=False),
            "stop": st.none() | texts | st.lists(texts, max_size=5),
            "seed": st.integers(-(2**63), 2**64),
            "top_p": st.floats(0, 1.5, allow_nan=False),
            "logprobs": st.booleans(),
            "top_logprobs": st.integers(-1, 25),
            "n": st.integers(0, 3),
            "response_format": st.sampled_from(
                [{"type": "text"}, {"type": "json_object"}, {"type": "nope"}]
            ),
            "bogus_field": small_json,
        },
    )

    class Sequences(RuleBasedStateMachine):
        responses = Bundle("responses")

        def __init__(self) -> None:
            super().__init__()
            self.client = httpx.Client(base_url=base, timeout=120)

        def teardown(self) -> None:
            self.client.close()

        def send(self, method: str, path: str, body: Any = None, label: str = "") -> httpx.Response | None:
            label = label or f"{method} {path.split('?')[0]}"
            stream = isinstance(body, dict) and body.get("stream") is True
            curl = curl_for(base, method, path, body)
            try:
                response = self.client.request(method, path, json=body)
            except httpx.HTTPError as exc:
                report.record("sequences", label, None, repr(exc), curl)
                return None
            report.record("sequences", label, response.status_code, response.text, curl, stream)
            return response

        @rule(model=names)
        def load(self, model: str) -> None:
            self.send("GET", f"/openai/load/{model}", label="GET /openai/load/{name}")

        @rule(model=names)
        def unload(self, model: str) -> None:
            self.send("GET", f"/openai/unload/{model}", label="GET /openai/unload/{name}")

        @rule(model=names, messages=messages, extra=sampling, stream=st.booleans())
        def chat(self, model: str, messages: list[Any], extra: dict[str, Any], stream: bool) -> None:
            body = {"model": model, "messages": messages, "stream": stream, **extra}
            self.send("POST", "/v1/chat/completions", body)

        @rule(model=names, prompt=texts | st.lists(texts, max_size=3), stream=st.booleans())
        def completion(self, model: str, prompt: Any, stream: bool) -> None:
            body = {"model": model, "prompt": prompt, "stream": stream, "max_tokens": 8}
            self.send("POST", "/v1/completions", body)

        @rule(
            model=names,
            data=st.one_of(texts, st.lists(texts, max_size=4), st.lists(st.integers(-1, 99), max_size=4)),
            fmt=st.sampled_from(["float", "base64", "bogus"]),
            dims=st.none() | st.integers(-1, 100),
        )
        def embeddings(self, model: str, data: Any, fmt: str, dims: int | None) -> None:
            body: dict[str, Any] = {"model": model, "input": data, "encoding_format": fmt}
            if dims is not None:
                body["dimensions"] = dims
            self.send("POST", "/v1/embeddings", body)

        @rule(
            question=texts,
            inline=st.booleans(),
            docs=st.lists(st.fixed_dictionaries({"text": texts}), max_size=3),
            collection=st.sampled_from(["default", "nope", "../etc", ""]),
            mode=st.sampled_from(["lexical", "dense", "hybrid", "bogus"]),
            top_k=st.integers(0, 60),
            stream=st.booleans(),
            model=st.none() | names,
        )
        def rag_answer(
            self,
            question: str,
            inline: bool,
            docs: list[dict[str, str]],
            collection: str,
            mode: str,
            top_k: int,
            stream: bool,
            model: str | None,
        ) -> None:
            body: dict[str, Any] = {"question": question, "mode": mode, "top_k": top_k}
            body.update({"documents": docs} if inline else {"collection": collection})
            body.update({"stream": stream, "max_tokens": 16})
            if model is not None:
                body["model"] = model
            self.send("POST", "/v1/rag/answer", body)

        @rule(target=responses, text=texts, stream=st.booleans(), store=st.booleans())
        def respond(self, text: str, stream: bool, store: bool) -> str:
            body = {"model": chat_model, "input": text or "hi", "stream": stream, "store": store}
            body["max_output_tokens"] = 16
            response = self.send("POST", "/v1/responses", body)
            return _response_id(response) or "resp_missing"

        @rule(target=responses, previous=responses, text=texts)
        def follow_up(self, previous: str, text: str) -> str:
            body = {"model": chat_model, "input": text or "and?", "previous_response_id": previous}
            body["max_output_tokens"] = 16
            return _response_id(self.send("POST", "/v1/responses", body)) or previous

        @rule(response_id=responses)
        def fetch(self, response_id: str) -> None:
            self.send("GET", f"/v1/responses/{response_id}", label="GET /v1/responses/{id}")

        @rule(model=st.sampled_from(models), n=st.integers(2, 6))
        def burst(self, model: str, n: int) -> None:
            """Answers, an unload and a load of one model at once: the unload must be refused
            (409) or wait, never cut a stream."""

            def one(i: int) -> None:
                if i == 1:
                    self.send("GET", f"/openai/unload/{model}", label="GET /openai/unload/{name}")
                elif i == 2:
                    self.send("GET", f"/openai/load/{model}", label="GET /openai/load/{name}")
                else:
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": f"burst {i}"}],
                        "stream": i % 2 == 0,
                        "max_tokens": 8,
                    }
                    self.send("POST", "/v1/chat/completions", body)

            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(one, range(n)))

        @invariant()
        def healthy(self) -> None:
            """Still up after every step (counted only when it is not: it is no input)."""
            try:
                status = self.client.get("/health").status_code
            except httpx.HTTPError as exc:
                report.record("sequences", "GET /health", None, repr(exc), curl_for(base, "GET", "/health"))
                return
            if status != 200:
                report.record("sequences", "GET /health", status, "", curl_for(base, "GET", "/health"))

    return Sequences


def _response_id(response: httpx.Response | None) -> str | None:
    if response is None or response.status_code != 200:
        return None
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and '"response.created"' in line:
                try:
                    return json.loads(line[6:])["response"]["id"]
                except (ValueError, KeyError, TypeError):
                    return None
        return None
    try:
        return response.json().get("id")
    except ValueError:
        return None


def fuzz_sequences(
    base: str, report: FuzzReport, examples: int, models: list[str], chat_model: str, steps: int = 12
) -> None:
    machine = sequence_machine(base, report, models, chat_model)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


# ------------------------------------------------------------------ a whole run


def fuzz_service(
    base: str,
    target_cases: int,
    models: list[str],
    chat_model: str,
    exclude: Callable[[str], bool] | None = None,
    progress: Callable[[FuzzReport], None] | None = None,
    max_seconds: float = 3600.0,
) -> FuzzReport:
    """Rounds of the three phases until ``target_cases`` exchanges were made (or time runs
    out); each round gives about half its budget to single operations and a quarter to each
    kind of sequence, so volume grows in all three."""
    report = FuzzReport()
    deadline = time.monotonic() + max_seconds
    operations = _operation_count(base)
    round_cases = max(60, min(target_cases, 3000))
    rounds = 0
    while report.cases < target_cases and time.monotonic() < deadline:
        left = target_cases - report.cases
        share = max(40, min(round_cases, left)) // 4
        fuzz_operations(base, report, max(1, share // operations), exclude, rounds)
        rounds += 1
        fuzz_workflows(base, report, max(1, share // 6))
        fuzz_sequences(base, report, max(1, share // 10), models, chat_model)
        if progress is not None:
            progress(report)
    return report


def _operation_count(base: str) -> int:
    paths = httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]
    return max(1, sum(len(methods) for methods in paths.values()))
