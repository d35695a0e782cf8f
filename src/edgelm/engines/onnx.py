"""ONNX Runtime GenAI engine: models built by onnxruntime-genai's model builder.

Such a model is a directory (``genai_config.json``, ``model.onnx`` + weights, tokenizer files);
``edgelm model convert ALIAS --to onnx`` makes one from a cached GGUF (see
:mod:`edgelm.convert`). The decode loop is ours, on ``og.Generator``, for the same reason as
in the llama.cpp engine: every chunk carries its token ids, logprobs and timing. Concurrent
streams and prompt reuse live in :mod:`edgelm.engines.onnx_scheduler` (one scheduler thread per
loaded model, which hands tokens to the event loop as the llama.cpp path does).

Things that shaped this module (onnxruntime-genai 0.18 on these CPUs):

* ``og.is_webgpu_available()`` says True on Linux CPU wheels, yet opening a model with the
  WebGPU provider fails with "not supported in this build". So a claimed GPU provider counts
  only if ONNX Runtime lists it too, it is still *tried*, and the engine falls back to the CPU
  (``engine.provider`` says where it ended up).
* ``Generator.get_logits()`` before ``generate_next_token()`` is the row the sampler uses, so
  logprobs cost one vocabulary-sized copy per token, and only when asked for.
* The library's structured output (llguidance, ``GeneratorParams.set_guidance``) gives JSON
  and JSON-schema output; a schema it cannot compile fails when the generator is created,
  which we turn into a 400 before any token is produced.
* The KV cache is allocated for ``max_length`` up front (``past_present_share_buffer``): a
  slot's reusable generator holds n_ctx tokens, so the memory estimate counts one such cache
  per concurrent stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from edgelm.engines.base import (
    ChatTemplate,
    Engine,
    TokenChunker,
    check_capabilities,
    check_context,
    default_threads,
    jinja_chat_template,
    process_rss,
    render_prompt,
    token_logprob,
)
from edgelm.engines.batching import Sampling
from edgelm.engines.job_stream import JobAnswer, astream_answer, is_long, stream_answer
from edgelm.engines.onnx_scheduler import GeneratorScheduler, OnnxJob
from edgelm.engines.sizing import auto_parallel, memory_budget_bytes, memory_share
from edgelm.errors import InvalidRequest, MissingExtra, ModelLoadError
from edgelm.settings import PoolSettings
from edgelm.types import Chunk, GenerationRequest

if TYPE_CHECKING:
    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

log = logging.getLogger("edgelm.engines.onnx")

CONFIG_FILE = "genai_config.json"
# GPU providers in the order tried when compute.onnx.enable_gpu is set:
# (name for Config.append_provider, og.is_*_available probe).
# (name for Config.append_provider, og.is_*_available probe, ONNX Runtime's provider name).
GPU_PROVIDERS: tuple[tuple[str, str, str], ...] = (
    ("cuda", "is_cuda_available", "CUDAExecutionProvider"),
    ("dml", "is_dml_available", "DmlExecutionProvider"),
    ("WebGPU", "is_webgpu_available", "WebGpuExecutionProvider"),
)
# The seed range onnxruntime-genai accepts (a C int).
_SEED_RANGE = 2**31


def import_genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError:
        raise MissingExtra("onnxruntime-genai", "onnx") from None
    return onnxruntime_genai


def runtime_providers() -> list[str] | None:
    """The providers compiled into the ONNX Runtime that onnxruntime-genai runs on, when that
    runtime is importable as ``onnxruntime`` (it is a dependency of the wheels), else None."""
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # absent or broken: rely on onnxruntime-genai's own probes
        return None


def provider_candidates(
    og: Any, enable_gpu: bool, available: Sequence[str] | None = None
) -> list[str]:
    """Providers to try, best first; the CPU is always the last resort.

    onnxruntime-genai's ``is_*_available`` probes say what its build claims (the Linux CPU
    wheel claims WebGPU), so a claim counts only when the runtime's own provider list
    (``available``) has it too. Even then no device may be present, so every candidate is
    still tried when the model is opened.
    """
    found = []
    if enable_gpu:
        for name, probe, runtime_name in GPU_PROVIDERS:
            if available is not None and runtime_name not in available:
                continue
            check = getattr(og, probe, None)
            try:
                if check is not None and check():
                    found.append(name)
            except Exception:  # a probe that fails means "not this one"
                continue
    return [*found, "cpu"]


def model_dir_of(path: Path) -> Path:
    """The model directory, given it or its ``genai_config.json`` (what catalog entries hold)."""
    path = Path(path).expanduser()
    directory = path.parent if path.name == CONFIG_FILE else path
    if directory.suffix == ".gguf" or (path.is_file() and path.name != CONFIG_FILE):
        raise ModelLoadError(
            f"{path} is not an ONNX Runtime GenAI model (the onnx engine needs a directory with "
            f"{CONFIG_FILE}); convert a GGUF model with: edgelm model convert ALIAS --to onnx"
        )
    if not (directory / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"{directory} has no {CONFIG_FILE}; it is not an ONNX Runtime GenAI model "
            "(edgelm model convert ALIAS --to onnx makes one)"
        )
    return directory


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _special_token_text(config: dict[str, Any], name: str) -> str:
    """``bos_token``/``eos_token`` as HF's tokenizer config writes it (text, or an object
    with ``content``), the values chat templates are rendered with; '' when absent."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _read_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The chat template the converter or the model's authors left with the tokenizer."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # the list form: named templates, "default" first
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text("utf-8")
    return template or None


