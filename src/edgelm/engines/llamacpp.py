"""The default engine: GGUF models through llama-cpp-python, run in-process.

The decode loop is ours, on llama.cpp's batch API through llama-cpp-python's low-level
bindings (see :mod:`edgelm.engines.batching`), rather than ``create_chat_completion``: that is
what lets every chunk carry its token ids, logprobs and timing, and lets concurrent requests
share decode steps. Things learned the hard way with llama-cpp-python 0.3.36 on these CPUs,
each handled below:

* Its ``logprobs`` path needs ``logits_all=True`` and converts the whole vocabulary's logits at
  every position (~10x slower). We take a log-softmax of the one row the sampler just used, and
  only when logprobs were asked for.
* ``Llama.detokenize`` reads pieces through a 32-byte buffer and returns nothing for longer
  tokens; Qwen-Coder has 240 such tokens (runs of spaces, i.e. code indentation). We read
  pieces ourselves with a buffer that grows.
* A grammar that llama.cpp cannot parse becomes a NULL sampler and the process segfaults at
  the first token (e.g. the schema ``{"enum": []}``). Grammars are parsed once up front.
* llama.cpp's matrix kernels give slightly different logits for a row depending on how the
  batch it was evaluated in was shaped (one token alone, or rows left over after groups of 8
  in the repacked Q4_K kernels), and a KV cache filled one generated token at a time differs
  from one filled by a prompt batch. Naive prefix reuse therefore changes greedy output
  between two identical requests. By default we reuse the longest cached prefix anyway, as
  llama.cpp's server does: it halves the time to first token of short chats that share a
  system prompt. With ``compute.batch_invariant`` on, :func:`plan_reuse` keeps reuse to what
  answers a reproducible request (temperature 0 or a seed) the same every time.
* In embedding mode llama.cpp computes vocabulary logits for every token; ``Llama.embed``
  with a second ``Llama`` cost +560 MB for Qwen2.5-0.5B. :meth:`LlamaCppEngine.embed` uses a
  small second context on the same model instead (+86 MB).
"""

from __future__ import annotations

import asyncio
import json
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
from edgelm.engines.batching import (
    BatchScheduler,
    Job,
    Sampling,
    evaluate,
    piece_reader,
)
from edgelm.engines.gguf_file import check_gguf_size
from edgelm.engines.job_stream import (
    JobAnswer,
    astream_answer,
    is_long,
    stream_answer,
    utf8_text,
)
from edgelm.engines.prefill_context import PrefillContext, fill_sequence
from edgelm.engines.sizing import (
    ParallelChoice,
    auto_parallel,
    memory_budget_bytes,
    memory_share,
)
from edgelm.engines.threads import CpuLoadProbe, ThreadController, logical_cores
from edgelm.errors import InvalidRequest, MissingExtra, ModelLoadError
from edgelm.settings import PoolSettings
from edgelm.tools import call_schema, grammar_schema, template_supports_tools, wrap_call_grammar
from edgelm.types import Chunk, GenerationRequest

if TYPE_CHECKING:
    from edgelm.catalog import CatalogEntry
    from edgelm.settings import Settings

# Prefix reuse keeps KV entries in whole blocks of this many tokens. It must be a multiple of
# every CPU kernel's row-group size (4, 8 or 16 for ggml's repacked and AMX kernels), so that a
# suffix evaluated after a reused prefix is cut into the same row groups as a fresh prompt.
REUSE_ALIGN = 32
# Most tokens the embedding context reads per text (its KV cache size); longer texts are
# truncated, as llama-cpp-python does. RAG chunks are shorter.
EMBED_MAX_TOKENS = 512
# Tokens per embedding step: llama.cpp keeps vocabulary logits for each (see embed()).
EMBED_STEP = 64
# KV cache element types: (bytes, elements) per ggml block. q8_0 and q4_0 keep one f16 scale
# per block of 32 values.
KV_TYPES: dict[str, tuple[int, int]] = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
# An allowance for the flash-attention prefill context's compute buffers beside its KV cache
# (flash attention keeps no n_ubatch x n_ctx score matrix, so they stay small).
PREFILL_CONTEXT_EXTRA = 16 * 2**20
# llama.cpp's "pick a random seed" value; a user seed equal to it would silently be random.
_RANDOM_SEED = 0xFFFFFFFF


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtra("llama-cpp-python", "llamacpp") from None
    return llama_cpp


def flash_attention(setting: str, kv_type: str) -> bool:
    """Whether the engine's context runs flash attention: ``compute.flash_attn`` ("auto",
    "on", "off").

    Auto keeps it off with an f16 cache and turns it on for a quantised one (llama.cpp reads
    a quantised V cache only in flash attention). Measured with llama-bench on the llama.cpp
    this engine runs (Qwen2.5-0.5B Q4_K_M, 2 threads): it reads prompts faster (pp2048 198
    tok/s against 176; 88 against 68 with 6k tokens already cached), but decodes slower once
    512 or more tokens are cached (tg32 20.5 against 27.2 at 512, 10.6 against 20.1 at 4k):
    on CPU its attention for one new token walks the cache a row at a time. So with "auto"
    the context decodes without it and long prompts are read with it in a second context
    (:mod:`edgelm.engines.prefill_context`). The same prompt twice still answers alike with
    it, from the first's kept logits (:class:`edgelm.engines.batching.FirstLogits`).
    """
    return setting == "on" or kv_type != "f16"


def plan_reuse(
    cached: Sequence[int],
    clean: int,
    prompt: Sequence[int],
    exact: bool,
    n_batch: int,
    n_ubatch: int = 512,
) -> tuple[int, int]:
    """Decide how much of the KV cache to keep for ``prompt``; return (keep, clean_after).

    ``cached`` are the tokens in the cache, ``clean`` how many leading ones hold exactly what
    a fresh evaluation of them as a prompt would (a multiple of ``REUSE_ALIGN``). An ``exact``
    request (temperature 0 or a seed) keeps only a clean, aligned prefix and re-evaluates at
    least two tokens, so its logits are bit-identical to a fresh run: the answer depends on the
    request, never on what the engine served before. Other requests sample randomly anyway, so
    they keep the longest common prefix, including KV entries of earlier generated tokens
    (the previous answer in a multi-turn chat), for the shortest time to first token.
    """
    common = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        common += 1
    n = len(prompt)

    n_ubatch = min(n_batch, n_ubatch)  # llama.cpp splits each batch into micro-batches of this

    def lone_last_row(rows: int) -> bool:
        return (rows % n_batch or n_batch) % n_ubatch == 1

    def fresh_like(k: int) -> bool:
        # A micro-batch of one row takes another kernel path than a row inside a larger one.
        return k == 0 or (n - k >= 2 and lone_last_row(n - k) == lone_last_row(n))

    aligned = min(common, clean) // REUSE_ALIGN * REUSE_ALIGN
    while not fresh_like(aligned):
        aligned -= REUSE_ALIGN
    keep = aligned if exact else min(common, n - 1)
    still_clean = min(keep, clean) // REUSE_ALIGN * REUSE_ALIGN
    if keep == still_clean and fresh_like(keep):
        return keep, n // REUSE_ALIGN * REUSE_ALIGN
    return keep, still_clean