# Most streams compute.parallel "auto" gives the ONNX engine. Those that arrive together share
# weight passes (see edgelm.engines.onnx_scheduler: 2.3x one stream's tokens/s at four here,
# 2.9x at eight); each slot keeps a full-context fp32 KV cache, so fewer where memory is short.
AUTO_STREAMS = 8


class OnnxEngine(Engine):
    """An ONNX Runtime GenAI model in this process, serving up to ``parallel`` streams at
    once (those that arrive together as one batched generator, groups and single streams a
    step each in turn), with prompt prefixes reused between requests (see
    :mod:`edgelm.engines.onnx_scheduler`); the pool hands it that many at once."""

    name = "onnx"
    native_async = True
    isolate = True
    supports_logprobs = True
    supports_grammar = True
    supports_seed = True
    supports_raw_speed = True

    min_p: ClassVar[float] = 0.05
    """As in the llama.cpp engine: cuts the long tail that makes tiny models ramble."""

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        n_ctx: int = 4096,
        threads: int = 0,
        enable_gpu: bool = False,
        parallel: int | Literal["auto"] = 1,
        n_batch: int = 512,
        repeat_penalty: float = 1.0,
        memory_share: int = 0,
    ):
        self._og = import_genai()
        self.concurrent_streams = 1 if parallel == "auto" else max(1, int(parallel))
        self.parallel_reason = f"compute.parallel = {parallel}"
        self.repeat_penalty = repeat_penalty
        """Used when a request does not set its own (``compute.repeat_penalty``)."""
        self.model_id = model_id
        self.model_dir = model_dir_of(model_path)
        self.threads = threads or default_threads()
        try:
            self._config = json.loads((self.model_dir / CONFIG_FILE).read_text("utf-8"))
        except ValueError as exc:
            raise ModelLoadError(
                f"{self.model_dir / CONFIG_FILE} is not valid JSON: {exc}"
            ) from None
        model_cfg = self._config.get("model", {})
        trained = int(model_cfg.get("context_length") or 0)
        # Past its trained context a model degrades silently.
        self.n_ctx = min(n_ctx, trained) if trained > 0 else n_ctx
        if parallel == "auto":
            choice = auto_parallel(
                kv_bytes_per_token=self._kv_bytes_per_token(),
                n_ctx=self.n_ctx,
                weights_bytes=self._weights_bytes(),
                memory_bytes=memory_share or memory_budget_bytes(PoolSettings()),
                cores=default_threads(),
                cap=AUTO_STREAMS,
            )
            self.concurrent_streams = choice.streams
            self.parallel_reason = f"compute.parallel = auto: {choice.reason}"
        rss_before = process_rss()
        candidates = provider_candidates(
            self._og, enable_gpu, runtime_providers() if enable_gpu else None
        )
        self._model, self.provider = self._open(candidates)
        self._tokenizer = self._og.Tokenizer(self._model)
        self._eos = {int(t) for t in np.atleast_1d(self._tokenizer.eos_token_ids)}
        if not self._eos and model_cfg.get("eos_token_id") is not None:
            self._eos = {int(t) for t in np.atleast_1d(model_cfg["eos_token_id"])}
        bos = model_cfg.get("bos_token_id")
        self._bos = int(bos) if isinstance(bos, int) else -1
        self._vocab_size = int(model_cfg.get("vocab_size") or 0)
        pad = model_cfg.get("pad_token_id")
        self._pad = int(pad) if isinstance(pad, int) else -1
        tokenizer_config = _tokenizer_config(self.model_dir)
        self._template = _read_chat_template(self.model_dir, tokenizer_config)
        self._chat = self._chat_template(self._template, tokenizer_config)
        self.memory_bytes = self._memory_estimate(max(0, process_rss() - rss_before))
        self._scheduler = GeneratorScheduler(
            model_id,
            slots=self.concurrent_streams,
            n_batch=n_batch,
            new_generator=self._slot_generator,
            logprob=lambda row, token, top: token_logprob(row, token, top, self._bytes),
            new_batch=self._batch_generator,
            pad_token=self._pad,
        )

    @classmethod
    def from_entry(cls, entry: CatalogEntry, settings: Settings, path: Path | None) -> OnnxEngine:
        if path is None:
            raise ModelLoadError(f"model '{entry.alias}' has no model directory to load")
        if path.suffix == ".gguf":
            raise ModelLoadError(
                f"'{entry.alias}' is a GGUF model; the onnx engine needs it converted first: "
                f"edgelm model convert {entry.alias} --to onnx (then use the variant it names, "
                f"e.g. {entry.alias}:onnx-cpu-int4)"
            )
        return cls(
            path,
            entry.alias,
            n_ctx=settings.compute.n_ctx,
            threads=settings.compute.fixed_threads,
            enable_gpu=settings.compute.onnx.enable_gpu,
            parallel=settings.compute.parallel,
            n_batch=settings.compute.n_batch,
            repeat_penalty=settings.compute.repeat_penalty,
            memory_share=memory_share(settings.pool),
        )

    def _open(self, providers: Sequence[str]) -> tuple[Any, str]:
        """Open the model with the first provider that works; return (model, provider)."""
        og = self._og
        failures = []
        for provider in providers:
            try:
                config = og.Config(str(self.model_dir))
                config.clear_providers()
                if provider != "cpu":
                    config.append_provider(provider)
                options = {
                    "intra_op_num_threads": self.threads,
                    "inter_op_num_threads": 1,
                    # Idle pool threads spin by default; when other programs want the cores,
                    # that spinning halved decode speed here (20 → 40 tok/s without it).
                    "session.intra_op.allow_spinning": "0",
                }
                config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
                return og.Model(config), provider
            except Exception as exc:  # the library reports every load failure as one type
                failures.append(f"{provider}: {exc}")
                if provider != "cpu":
                    log.warning(
                        "%s: provider %s unusable (%s); trying the next",
                        self.model_id,
                        provider,
                        exc,
                    )
        raise ModelLoadError(
            f"onnxruntime-genai could not load '{self.model_id}' from {self.model_dir}: "
            + "; ".join(failures)
            + ". The directory may be incomplete, or built by a newer model builder than this "
            "runtime; convert it again with: edgelm model convert ALIAS --to onnx --force"
        )

    def _weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_dir.glob("*.onnx*"))

    def _kv_bytes_per_token(self) -> int:
        """fp32 K and V × layers × KV heads × head size, from genai_config.json."""
        dec = self._config.get("model", {}).get("decoder", {})
        heads = int(dec.get("num_key_value_heads") or dec.get("num_attention_heads") or 0)
        layers = int(dec.get("num_hidden_layers") or 0)
        return 2 * layers * heads * int(dec.get("head_size") or 0) * 4

    def _memory_estimate(self, loaded: int) -> int:
        """Weights (the files on disk, or what loading allocated if more) plus a full KV cache
        in fp32 for each concurrent stream and a margin for the runtime's buffers."""
        kv = self._kv_bytes_per_token() * self.n_ctx * self.concurrent_streams
        return max(self._weights_bytes(), loaded) + kv + 64 * 2**20

    # -- tokens ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes as a prompt, the same count usage reports for it."""
        return len(self.encode(text))

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self._tokenizer.decode(np.asarray(tokens, dtype=np.int32)))

    def _chat_template(self, template: str | None, config: dict[str, Any]) -> ChatTemplate | None:
        """The model's chat template, compiled once with Jinja2 (with the special tokens of
        the tokenizer ``config``); onnxruntime-genai's own renderer (which parses it on every
        call) only for a template Jinja2 cannot compile."""
        if template is None:
            return None
        compiled = jinja_chat_template(
            template,
            _special_token_text(config, "bos_token"),
            _special_token_text(config, "eos_token"),
        )
        if compiled is not None:
            return compiled

        def apply(messages: list[dict[str, Any]], _tools: list[dict[str, Any]] | None) -> str:
            # This engine takes no tools (supports_tools is off), so no tools section.
            return str(
                self._tokenizer.apply_chat_template(
                    json.dumps(messages), template_str=template, add_generation_prompt=True
                )
            )

        return apply

    def render(self, request: GenerationRequest) -> str:
        """The prompt text: the model's chat template, or ChatML when it has none."""
        return render_prompt(request, self._chat)

    # -- generation -----------------------------------------------------------------------
    def _params(self, request: GenerationRequest, max_length: int) -> Any:
        params = self._og.GeneratorParams(self._model)
        options: dict[str, Any] = {"max_length": max_length, "batch_size": 1}
        if request.ignore_eos:  # no end of sequence before max_length
            options["min_length"] = max_length
        if request.repeat_penalty and request.repeat_penalty != 1.0:
            options["repetition_penalty"] = float(request.repeat_penalty)
        if request.temperature <= 0:
            options["do_sample"] = False
        else:
            seed = request.seed if request.seed is not None else random.randrange(_SEED_RANGE)
            options.update(
                do_sample=True,
                temperature=float(request.temperature),
                top_p=float(request.top_p) if 0 < request.top_p <= 1 else 1.0,
                top_k=int(request.top_k) if request.top_k > 0 else max(1, self._vocab_size),
                random_seed=int(seed) % _SEED_RANGE,
            )
        params.set_search_options(**options)
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            schema = fmt.schema_dict() if fmt.type == "json_schema" else None
            try:
                params.set_guidance("json_schema", json.dumps(schema or {"type": "object"}))
            except Exception as exc:
                raise InvalidRequest(
                    f"unsupported JSON schema in response_format: {exc}", param="response_format"
                ) from None
        return params

    def _generator(self, request: GenerationRequest, params: Any) -> Any:
        try:
            return self._og.Generator(self._model, params)
        except Exception as exc:
            fmt = request.response_format
            if fmt is not None and fmt.type != "text":
                raise InvalidRequest(
                    f"the JSON schema in response_format cannot be used: {exc}",
                    param="response_format",
                ) from None
            raise

    def _slot_generator(self) -> Any:
        """A slot's reusable generator: a KV cache for the whole context, no sampling of its
        own (the scheduler samples), kept between requests for prefix reuse."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=self.n_ctx, batch_size=1, do_sample=False)
        return self._og.Generator(self._model, params)

    def _batch_generator(self, rows: int, max_length: int) -> Any:
        """A generator for a group of ``rows`` streams decoded together (one weight pass per
        step for all of them): batch 4 decodes ~2.3x the tokens/s of batch 1 on this CPU.
        The scheduler samples; the library's greedy search only takes its choices."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=max_length, batch_size=rows, do_sample=False)
        return self._og.Generator(self._model, params)

    def _answer(self, request: GenerationRequest, cancel: threading.Event | None) -> JobAnswer:
        """Check and tokenize the request and build its job (not yet queued). A request with
        ``response_format`` gets its generator here, so a schema the library cannot compile is
        a 400 before anything is queued."""
        check_capabilities(self, request)
        start = time.perf_counter()
        prompt = self.encode(self.render(request))
        if not prompt:  # an empty completion prompt: condition on BOS alone
            if self._bos < 0:
                raise InvalidRequest("the prompt is empty", param="prompt")
            prompt = [self._bos]
        limit = check_context(self, len(prompt), request.max_tokens)
        greedy = request.temperature <= 0
        seed = request.seed if request.seed is not None else random.randrange(_SEED_RANGE)
        job = OnnxJob(
            prompt=prompt,
            limit=limit,
            exact=greedy or request.seed is not None,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            ignore_eos=request.ignore_eos,
            cancel=cancel or threading.Event(),
            sampling=Sampling.for_request(request, self.min_p, self.repeat_penalty, seed),
            eos=frozenset(self._eos),
            rng=None if greedy else np.random.default_rng(seed),
        )
        text = self._tokenizer.create_stream()  # the tokenizer's incremental decoding
        answer = JobAnswer(job, TokenChunker(start, len(prompt), request.stop), text.decode)
        if job.cancel.is_set():  # the client left while the request queued
            answer.finish = "cancelled"
        elif limit <= 0:  # max_tokens=0
            answer.finish = "length"
        else:
            fmt = request.response_format
            if fmt is not None and fmt.type != "text":
                job.generator = self._generator(request, self._params(request, len(prompt) + limit))
        return answer

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        """Queue the request with the scheduler and turn its tokens into chunks in the
        caller's thread (the bench's in-process target; the service uses :meth:`astream`).
        A consumer that cancels leaves at once only while its job still waits for a slot; a
        running one waits for the scheduler to release the slot's generator."""
        yield from stream_answer(
            self._answer(request, cancel), self._scheduler, still_queued=lambda job: job.slot < 0
        )

    async def astream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        """The same stream for the service: the scheduler thread hands each token straight to
        the event loop, so no thread per stream sits between the model and the socket."""
        if is_long(request):  # tokenizing it, or compiling a schema, would hold up the others
            answer = await asyncio.to_thread(self._answer, request, cancel)
        else:
            answer = self._answer(request, cancel)
        async for chunk in astream_answer(answer, self._scheduler):
            yield chunk

    def batch_stats(self) -> dict[str, int]:
        """Counters of the scheduler: turns, tokens, reused prompt tokens, batched passes."""
        return self._scheduler.stats()

    def live_info(self) -> dict[str, object]:
        """The threads it computes with, where, the stream count and why, and the
        scheduler's counters."""
        return {
            "threads": self.threads,
            "provider": self.provider,
            "parallel_reason": self.parallel_reason,
            **self.batch_stats(),
        }

    def _bytes(self, token: int) -> bytes:
        return self.decode([token]).encode("utf-8")

    def raw_speed(self, n_prompt: int, n_gen: int, seed: int = 0) -> tuple[float, float]:
        """llama-bench style: seconds to process ``n_prompt`` random tokens and to generate
        ``n_gen`` tokens after them (greedy, end-of-sequence suppressed), on the scheduler's
        thread with the model to itself (refused while streams are served)."""
        if self._scheduler.busy:
            raise InvalidRequest(f"model '{self.model_id}' is serving requests; bench it idle")
        rng = np.random.default_rng(seed)
        high = max(2, (self._vocab_size or 32000) - 1)
        prompt = rng.integers(1, high, size=max(1, n_prompt), dtype=np.int32)
        total = len(prompt) + n_gen + 1

        def measure() -> tuple[float, float]:
            params = self._og.GeneratorParams(self._model)
            params.set_search_options(
                max_length=total, min_length=total, batch_size=1, do_sample=False
            )
            generator = self._og.Generator(self._model, params)
            t0 = time.perf_counter()
            generator.append_tokens(prompt)
            # The first token is sampled from the prompt's logits; each later one costs one
            # forward pass, so n_gen calls after it time exactly n_gen decode steps.
            generator.generate_next_token()
            pp_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(n_gen):
                generator.generate_next_token()
            tg_s = time.perf_counter() - t1
            del generator
            return pp_s, tg_s

        return self._scheduler.call(measure)

    def close(self) -> None:
        """Stop the scheduler (failing what it still serves) and drop the model now rather
        than whenever GC gets to it."""
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.close()
            del self._scheduler  # a closed engine has none (close() twice is fine)
        self._tokenizer = None
        self._model = None