class LlamaCppEngine(Engine):
    """A GGUF model in this process, serving up to ``parallel`` streams in one running batch
    (see :mod:`edgelm.engines.batching`); the pool hands it that many at once."""

    name = "llamacpp"
    isolate = True
    native_async = True
    supports_logprobs = True
    supports_embeddings = True
    supports_grammar = True
    supports_seed = True
    supports_raw_speed = True
    supports_tools = True

    min_p: ClassVar[float] = 0.05
    """llama.cpp's default; cuts the long tail that makes tiny models ramble at temperature>0."""

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        n_ctx: int = 4096,
        threads: int | Literal["auto"] = 0,
        n_batch: int = 2048,
        parallel: int | Literal["auto"] = 1,
        flash_attn: bool | None = None,
        batch_invariant: bool = False,
        repeat_penalty: float = 1.0,
        n_ubatch: int = 512,
        kv_type: str = "f16",
        prefill_stall: float = 2.0,
        memory_share: int = 0,
        kv_unified: bool = False,
        flash_prefill: bool | None = None,
    ):
        self._lib = _import_llama_cpp()
        self.model_id = model_id
        self.model_path = Path(model_path)
        # "auto": start with all cores, then adapt between steps (edgelm.engines.threads).
        self.threads = default_threads() if threads == "auto" else threads or default_threads()
        self.concurrent_streams = 1 if parallel == "auto" else max(1, parallel)
        self.parallel_reason = f"compute.parallel = {parallel}"
        self.batch_invariant = batch_invariant
        if kv_unified and batch_invariant:
            raise ModelLoadError("batch-invariant answers need a KV stream per sequence")
        self.kv_unified = kv_unified
        self.repeat_penalty = repeat_penalty
        """Used when a request does not set its own (``compute.repeat_penalty``)."""
        if kv_type not in KV_TYPES:
            raise ModelLoadError(f"unknown KV cache type '{kv_type}'; use one of {list(KV_TYPES)}")
        self.kv_type = kv_type
        self.flash_attn = flash_attention("auto", kv_type) if flash_attn is None else flash_attn
        if kv_type != "f16" and not self.flash_attn:
            raise ModelLoadError(f"a {kv_type} KV cache needs flash attention")
        # Long prompts read in a second context with flash attention (see
        # edgelm.engines.prefill_context); by default whenever this one runs without it.
        # Batch-invariant answers must not depend on which context read the prompt.
        self.flash_prefill = (
            (flash_attn is None if flash_prefill is None else flash_prefill)
            and not self.flash_attn
            and not batch_invariant
        )
        _check_gguf(self.model_path)
        rss_before = process_rss()
        self._model = self._load_model()
        trained = self._model.n_ctx_train()
        # Past its trained context a model degrades silently.
        self.n_ctx = min(n_ctx, trained) if trained > 0 else n_ctx
        # Batch-invariant mode reads prompts in chunks of one micro-batch: cut where a request
        # alone would be cut, a long prompt then stalls the other streams for one micro-batch.
        self.n_ubatch = max(16, min(n_ubatch, n_batch))
        self.n_batch = _aligned_batch(
            min(n_batch, self.n_ubatch) if batch_invariant else n_batch, self.n_ctx
        )
        self.n_ubatch = min(self.n_ubatch, self.n_batch)
        if parallel == "auto":
            self._size_streams(memory_share)
        self._vocab = self._model.vocab
        self._n_vocab = self._model.n_vocab()
        self._ctx = self._new_context()
        self._piece = piece_reader(self._lib, self._vocab)
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self._grammars: dict[str, Any] = {}
        meta = self._model.metadata()
        self._bos_text = self._special_text(self._model.token_bos())
        self._eos_text = self._special_text(self._model.token_eos())
        template = meta.get("tokenizer.chat_template")
        self._chat = self._chat_template(template)
        self._template_tools = self._chat is not None and template_supports_tools(template)
        self._kv_per_token = kv_bytes_per_token(meta, kv_type)
        self._n_head = _int(meta, "attention.head_count")
        self.memory_bytes = self._memory_estimate(max(0, process_rss() - rss_before))
        self._scheduler = BatchScheduler(
            self._lib,
            self._ctx.ctx,
            self._vocab,
            self._n_vocab,
            slots=self.concurrent_streams,
            kv_size=self.n_ctx,
            n_batch=self.n_batch,
            mixed=not batch_invariant,
            unified=kv_unified,
            plan=lambda cached, clean, prompt, exact: plan_reuse(
                cached, clean, prompt, exact, self.n_batch, self.n_ubatch
            ),
            stall=prefill_stall,
            prefill=self._open_prefill if self.flash_prefill else None,
            logprob=lambda row, token, top: token_logprob(row, token, top, self._piece),
            threads=ThreadController(
                max_threads=self.threads, cores=logical_cores(), load=CpuLoadProbe()
            )
            if threads == "auto"
            else None,
        )

    @classmethod
    def from_entry(
        cls, entry: CatalogEntry, settings: Settings, path: Path | None
    ) -> LlamaCppEngine:
        if path is None:
            raise ModelLoadError(f"model '{entry.alias}' has no file to load")
        return cls(
            path,
            entry.alias,
            n_ctx=settings.compute.n_ctx,
            threads=settings.compute.threads,
            n_batch=settings.compute.n_batch,
            parallel=settings.compute.parallel,
            batch_invariant=settings.compute.batch_invariant,
            repeat_penalty=settings.compute.repeat_penalty,
            memory_share=memory_share(settings.pool),
            n_ubatch=settings.compute.n_ubatch,
            kv_type=settings.compute.kv_type,
            flash_attn=flash_attention(settings.compute.flash_attn, settings.compute.kv_type),
            flash_prefill=settings.compute.flash_attn == "auto",
            prefill_stall=settings.compute.prefill_stall,
            kv_unified=settings.compute.kv_unified,
        )

    def _size_streams(self, share: int) -> None:
        """``compute.parallel = "auto"``: the stream count from the model's sizes, its KV cache
        type and its share of the memory budget (see :func:`plan_streams`)."""
        choice = plan_streams(
            self._model.metadata(),
            self.n_ctx,
            self.n_ubatch,
            self.model_path.stat().st_size,
            share or memory_budget_bytes(PoolSettings()),
            self.flash_attn,
            self.kv_type,
            self.kv_unified,
            prefill_context=self.flash_prefill,
        )
        self.concurrent_streams = choice.streams
        self.parallel_reason = f"compute.parallel = auto: {choice.reason}"

    def _memory_estimate(self, loaded: int) -> int:
        """Bytes this model will hold at its busiest, for the pool's memory budget.

        The weights file (mapped, resident once used), plus what loading allocated, which is
        the KV cache (n_ctx cells for each parallel stream) and, on CPUs where llama.cpp
        repacks Q4_K/Q4_0 weights for its faster kernels, a copy of those (~80 MB for
        Qwen2.5-0.5B): measured as the RSS growth over the load, and never less than the KV
        cache. Then the attention scratch a full-context prompt batch needs (over every
        stream's cells in a shared pool), which is only touched later. For SmolLM2 and
        Qwen2.5-0.5B at 4096 tokens this came within 10% of the RSS measured after a
        3,300-token prompt.
        """
        size = self.model_path.stat().st_size
        allocated = max(loaded - size, self._kv_per_token * self.n_ctx * self.concurrent_streams)
        cells = self.n_ctx * (self.concurrent_streams if self.kv_unified else 1)
        scratch = attention_scratch_per_cell(self.n_ubatch, self._n_head, self.flash_attn) * cells
        return size + allocated + scratch + 32 * 2**20

    def _load_model(self) -> Any:
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp logs every tensor and graph node otherwise
        self._lib.llama_backend_init()
        try:
            return _internals.LlamaModel(
                path_model=str(self.model_path),
                params=self._lib.llama_model_default_params(),
                verbose=False,
            )
        except Exception as exc:  # llama.cpp reports every load failure as a bare exception
            check_gguf_size(self.model_path, self.model_id)  # says so when it is cut off
            raise ModelLoadError(
                f"llama.cpp could not load '{self.model_id}' from {self.model_path}: {exc}. "
                "The file may be corrupt or truncated, or too large for free memory; "
                f"re-download it with 'edgelm model download {self.model_id} --force'."
            ) from None

    def _new_context(self) -> Any:
        """One context for all streams: ``parallel`` × n_ctx KV cells, in one pool (fast
        mode) or as one stream of n_ctx cells per sequence (batch-invariant mode, where each
        answer must be the one the request gets alone); see :mod:`edgelm.engines.batching`.
        Flash attention and the KV cache type as chosen in ``__init__`` (see
        :func:`flash_attention`).
        """
        from llama_cpp import _internals

        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.concurrent_streams
        # A mixed step carries every running sequence's next token besides n_batch prompt ones.
        params.n_batch = self.n_batch + self.concurrent_streams
        params.n_ubatch = self.n_ubatch
        params.n_seq_max = self.concurrent_streams
        # A stream per sequence unless compute.kv_unified asks for one shared pool (see
        # edgelm.engines.batching for what each costs).
        params.kv_unified = self.kv_unified
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.flash_attn
            else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = params.type_v = _ggml_type(lib, self.kv_type)
        params.no_perf = True
        try:
            return _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except Exception as exc:
            raise ModelLoadError(
                f"llama.cpp could not create a context for '{self.model_id}' "
                f"({self.n_ctx} tokens): {exc}"
            ) from None

    def _open_prefill(self) -> PrefillContext:
        """The flash-attention context long prompts are read in (opened by the scheduler on
        the first one): one sequence of n_ctx cells on the same weights, counted in the
        memory estimate from then on."""
        from llama_cpp import _internals

        lib = self._lib
        params = type(self._ctx.params).from_buffer_copy(self._ctx.params)
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_seq_max = 1
        params.kv_unified = True
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        self.memory_bytes += self._kv_per_token * self.n_ctx + PREFILL_CONTEXT_EXTRA
        return PrefillContext(lib, ctx, self._n_vocab, self.n_batch)

    # -- tokens ---------------------------------------------------------------------------
    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        try:
            return self._model.token_get_text(token)
        except UnicodeDecodeError:
            return ""

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a rendered prompt: special tokens parsed, BOS added when the model wants
        one and the template did not already write it."""
        add_bos = bool(self._model.add_bos_token()) and not (
            self._bos_text and text.startswith(self._bos_text)
        )
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes as a prompt, the same count usage reports for it."""
        return len(self.tokenize_prompt(text))

    def _chat_template(self, template: str | None) -> ChatTemplate | None:
        """The GGUF's chat template (ChatML when jinja2 cannot compile it: the common
        default)."""
        if not template:
            return None
        return jinja_chat_template(template, self._bos_text, self._eos_text)

    def render(self, request: GenerationRequest) -> str:
        """The prompt text: the chat template stored in the GGUF, or ChatML without one."""
        return render_prompt(request, self._chat, self._template_tools)

    def _grammar(self, request: GenerationRequest) -> tuple[str, str] | None:
        """The grammar (GBNF text, root rule) for ``response_format``, or for a forced tool
        call (``tool_choice`` ``required`` or named: only ``<tool_call>`` blocks whose JSON
        fits one of the functions' schemas), parsed by llama.cpp once before it is used. It
        rides in the job's sampler chain, so each sequence of the batch has its own."""
        forced = request.forced_tools
        if forced:
            schema: dict[str, Any] | None = call_schema(forced)
            key = f"tools:{request.parallel_tool_calls}:{json.dumps(schema, sort_keys=True)}"
            param = "tools"
        else:
            fmt = request.response_format
            if fmt is None or fmt.type == "text":
                return None
            schema = fmt.schema_dict()
            key = "" if schema is None else json.dumps(schema, sort_keys=True)
            param = "response_format"
        if key in self._grammars:
            return self._grammars[key]
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        try:
            grammar = (
                LlamaGrammar.from_string(JSON_GBNF, verbose=False)
                if schema is None
                else LlamaGrammar.from_json_schema(
                    json.dumps(grammar_schema(schema)), verbose=False
                )
            )
        except Exception as exc:  # the converter asserts on schemas it does not understand
            raise InvalidRequest(
                f"unsupported JSON schema in {param}: {exc}", param=param
            ) from None
        text, root = _strict_strings(grammar._grammar), grammar._root
        if forced:
            text, root = wrap_call_grammar(text, request.parallel_tool_calls), "root"
        sampler = self._lib.llama_sampler_init_grammar(
            self._vocab, text.encode("utf-8"), root.encode("utf-8")
        )
        if not sampler:
            raise InvalidRequest(
                f"the JSON schema in {param} gives a grammar llama.cpp cannot parse "
                "(e.g. an empty enum)",
                param=param,
            )
        self._lib.llama_sampler_free(sampler)
        if len(self._grammars) >= 32:
            self._grammars.clear()
        self._grammars[key] = (text, root)
        return text, root

    # -- generation -----------------------------------------------------------------------
    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[Chunk]:
        """Queue the request with the batch scheduler and turn its tokens into chunks, in the
        caller's thread (the bench's in-process target; the service streams through
        :meth:`astream`)."""
        yield from stream_answer(self._answer(request, cancel), self._scheduler)

    async def astream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        """The same stream for the service: the compute thread hands each token straight to
        the event loop, so no thread sits between the model and the socket."""
        if is_long(request):  # rendering and tokenizing it would hold up every other stream
            answer = await asyncio.to_thread(self._answer, request, cancel)
        else:
            answer = self._answer(request, cancel)
        async for chunk in astream_answer(answer, self._scheduler):
            yield chunk

    def _answer(self, request: GenerationRequest, cancel: threading.Event | None) -> JobAnswer:
        """Check and tokenize the request and build its job (not yet queued)."""
        check_capabilities(self, request)
        start = time.perf_counter()
        prompt = self.tokenize_prompt(self.render(request))
        if not prompt:  # an empty completion prompt: condition on BOS alone, as llama.cpp does
            if self._model.token_bos() < 0:
                raise InvalidRequest("the prompt is empty", param="prompt")
            prompt = [self._model.token_bos()]
        limit = check_context(self, len(prompt), request.max_tokens)
        grammar = self._grammar(request)
        greedy = request.temperature <= 0
        if request.seed is not None:
            seed = request.seed % 2**32
            seed = seed - 1 if seed == _RANDOM_SEED else seed
        else:
            seed = random.randrange(_RANDOM_SEED)
        job = Job(
            prompt=prompt,
            limit=limit,
            exact=self.batch_invariant and (greedy or request.seed is not None),
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            ignore_eos=request.ignore_eos,
            cancel=cancel or threading.Event(),
            sampling=Sampling.for_request(request, self.min_p, self.repeat_penalty, seed, grammar),
        )
        text, end = utf8_text(self._piece)
        answer = JobAnswer(job, TokenChunker(start, len(prompt), request.stop), text, end)
        if job.cancel.is_set():  # the client left while the request queued
            answer.finish = "cancelled"
        elif limit <= 0:  # max_tokens=0
            answer.finish = "length"
        return answer

    def batch_stats(self) -> dict[str, int]:
        """Counters of the batch scheduler: decode steps, reused prompt tokens, pauses."""
        return self._scheduler.stats()

    def live_info(self) -> dict[str, object]:
        """The threads it computes with (now, and why when they adapt), the stream count and
        why, its prompt batching and KV cache, and the batch scheduler's counters."""
        controller = self._scheduler.threads
        threads: dict[str, object] = (
            controller.info()
            if controller is not None
            else {"threads": self.threads, "threads_mode": "fixed"}
        )
        return {
            **threads,
            "parallel_reason": self.parallel_reason,
            "flash_attn": self.flash_attn,
            "flash_prefill": self.flash_prefill,
            "kv_type": self.kv_type,
            "kv_unified": self.kv_unified,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            **self.batch_stats(),
        }

    def raw_speed(self, n_prompt: int, n_gen: int, seed: int = 0) -> tuple[float, float]:
        """llama-bench style: seconds to evaluate ``n_prompt`` random tokens as prompt
        batches, then seconds for ``n_gen`` single-token decode steps after them.

        Runs on the scheduler's thread with the context to itself (it refuses while streams
        are served), from an empty cache, and leaves the cache empty.
        """
        if self._scheduler.busy:
            raise InvalidRequest(f"model '{self.model_id}' is serving requests; bench it idle")
        if n_prompt + n_gen + 1 > self.n_ctx:
            raise InvalidRequest(
                f"pp{n_prompt} + tg{n_gen} does not fit the {self.n_ctx}-token context"
            )
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, self._n_vocab, size=n_prompt + n_gen + 1).tolist()
        lib, ctx = self._lib, self._ctx.ctx

        def measure() -> tuple[float, float]:
            batch = lib.llama_batch_init(max(self.n_batch, 1), 0, 1)
            try:
                lib.llama_memory_clear(lib.llama_get_memory(ctx), False)

                def decode(part: list[int], at: int) -> None:
                    fill_sequence(batch, part, at)
                    status = lib.llama_decode(ctx, batch)
                    if status != 0:
                        raise RuntimeError(f"llama_decode failed with status {status}")

                t0 = time.perf_counter()
                for at in range(0, n_prompt, self.n_batch):
                    decode(tokens[at : min(n_prompt, at + self.n_batch)], at)
                lib.llama_synchronize(ctx)
                t1 = time.perf_counter()
                for i in range(n_gen):
                    decode([tokens[n_prompt + i]], n_prompt + i)
                    lib.llama_get_logits_ith(ctx, -1)
                lib.llama_synchronize(ctx)
                t2 = time.perf_counter()
                return t1 - t0, t2 - t1
            finally:
                lib.llama_batch_free(batch)

        return self._scheduler.call(measure)

    # -- embeddings -----------------------------------------------------------------------
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings; texts longer than 512 tokens are truncated
        (an empty text gives a zero vector).

        They come from a second llama.cpp context on the same loaded model, opened on first
        use in embedding mode. Why not ``Llama(embedding=True)``:

        * one shared context: ``Llama.embed`` clears the KV cache, so every RAG query would
          throw away the generation prefix (the long system prompt) the answer then reuses;
        * a second ``Llama``: it loads the model again, and the CPU backend's repacked copy of
          the Q4_K weights is per model (+130 MB anonymous memory for Qwen2.5-0.5B);
        * ``Llama.embed`` itself: llama.cpp computes vocabulary logits for every token in
          embedding mode, and in its 512-token batches that took +430 MB more for Qwen.

        So we pool ourselves, 64 tokens a step, in a context that shares the model's weights.
        """
        if not texts:
            return [], 0
        with self._embed_lock:
            ctx, batch = self._embedding_context()
            n_embd = self._model.n_embd()
            vectors: list[list[float]] = []
            used = 0
            for text in texts:
                tokens = self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                tokens = tokens[:EMBED_MAX_TOKENS]
                used += len(tokens)
                total = np.zeros(n_embd, dtype=np.float64)
                ctx.kv_cache_clear()
                for at in range(0, len(tokens), EMBED_STEP):
                    part = tokens[at : at + EMBED_STEP]
                    batch.set_batch(batch=part, n_past=at, logits_all=True)
                    evaluate(ctx.decode, batch)
                    rows = np.ctypeslib.as_array(
                        self._lib.llama_get_embeddings(ctx.ctx), shape=(len(part), n_embd)
                    )
                    total += rows.sum(axis=0, dtype=np.float64)
                norm = float(np.linalg.norm(total))
                vectors.append((total / norm if norm else total).tolist())
        return vectors, used

    def _embedding_context(self) -> tuple[Any, Any]:
        if self._embedder is not None:
            return self._embedder
        from llama_cpp import _internals

        lib = self._lib
        size = min(self.n_ctx, EMBED_MAX_TOKENS)
        params = type(self._ctx.params).from_buffer_copy(self._ctx.params)
        params.n_ctx = size
        params.n_batch = params.n_ubatch = EMBED_STEP
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_UNSPECIFIED  # NONE for chat models
        try:
            ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
            if ctx.pooling_type() != lib.LLAMA_POOLING_TYPE_NONE:
                ctx.close()  # an embedding model pools by itself; we want per-token rows
                params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
                ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
            batch = _internals.LlamaBatch(n_tokens=EMBED_STEP, embd=0, n_seq_max=1, verbose=False)
        except Exception as exc:
            raise ModelLoadError(
                f"could not open an embedding context for '{self.model_id}': {exc}"
            ) from None
        # Its KV cache, and vocabulary logits for a whole step, in the output and the graph.
        self.memory_bytes += (
            self._kv_per_token * size
            + EMBED_STEP * self._n_vocab * 4 * 2
            + EMBED_STEP * size * self._n_head * 4
            + 8 * 2**20
        )
        self._embedder = (ctx, batch)
        return self._embedder

    def close(self) -> None:
        """Stop the scheduler and free the contexts and the model now, not whenever GC runs."""
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.close()
            del self._scheduler  # a closed engine has none (close() twice is fine)
        with self._embed_lock:
            if self._embedder is not None:
                for part in self._embedder:
                    part.close()
                self._embedder = None
        for part in (getattr(self, "_ctx", None), getattr(self, "_model", None)):
            if part is not None:
                part.close()


def _strict_strings(gbnf: str) -> str:
    """llama-cpp-python's JSON grammars let strings hold raw control characters (a newline),
    which JSON forbids: answers then fail to parse, and a tiny model writing a forced tool call
    ran a string on past ``</tool_call>``. Exclude them, as llama.cpp's own converter does."""
    return gbnf.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def attention_scratch_per_cell(n_ubatch: int, n_head: int, flash_attn: bool) -> int:
    """Bytes of attention scores a prompt micro-batch needs for each KV cell it reads: f32
    scores per row and head without flash attention, none with it (it works in tiles)."""
    return 0 if flash_attn else n_ubatch * n_head * 4


def plan_streams(
    meta: dict[str, str],
    n_ctx: int,
    n_ubatch: int,
    weights_bytes: int,
    memory_bytes: int,
    flash_attn: bool,
    kv_type: str = "f16",
    kv_unified: bool = False,
    prefill_context: bool = False,
) -> ParallelChoice:
    """The automatic stream count of a GGUF model (its metadata) at ``n_ctx`` tokens a
    stream: KV bytes per token in a ``kv_type`` cache, against ``memory_bytes`` and the cores
    (:func:`edgelm.engines.sizing.auto_parallel`). Without flash attention a prompt
    micro-batch also needs f32 attention scores for every KV cell it reads: a stream's cells
    with a stream per sequence (held once), every stream's in a shared pool (``kv_unified``:
    they grow with each stream)."""
    scratch = attention_scratch_per_cell(n_ubatch, _int(meta, "attention.head_count"), flash_attn)
    # The flash-attention prefill context (``prefill_context``) holds one more sequence of
    # n_ctx f16 cells and its own compute buffers, whatever the stream count.
    prefill = (
        kv_bytes_per_token(meta, "f16") * n_ctx + PREFILL_CONTEXT_EXTRA if prefill_context else 0
    )
    return auto_parallel(
        kv_bytes_per_token=kv_bytes_per_token(meta, kv_type),
        n_ctx=n_ctx,
        weights_bytes=weights_bytes,
        memory_bytes=memory_bytes,
        cores=default_threads(),
        scratch_bytes_per_token=scratch if kv_unified else 0,
        shared_bytes=(0 if kv_unified else scratch * n_ctx) + prefill,
    )


def planned_streams(path: Path, settings: Settings) -> ParallelChoice:
    """What ``compute.parallel = "auto"`` would choose for the model file at ``path`` with
    these settings, without loading its weights (for ``edgelm config list``)."""
    from llama_cpp import _internals
    from llama_cpp._logger import set_verbose

    lib = _import_llama_cpp()
    _check_gguf(path)
    set_verbose(False)
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        meta, trained = model.metadata(), model.n_ctx_train()
    finally:
        model.close()
    compute = settings.compute
    n_ctx = min(compute.n_ctx, trained) if trained > 0 else compute.n_ctx
    flash = flash_attention(compute.flash_attn, compute.kv_type)
    return plan_streams(
        meta,
        n_ctx,
        min(compute.n_ubatch, compute.n_batch),
        path.stat().st_size,
        memory_share(settings.pool),
        flash,
        compute.kv_type,
        compute.kv_unified,
        # as LlamaCppEngine decides it (from_entry passes flash_prefill for "auto")
        prefill_context=compute.flash_attn == "auto" and not flash and not compute.batch_invariant,
    )


def _check_gguf(path: Path) -> None:
    """Refuse what is not a GGUF file before llama.cpp sees it, with a message that says so."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF model file (it starts with {head[:4]!r})")


def kv_bytes_per_token(meta: dict[str, str], kv_type: str = "f16") -> int:
    """KV cache bytes per context token of a model (its GGUF metadata) with a cache of
    ``kv_type``: K and V × layers × KV heads × head size × bytes per element (2 in f16,
    34/32 in q8_0, 18/32 in q4_0). What the memory estimate and the automatic
    ``compute.parallel`` count streams by."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV cache type '{kv_type}'; use one of {list(KV_TYPES)}")
    heads = _int(meta, "attention.head_count")
    if not heads:
        return 0
    kv_heads = _int(meta, "attention.head_count_kv") or heads
    head_size = _int(meta, "attention.key_length") or _int(meta, "embedding_length") // heads
    block_bytes, block = KV_TYPES[kv_type]
    elements = 2 * _int(meta, "block_count") * kv_heads * head_size
    return -(-elements // block) * block_bytes


def _ggml_type(lib: Any, kv_type: str) -> int:
    """llama.cpp's ggml type id for a KV cache type name."""
    return int(
        {"f16": lib.GGML_TYPE_F16, "q8_0": lib.GGML_TYPE_Q8_0, "q4_0": lib.GGML_TYPE_Q4_0}[kv_type]
    )


def _aligned_batch(n_batch: int, n_ctx: int) -> int:
    """The prompt batch size, a multiple of REUSE_ALIGN so that batches split at the same
    aligned positions whether or not a prefix was reused (see plan_reuse)."""
    return max(REUSE_ALIGN, min(n_batch, n_ctx) // REUSE_ALIGN * REUSE_ALIGN)


def _int(meta: dict[str, str], key: str) -> int:
    """An integer of the architecture's metadata (``llama.block_count`` ...), 0 if absent."""
    try:
        return int(meta.get(f"{meta.get('general.architecture', '')}.{key}", 0))
    except ValueError:
        return 0
