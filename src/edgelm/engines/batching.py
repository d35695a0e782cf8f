"""Continuous batching for llama.cpp: several sequences share one context and one decode step.

One scheduler per loaded model owns its llama.cpp context; all of them take turns on one
process-wide compute thread (:class:`ComputeLoop`). Requests join and leave the running batch
between steps; a decode step for N sequences reads the weights once: on
Qwen2.5-0.5B with 2 threads, 4 sequences step in 55 ms and 8 in 89 ms where one takes 36 ms,
so aggregate decode speed grows 2-3x with concurrency, and a newcomer waits for at most one
step before its prompt is read (instead of for every answer in front of it).

Two modes, chosen by ``compute.batch_invariant``:

* Fast (the default), as llama.cpp's server does it: each step is a single llama_decode with
  every running sequence's next token plus up to n_batch tokens of newcomers' prompts
  (:meth:`BatchScheduler._mixed_step`), so running streams never stop for a newcomer: while
  others decode, a step takes only as many prompt tokens as keep it within
  ``compute.prefill_stall`` times a plain decode step (100 by default: nearly unpaced, see
  the setting for what lower values cost), measured as it runs (:class:`PrefillPacer`,
  chunked prefill as in vLLM); a prompt alone goes in n_batch steps, at full speed. The
  price: a greedy answer can differ slightly with the load (its rows go through the kernels
  with other rows, in chunks cut by the load).
* Batch-invariant: prompts are evaluated in batches of their own, cut where they would be cut
  for the request alone, so every reproducible request (temperature 0 or a seed) gets exactly
  the answer it gets on an idle engine. Each loop evaluates the newcomers' prompts (up to
  n_batch tokens, so one long prompt cannot stall the others for long), then one decode step.

The KV cache: a stream per sequence by default, or one pool shared by all
(``compute.kv_unified``, fast mode only). In a shared pool a newcomer's prompt rows join the
running streams' micro-batch (no weight pass of their own), but every token's attention reads
every cell in the pool, other sequences' and idle slots' kept caches included, so it slows
down with what the pool holds (see the setting for figures). Over separate streams llama.cpp
splits a batch with ``split_equal``: a micro-batch takes *consecutive* sequence ids, the same
number of tokens from each, so running sequences are kept on ids 0..n-1
(:meth:`BatchScheduler._compact`) and rows go in id order; a prompt's rows past the first then
form micro-batches of their own.

Prefix caching: each sequence id is a *slot* that keeps the KV entries of its last request
(prompt and answer) after it finished. A newcomer gets the lowest free id and the longest
prefix any slot holds of its prompt (the previous turn of the same conversation, or the same
system prompt), copied over when another slot holds it. How much to keep is decided by
:func:`edgelm.engines.llamacpp.plan_reuse`. A prompt a slot holds whole (the same request
again) is not evaluated at all: the slot also keeps the logits its prompt ended with
(:class:`FirstLogits`), and the first token is drawn from them.

Should a step not fit the cache anyway (llama_decode reports no KV slot), idle slots' caches
are dropped first; if that is not enough, a running sequence is *paused*: its KV entries are
dropped and it waits at the head of the queue, to resume by re-reading its prompt and the
tokens it has produced so far. Its stream just pauses.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelm.engines.prefill_context import (
    PREFILL_MIN_TOKENS,
    PrefillContext,
    StateFormatError,
    convert_seq_state,
    load_seq,
    save_seq,
)
from edgelm.engines.threads import ThreadController
from edgelm.types import GenerationRequest

log = logging.getLogger("edgelm.engines.batching")

# What the scheduler sends to a stream: a sampled token (with its logprob entry, if asked),
# the end of the sequence, or an exception raised while serving it.
TOKEN, DONE, ERROR = "token", "done", "error"

PlanFn = Callable[[list[int], int, list[int], bool], tuple[int, int]]

# llama.cpp's llama_token_data, for candidate arrays built with numpy (see _sample_kept).
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class PrefillPacer:
    """How many prompt tokens a mixed step may take (chunked prefill), learned as it runs.

    A step that carries prompt rows besides the running streams' next tokens delays those
    tokens by the prompt rows' cost. Unbounded (n_batch, as llama.cpp's server does), a
    1024-token prompt joining four streams stalls their tokens for its whole prefill (~5 s
    for Qwen2.5-0.5B on 2 cores). So with streams decoding, a step may cost at most ``stall``
    times a plain decode step: the prompt budget is (stall - 1) x the decode step's time over
    the marginal cost of one prompt row, both measured from the steps themselves (moving
    averages; the decode step per number of decoding rows), so it follows the model, the
    thread count and the load. With no stream decoding nobody waits: the budget is n_batch,
    and a prompt alone is read in big batches at full speed. Until a mixed step has been
    measured, a prompt row is taken to cost twice what it cost per token in prompt-only steps
    (small chunks run the matrix kernels less efficiently than big batches), and with no
    prompt cost measured at all the budget is ``first`` tokens. The decode step's time is not
    guessed: until one plain decode step has been measured the budget is 0, so the next step
    measures it.
    """

    def __init__(self, n_batch: int, stall: float = 2.0, first: int = 32, smooth: float = 0.3):
        self.n_batch = n_batch
        self.stall = stall
        self.first = min(first, n_batch)
        self.smooth = smooth
        self.decode_s: dict[int, float] = {}  # plain decode step seconds, by decoding rows
        self.row_s: float | None = None  # marginal seconds of one prompt row in a mixed step
        self.batch_row_s: float | None = None  # seconds per token in prompt-only steps

    def budget(self, decoding: int) -> int:
        """Prompt tokens the next step may take while ``decoding`` streams decode."""
        if decoding == 0:
            return self.n_batch
        base = self._decode_time(decoding)
        if base is None:
            # No plain decode step measured yet: take one (a step's delay for the prompts)
            # rather than guess. Plain steps are only measured while no prompt waits, so in a
            # burst of long prompts a guessed budget held every prompt after the first to
            # ``first``-token chunks for its whole prefill, each chunk a weight pass of its
            # own over separate KV streams (4 streams of 1k-token prompts: 9.3 output tok/s
            # with the guess, 10.5 measuring first; llama.cpp's server 10.1).
            return 0
        row = self.row_s
        if row is None and self.batch_row_s is not None:
            row = 2 * self.batch_row_s
        if row is None:
            return self.first
        allowed = int((self.stall - 1.0) * base / row)
        return max(1, min(self.n_batch, allowed))

    def observe(self, decoding: int, prompt_rows: int, seconds: float) -> None:
        """One evaluated step: ``decoding`` streams' tokens and ``prompt_rows`` prompt tokens
        took ``seconds``."""
        if seconds <= 0:
            return
        if decoding == 0:
            if prompt_rows >= 16:  # a token or two would mostly measure the step's overhead
                row = seconds / prompt_rows
                old = self.batch_row_s
                self.batch_row_s = row if old is None else self._mix(old, row)
            return
        if prompt_rows == 0:
            old = self.decode_s.get(decoding)
            self.decode_s[decoding] = seconds if old is None else self._mix(old, seconds)
            return
        base = self._decode_time(decoding)
        if base is None:
            return
        # A step can come out faster than the decode average (noise): count it as nearly free
        # rather than letting a negative cost through.
        row = max(seconds - base, 0.05 * base) / prompt_rows
        self.row_s = row if self.row_s is None else self._mix(self.row_s, row)

    def _decode_time(self, decoding: int) -> float | None:
        if decoding in self.decode_s:
            return self.decode_s[decoding]
        if not self.decode_s:
            return None
        # Not seen with this many rows yet: the nearest count measured, scaled by rows (an
        # overestimate for more rows, since decode rows share the weight reads; a step then
        # may take a few more prompt tokens than allowed until the real figure comes in).
        # (A copy: stats() asks for the budget from other threads while this one learns.)
        nearest, seconds = min(self.decode_s.copy().items(), key=lambda kv: abs(kv[0] - decoding))
        return seconds * min(decoding, nearest) / max(decoding, nearest)

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.smooth) * old + self.smooth * new

    def info(self) -> dict[str, float | None]:
        return {"prefill_row_ms": None if self.row_s is None else self.row_s * 1000}


def take_prompts(todo: list[int], budget: int) -> list[int]:
    """Prompt tokens each waiting prompt gets in a step (``todo``: tokens each still has to
    read, oldest first): in order, until ``budget`` is spent; the rest wait."""
    taken = []
    for left in todo:
        take = max(0, min(left, budget))
        if take == 0:
            break
        taken.append(take)
        budget -= take
    return taken


class ComputeLoop:
    """The one OS thread on which every llama.cpp evaluation in this process runs, and with
    it every batch scheduler's turns.

    llama.cpp parallelises with OpenMP, and libgomp keeps a team of worker threads for each
    OS thread that starts parallel work. With two models loaded (two evaluating threads, two
    teams) there are more OpenMP threads than cores, and libgomp then spins only ~100 times at
    each barrier before sleeping: Qwen2.5-1.5B decoded at 10.6 tok/s instead of 14.2 as soon
    as an idle Qwen2.5-0.5B had answered once in the same process. One evaluating thread keeps
    one team whatever is loaded; it is process-wide because the OpenMP runtime is.

    The schedulers run *on* this thread too (a turn each, in rotation) rather than on threads
    of their own that hand each llama_decode over: the two thread hand-offs per step cost
    ~0.2 ms of every token (0.6% of Qwen2.5-0.5B's decode speed on 2 cores), time in which
    neither the model nor anything else ran. Other threads' evaluations (embeddings) queue
    here as calls, run between turns.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._schedulers: list[BatchScheduler] = []
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._thread = threading.Thread(target=self._run, name="edgelm-compute", daemon=True)
        self._thread.start()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def add(self, scheduler: BatchScheduler) -> None:
        with self.cond:
            self._schedulers.append(scheduler)
            self.cond.notify()

    def remove(self, scheduler: BatchScheduler) -> None:
        """Called by the scheduler's own last turn, on this thread."""
        with self.cond:
            self._schedulers.remove(scheduler)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.on_thread():
            return fn(*args)
        future: Future[Any] = Future()
        with self.cond:
            self._calls.append((functools.partial(fn, *args), future))
            self.cond.notify()
        return future.result()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._calls and not any(s.has_work() for s in self._schedulers):
                    self.cond.wait()
                calls = list(self._calls)
                self._calls.clear()
                ready = [s for s in self._schedulers if s.has_work()]
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)
            for scheduler in ready:
                try:
                    scheduler.turn()
                except Exception:  # one model's failure must not stop the others
                    log.exception("batch scheduler turn failed")


@functools.cache
def compute_loop() -> ComputeLoop:
    """The process's :class:`ComputeLoop`, started on first use."""
    return ComputeLoop()


def evaluate(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` (llama_decode, or work made of it) on the compute loop's thread."""
    return compute_loop().run(fn, *args)


@dataclass(eq=False)
class Sampling:
    """Per-request sampling settings, turned into a llama.cpp sampler chain per sequence."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    grammar: tuple[str, str] | None = None  # (GBNF text, root rule)

    @classmethod
    def for_request(
        cls,
        request: GenerationRequest,
        min_p: float,
        repeat_penalty: float,
        seed: int,
        grammar: tuple[str, str] | None = None,
    ) -> Sampling:
        """A request's sampling settings as every local engine reads them: temperature 0 is
        greedy, and ``repeat_penalty`` (the engine's ``compute.repeat_penalty``) applies unless
        the request sets its own."""
        return cls(
            temperature=0.0 if request.temperature <= 0 else request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=min_p,
            seed=seed,
            repeat_penalty=request.repeat_penalty
            if "repeat_penalty" in request.model_fields_set
            else repeat_penalty,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            grammar=grammar,
        )

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that reshapes logits: an argmax of the row is the whole job."""
        return (
            self.temperature <= 0
            and self.grammar is None
            and self.repeat_penalty == 1.0
            and not self.frequency_penalty
            and not self.presence_penalty
        )


@dataclass(eq=False)
class Job:
    """One request inside the scheduler. Only the compute thread touches the mutable parts."""

    prompt: list[int]
    limit: int
    sampling: Sampling
    exact: bool
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    # How events reach the consumer: put on ``events`` for a consumer thread, or handed to an
    # event loop by a consumer that lives there.
    deliver: Callable[[tuple[str, Any]], object] | None = None
    # scheduler state
    slot: int = -1
    todo: list[int] = field(default_factory=list)  # tokens still to evaluate (prompt phase)
    n_past: int = 0  # tokens of this sequence in the KV cache
    last: int = -1  # sampled token not yet evaluated (decode phase)
    produced: list[int] = field(default_factory=list)
    sampler: Any = None
    clean_after: int = 0
    admitted_at: float = 0.0
    # Its prompt is being read in the flash-attention prefill context (see _side_step): then
    # ``todo`` and ``n_past`` count that context's tokens, not the slot's.
    side: bool = False

    @property
    def inputs(self) -> list[int]:
        """What the KV cache must hold before the next token: the prompt, and after a pause
        the tokens produced so far."""
        return self.prompt + self.produced

    def send(self, kind: str, value: Any = None) -> None:
        (self.deliver or self.events.put)((kind, value))


@dataclass(frozen=True, eq=False)
class FirstLogits:
    """The logits a slot's last prompt ended with, kept so that the same prompt again needs
    no evaluation at all (a retry, an evaluation run twice, n choices): its first token is
    sampled from this row, over the KV entries the slot still holds. Re-reading even the
    prompt's last token would put that one row through other kernels than the first time
    (a micro-batch of one row; with flash attention, fewer than 64 rows take another attention
    path), and a greedy answer could then differ from the first. ``exact`` says the row is
    what a fresh evaluation gives (batch-invariant mode), so exact requests may use it."""

    prompt: list[int]
    row: np.ndarray
    exact: bool


@dataclass
class Slot:
    """A sequence id and the tokens whose KV entries it holds (positions 0..len-1)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    clean: int = 0
    job: Job | None = None
    first: FirstLogits | None = None

    def first_logits(self, prompt: list[int], exact: bool) -> FirstLogits | None:
        """The kept logits if ``prompt`` is exactly the prompt they ended and the cache still
        holds it (``exact``: only logits a fresh evaluation would give)."""
        first = self.first
        if (
            first is None
            or (exact and not first.exact)
            or first.prompt != prompt
            or self.tokens[: len(prompt)] != prompt
        ):
            return None
        return first


class BatchScheduler:
    """Runs every stream of one model through a single llama.cpp context.

    ``lib`` is the ``llama_cpp`` module; ``ctx`` a context made with ``n_seq_max = slots``
    and ``kv_size`` KV cells per sequence. ``plan`` decides prefix reuse,
    ``is_eog`` says whether a token ends generation, ``logprob(row, token, top)`` builds the
    logprob entry for a token from its logits row.
    """

    def __init__(
        self,
        lib: Any,
        ctx: Any,
        vocab: Any,
        n_vocab: int,
        slots: int,
        kv_size: int,
        n_batch: int,
        plan: PlanFn,
        logprob: Callable[[np.ndarray, int, int], Any],
        mixed: bool = False,
        threads: ThreadController | None = None,
        stall: float = 2.0,
        unified: bool = False,
        prefill: Callable[[], PrefillContext] | None = None,
    ):
        self._lib = lib
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._vocab = vocab
        self._n_vocab = n_vocab
        self.kv_size = kv_size
        self.n_batch = n_batch
        self._plan = plan
        self._logprob = logprob
        self.mixed = mixed
        self.unified = unified  # one KV pool for all sequences, else a stream per sequence
        # Adapts the context's thread counts between steps (compute.threads "auto").
        self.threads = threads
        self.pacer = PrefillPacer(n_batch, stall)
        # Every ctypes call gives up the GIL, and getting it back can wait for a stream thread's
        # whole turn: under load the scheduler's per-token calls (logits row, "is this token an
        # end?") cost more in waiting than in work. So: the end tokens as a set, read once, and
        # one logits pointer per step (see _row).
        self._eog = frozenset(t for t in range(n_vocab) if lib.llama_vocab_is_eog(vocab, t))
        self._out_index: dict[int, int] = {}  # batch row -> row of llama.cpp's output logits
        self._outputs: np.ndarray | None = None
        self._view_key: tuple[int | None, int] = (None, 0)  # (address, rows) of self._view
        self._view = np.empty((0, n_vocab), dtype=np.float32)
        self.slots = [Slot(seq_id=i) for i in range(slots)]
        self._batch = lib.llama_batch_init(n_batch + slots, 0, 1)
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._compute = compute_loop()
        self._wake = self._compute.cond  # guards the queues; notifying it wakes the loop
        self._stop = False
        self._closed = threading.Event()
        self._hold = False  # no admissions while a paused sequence waits for room
        self.steps = 0  # decode steps (each advances every running sequence by a token)
        self.preemptions = 0
        self.reused_tokens = 0  # prompt tokens whose KV came from a slot's cache
        self.prefix_copies = 0  # prefixes copied from another slot
        self.first_token_reuses = 0  # prompts answered from a slot's kept logits (FirstLogits)
        self.moves = 0  # running sequences moved to a lower id (see _compact)
        # Long prompts are read in a flash-attention context and moved here (fast mode with
        # flash attention off; see edgelm.engines.prefill_context). Opened on first use.
        self._open_prefill = prefill if mixed else None
        self._prefill: PrefillContext | None = None
        self._side_job: Job | None = None
        # Sequences whose stream copy (_copy_stream) llama.cpp has queued but not yet done: it
        # copies the buffers at the start of the next llama_decode, over whatever was put in
        # the stream before; a saved state read before then would be the old contents.
        self._copying: set[int] = set()
        self._compute.add(self)

    # -- called from request threads ---------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stop:
                raise RuntimeError("the model was unloaded")
            self._pending.append(job)
            self._wake.notify()

    def poke(self) -> None:
        """Wake the loop (a stream was cancelled while it waited)."""
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the compute thread while none of this model's sequences is running
        (exclusive use of the context, e.g. for the raw speed benchmark)."""
        future: Future[Any] = Future()
        with self._wake:
            if self._stop:
                raise RuntimeError("the model was unloaded")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result()

    def stats(self) -> dict[str, int]:
        return {
            "slots": len(self.slots),
            "running": len(self._running),
            "waiting": len(self._pending),
            "decode_steps": self.steps,
            "reused_prompt_tokens": self.reused_tokens,
            "prefix_copies": self.prefix_copies,
            "first_token_reuses": self.first_token_reuses,
            "moves": self.moves,
            "preemptions": self.preemptions,
            "flash_prefill_prompts": 0 if (prefill := self._prefill) is None else prefill.prompts,
            "prompt_budget": self.pacer.budget(
                sum(1 for j in self._running if not j.todo and j.last >= 0)
            ),
        }

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._pending)

    def close(self) -> None:
        """Fail what is still queued or running and leave the compute loop; the context is
        untouched once this returns."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._closed.wait()
        self._lib.llama_batch_free(self._batch)
        if self._prefill is not None:
            self._prefill.close()
            self._prefill = None

    # -- turns on the compute loop ----------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether a turn would do anything (asked by the compute loop, holding ``_wake``)."""
        return bool(self._stop or self._pending or self._running or self._calls)

    def turn(self) -> None:
        """Admit what fits, then one step for every running sequence (or a queued exclusive
        call when none runs)."""
        with self._wake:
            if self._stop:
                self._shut_down()
                return
            call = self._calls.popleft() if self._calls and not self._running else None
            # Those that left while they waited go now, not when a slot would have come free.
            left = [job for job in self._pending if job.cancel.is_set()]
            for job in left:
                self._pending.remove(job)
                if job.produced:  # a paused sequence, which admissions were held for
                    self._hold = False
            newcomers: list[Job] = []
            while (
                self._pending
                and not self._hold
                and len(self._running) + len(newcomers) < len(self.slots)
            ):
                newcomers.append(self._pending.popleft())
        for job in left:
            self._free_sampler(job)  # a paused sequence keeps its sampler while it waits
            job.send(DONE, "cancelled")
        try:
            if call is not None:
                self._run_call(*call)
            for job in newcomers:
                self._admit(job)
            self._step()
        except Exception as exc:  # llama.cpp failing must fail the requests, not hang them
            log.exception("batch step failed")
            for job in list(self._running):
                self._finish(job, ERROR, exc)

    def _shut_down(self) -> None:
        unloaded = RuntimeError("the model was unloaded")
        for job in [*self._running, *self._pending]:
            job.send(ERROR, unloaded)
            self._free_sampler(job)
        for _fn, future in self._calls:
            future.set_exception(unloaded)
        self._compute.remove(self)
        self._closed.set()

    def _run_call(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        try:
            result: Any = fn()
        except Exception as exc:
            result = exc
        # Whatever fn did to the cache, no slot's bookkeeping can be trusted. Forgetting the
        # cells is enough (data=False): zeroing them too wrote the whole pool (~400 MB for
        # Qwen2.5-0.5B with 8 streams), ~20 ms the caller did not see and the next request on
        # this thread waited for. The caller hears back only once the context is ready again.
        self._lib.llama_memory_clear(self._mem, False)
        for slot in self.slots:
            slot.tokens, slot.clean = [], 0
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

    # -- admission and prefix reuse --------------------------------------------------------------
    def _admit(self, job: Job) -> None:
        if job.cancel.is_set():
            job.send(DONE, "cancelled")
            return
        tokens = job.inputs
        # The slot holding the longest common prefix; on a tie an idle one (no copy needed).
        source = max(self.slots, key=lambda s: (_common_prefix(s.tokens, tokens), s.job is None))
        first = source.first_logits(tokens, job.exact)
        if first is not None:  # the same prompt again: all of it is in the cache
            keep, clean_after = len(tokens), source.clean
        else:
            keep, clean_after = self._plan(source.tokens, source.clean, tokens, job.exact)
        # Always the lowest free id, so running sequences stay 0..n-1 (see _compact); a cached
        # prefix held elsewhere is copied over.
        target = next(s for s in self.slots if s.job is None)
        mem = self._mem
        if target is source:
            self._lib.llama_memory_seq_rm(mem, target.seq_id, keep, -1)
            target.tokens = target.tokens[:keep]
            target.clean = min(target.clean, keep)
        elif keep > 0:
            self._copy_stream(source, target)
            self._lib.llama_memory_seq_rm(mem, target.seq_id, keep, -1)
            self.prefix_copies += 1
            target.tokens = tokens[:keep]
            target.clean = min(source.clean, keep)
            target.first = source.first
        else:
            self._lib.llama_memory_seq_rm(mem, target.seq_id, -1, -1)
            target.tokens, target.clean = [], 0
        self.reused_tokens += keep
        target.job = job
        job.slot = target.seq_id
        job.n_past = keep
        job.todo = tokens[keep:]
        job.last = -1
        job.clean_after = clean_after
        job.admitted_at = time.perf_counter()
        if job.sampler is None:  # a resumed sequence keeps its grammar and penalty state
            job.sampler = self._make_sampler(job.sampling)
        self._running.append(job)
        if first is not None:
            self.first_token_reuses += 1
            self._sample(job, -1, first.row)

    def _make_sampler(self, s: Sampling) -> Any:
        lib = self._lib
        if s.plain_greedy:
            return None
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    self._n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
                ),
            )
        if s.grammar is not None:
            text, root = s.grammar
            grammar = lib.llama_sampler_init_grammar(
                self._vocab, text.encode("utf-8"), root.encode("utf-8")
            )
            if not grammar:  # checked when the request was made; never hand llama.cpp a NULL
                lib.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not parse the grammar")
            lib.llama_sampler_chain_add(chain, grammar)
        if s.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(s.min_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s.seed))
        return chain

    def _free_sampler(self, job: Job) -> None:
        if job.sampler is not None:
            self._lib.llama_sampler_free(job.sampler)
            job.sampler = None

    def _copy_stream(self, source: Slot, target: Slot) -> None:
        """Give ``target`` the KV entries of ``source``. In the shared pool this only tags the
        cells with one more sequence id; between separate streams llama.cpp copies the stream
        whole (at the next decode: ~50 MB for Qwen2.5-0.5B at 4096 tokens, a few ms; far
        cheaper than re-reading a prompt)."""
        self._lib.llama_memory_seq_rm(self._mem, target.seq_id, -1, -1)
        self._lib.llama_memory_seq_cp(self._mem, source.seq_id, target.seq_id, -1, -1)
        if not self.unified:
            self._copying.add(target.seq_id)

    def _compact(self) -> None:
        """Keep the running sequences on ids 0..n-1 by moving the highest one into a gap (a
        stream per sequence; in a shared pool ids do not matter).

        llama.cpp splits a batch over separate KV streams into micro-batches of *consecutive*
        sequence ids (``split_equal``), and each micro-batch reads all the weights again: a
        decode step for sequences {0, 2, 3} costs two weight passes where {0, 1, 2} costs one.
        Measured on Qwen2.5-0.5B, 2 threads: four sequences on scattered ids took 78 ms a step,
        on consecutive ones 55 ms. A gap opens when a sequence finishes while others run; moving
        one stream (a few ms, once) beats paying an extra pass at every later step. The moved
        sequence's old slot keeps its entries as an idle prefix cache.
        """
        while True:
            used = sorted(j.slot for j in self._running)
            free = next((s for s in self.slots if s.job is None), None)
            if not used or free is None or used[-1] < free.seq_id:
                return
            job = next(j for j in self._running if j.slot == used[-1])
            old = self.slots[job.slot]
            self._copy_stream(old, free)
            free.tokens, free.clean, free.job = list(old.tokens), old.clean, job
            free.first = old.first
            old.job = None
            job.slot = free.seq_id
            self.moves += 1

    # -- one step ------------------------------------------------------------------------------
    def _step(self) -> None:
        for job in list(self._running):
            if job.cancel.is_set():
                self._finish(job, DONE, "cancelled")
        if not self.unified:
            self._compact()
        if self.mixed:
            self._mixed_step()
            return
        # Newcomers' prompts first, up to n_batch tokens a step: a burst of short chats all get
        # their first token before the next decode step, while one long prompt still lets the
        # running streams advance between its chunks.
        budget = self.n_batch
        for job in sorted((j for j in self._running if j.todo), key=lambda j: j.slot):
            if budget <= 0 or job not in self._running:
                continue
            evaluated = self._prompt_chunk(job)
            if not evaluated:
                break  # the cache was full: the loop retries after making room
            budget -= evaluated
        decoding = sorted(
            (j for j in self._running if not j.todo and j.last >= 0), key=lambda j: j.slot
        )
        if decoding:
            self._decode(decoding)

    def _mixed_step(self) -> None:
        """One llama_decode for everything: each decoding sequence's next token, then
        newcomers' prompt tokens within the pacer's budget (n_batch when nothing decodes).
        The running streams do not stop for a newcomer's prompt, which is how
        llama.cpp's server keeps TTFT low under load (in a shared KV pool the prompt rows even
        share the decode rows' weight pass); the budget keeps a long prompt from stalling their
        tokens for its whole prefill."""
        # Rows in sequence-id order: over separate streams llama.cpp groups consecutive ids
        # into one micro-batch only as they come in the batch (see _compact).
        decoding = sorted(
            (j for j in self._running if not j.todo and j.last >= 0), key=lambda j: j.slot
        )
        rows = [(job.last, job.n_past, job.slot, True) for job in decoding]
        waiting = [j for j in self._running if j.todo]  # oldest first: they share the budget
        self._choose_side(waiting)
        budget = self.pacer.budget(len(decoding))
        taken = take_prompts([len(j.todo) for j in waiting], budget)
        started = time.perf_counter()
        side_job = self._side_job
        side_take = next((t for j, t in zip(waiting, taken, strict=False) if j.side), 0)
        if side_job is not None and side_take:
            self._side_step(side_job, side_take)
            if side_job in self._running and not side_job.todo:
                # Its first token is out: it decodes from now on, so the prompts read here
                # in this step are paced as for one more decoding stream, and together with
                # what the prefill context just read they stay within this step's budget.
                rest = [j for j in waiting if j is not side_job]
                left = min(budget - side_take, self.pacer.budget(len(decoding) + 1))
                taken_rest = take_prompts([len(j.todo) for j in rest], max(0, left))
                waiting, taken = rest, taken_rest
        prompts: list[tuple[Job, int, int]] = []  # job, tokens taken, row of its last token
        chosen = sorted(zip(waiting, taken, strict=False), key=lambda pair: pair[0].slot)
        for job, take in chosen:
            if job is side_job or job.side or job not in self._running:
                continue  # read in the prefill context (or back here from the next step)
            done = take == len(job.todo)
            rows.extend(
                (token, job.n_past + i, job.slot, done and i == take - 1)
                for i, token in enumerate(job.todo[:take])
            )
            prompts.append((job, take, len(rows) - 1))
        if rows:
            self._fill(rows)
            if not self._decode_or_make_room(exclude=None):
                return
        elif not side_take:
            return
        self.pacer.observe(
            len(decoding), side_take + sum(t for _, t, _ in prompts), time.perf_counter() - started
        )
        if decoding:
            self.steps += 1
        for i, job in enumerate(decoding):
            self._decoded(job, i)
        for job, take, last_row in prompts:
            self._prompted(job, take, last_row)

    # -- the flash-attention prefill context -------------------------------------------------------
    def _choose_side(self, waiting: list[Job]) -> None:
        """Send the oldest waiting prompt with at least PREFILL_MIN_TOKENS left to read to the
        prefill context, if it is free (one prompt at a time there)."""
        if self._open_prefill is None or self._side_job is not None:
            return
        job = next((j for j in waiting if len(j.todo) >= PREFILL_MIN_TOKENS), None)
        if job is None:
            return
        prefill = self._prefill
        if prefill is None:
            try:
                prefill = self._prefill = self._open_prefill()
            except Exception:  # no memory for it, say: read prompts here as before
                log.exception("could not open the flash-attention prefill context")
                self._drop_prefill()
                return
        tokens = job.inputs
        keep = prefill.start(tokens)
        slot = self.slots[job.slot]
        if job.n_past > keep + PREFILL_MIN_TOKENS // 4 and slot.seq_id not in self._copying:
            # The slot holds more of this prompt than the prefill context: move its prefix
            # over rather than read it again.
            try:
                state = convert_seq_state(
                    save_seq(self._lib, self._ctx, slot.seq_id), v_trans=False, n_stream=1
                )
            except StateFormatError:
                log.exception("cannot move KV entries to the prefill context")
                self._drop_prefill()
                return
            # Adopted or not, what the prefill context now holds has changed (a refused
            # state leaves it empty): ask again where reading starts.
            prefill.adopt(state, slot.tokens[: job.n_past])
            keep = prefill.start(tokens)
        job.side = True
        job.n_past = keep
        job.todo = tokens[keep:]
        self._side_job = job

    def _side_step(self, job: Job, take: int) -> None:
        """Read the next ``take`` tokens of the side job's prompt in the prefill context;
        after the last, move its KV entries into its slot and sample its first token."""
        prefill = self._prefill
        assert prefill is not None
        threads = self.threads.threads if self.threads is not None else 0
        status = prefill.read(job.todo[:take], threads or self._lib.llama_n_threads(self._ctx))
        if status != 0:
            # Not retried: the next step would choose the same prompt, fail the same way and
            # skip it, for ever (a compute buffer that cannot be allocated, say).
            log.warning(
                "prefill context failed (status %d): reading long prompts in the decoding "
                "context from now on",
                status,
            )
            self._side_fallback(job)
            self._drop_prefill()
            return
        job.n_past += take
        job.todo = job.todo[take:]
        if job.todo:
            return
        row = prefill.logits()
        slot = self.slots[job.slot]
        tokens = job.inputs
        n_stream = 1 if self.unified else len(self.slots)
        try:
            state = convert_seq_state(prefill.state(), v_trans=True, n_stream=n_stream)
        except StateFormatError:
            log.exception("cannot move KV entries from the prefill context")
            self._side_fallback(job)
            self._drop_prefill()
            return
        if slot.seq_id in self._copying:
            self._flush_copy(slot)
        moved = load_seq(self._lib, self._ctx, slot.seq_id, state)
        if not moved:  # no room in a shared pool: drop idle slots' caches and try once more
            for idle in self.slots:
                if idle.job is None and idle.tokens:
                    self._lib.llama_memory_seq_rm(self._mem, idle.seq_id, -1, -1)
                    idle.tokens, idle.clean = [], 0
            moved = load_seq(self._lib, self._ctx, slot.seq_id, state)
        if not moved:  # llama.cpp emptied the sequence
            slot.tokens, slot.clean = [], 0
            self._side_fallback(job)
            return
        prefill.prompts += 1
        self._side_job = None
        job.side = False
        slot.tokens, slot.clean = list(tokens), 0
        slot.first = FirstLogits(list(tokens), row, False)
        self._sample(job, -1, row)

    def _drop_prefill(self) -> None:
        """Stop using the prefill context for this model (it failed, or its states cannot be
        moved for this model's cache) and free its KV cache; prompts are read here."""
        self._open_prefill = None
        prefill, self._prefill = self._prefill, None
        if prefill is not None:
            prefill.close()

    def _flush_copy(self, slot: Slot) -> None:
        """Have llama.cpp do the stream copy queued into ``slot`` now, before its stream is
        overwritten: only a llama_decode does them, so evaluate one token there (the slot's
        contents are about to be replaced anyway)."""
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.tokens, slot.clean = [], 0
        self._fill([(0, 0, slot.seq_id, False)])
        status = evaluate(self._lib.llama_decode, self._ctx, self._batch)
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        if status not in (0, 1):
            raise RuntimeError(f"llama_decode failed with status {status}")
        self._copying.clear()

    def _side_fallback(self, job: Job) -> None:
        """Read the side job's prompt in this context after all, from what its slot holds."""
        slot = self.slots[job.slot]
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, len(slot.tokens), -1)
        self._side_job = None
        job.side = False
        job.n_past = len(slot.tokens)
        job.todo = job.inputs[job.n_past :]

    def _leave_side(self, job: Job) -> None:
        """``job`` stops running (finished, cancelled or paused): free the prefill context."""
        if job is self._side_job:
            self._side_job = None
            job.side = False
            if job.slot >= 0:  # back to counting what its slot holds (see _finish)
                job.n_past = len(self.slots[job.slot].tokens)

    def _prompt_chunk(self, job: Job) -> int:
        """Evaluate the next chunk of one newcomer's prompt; sample its first token at the end.
        Return how many tokens were evaluated (0 when the cache had no room).

        Chunks end at the same positions as in a request served alone (every n_batch tokens
        from where reuse stopped), which keeps reproducible requests bit-identical.
        """
        chunk = job.todo[: self.n_batch]
        last = len(chunk) == len(job.todo)
        self._fill(
            (token, job.n_past + i, job.slot, last and i == len(chunk) - 1)
            for i, token in enumerate(chunk)
        )
        if not self._decode_or_make_room(exclude=job):
            return 0
        self._prompted(job, len(chunk), len(chunk) - 1)
        return len(chunk)

    def _decode(self, jobs: list[Job]) -> None:
        self._fill((job.last, job.n_past, job.slot, True) for job in jobs)
        if not self._decode_or_make_room(exclude=None):
            return
        self.steps += 1
        for i, job in enumerate(jobs):
            self._decoded(job, i)

    def _fill(self, rows: Iterable[tuple[int, int, int, bool]]) -> None:
        """Write (token, position, sequence id, wants logits) rows into the batch, and note
        which row of llama.cpp's output logits each logits row becomes (see _row)."""
        batch = self._batch
        self._out_index = {}
        n = 0
        for token, pos, seq, logits in rows:
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
            if logits:
                self._out_index[n] = len(self._out_index)
            n += 1
        batch.n_tokens = n

    def _decoded(self, job: Job, row: int) -> None:
        """``job.last`` is in the cache now: sample the next token from batch row ``row``."""
        self.slots[job.slot].tokens.append(job.last)
        job.n_past += 1
        self._sample(job, row)

    def _prompted(self, job: Job, taken: int, row: int) -> None:
        """The next ``taken`` prompt tokens are in the cache; once the whole prompt is, sample
        the first token from batch row ``row``."""
        slot = self.slots[job.slot]
        slot.tokens.extend(job.todo[:taken])
        job.n_past += taken
        job.todo = job.todo[taken:]
        if not job.todo:
            slot.clean = job.clean_after
            slot.first = FirstLogits(list(slot.tokens), self._row(row).copy(), job.exact)
            self._sample(job, row)

    def _decode_or_make_room(self, exclude: Job | None) -> bool:
        """Run llama_decode on the prepared batch. On a full KV cache, free idle slots' caches;
        if there are none, pause a sequence (``exclude``, a newcomer whose prompt does not
        fit, or else the newest one) and hold admissions until a sequence finishes. Return
        whether the batch was evaluated; if not, the step is retried on the next loop."""
        self._outputs = None
        started = time.perf_counter()
        status = evaluate(self._lib.llama_decode, self._ctx, self._batch)
        if status in (0, 1):  # llama_decode did the queued stream copies before anything else
            self._copying.clear()
        if status == 0:
            if self.threads is not None and self.threads.observe(
                self._batch.n_tokens, time.perf_counter() - started
            ):
                n = self.threads.threads
                self._lib.llama_set_n_threads(self._ctx, n, n)
            return True
        if status != 1:
            raise RuntimeError(f"llama_decode failed with status {status}")
        idle = [s for s in self.slots if s.job is None and s.tokens]
        if idle:
            for slot in idle:
                self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens, slot.clean = [], 0
            return False
        if len(self._running) == 1:
            # Alone in an empty cache and still no room; check_context keeps requests within
            # the context, so this is a cache smaller than the context.
            self._finish(
                self._running[0], ERROR, RuntimeError("the KV cache cannot hold this request")
            )
            return False
        victim = exclude or max(self._running, key=lambda j: j.admitted_at)
        self._preempt(victim)
        return False

    def _preempt(self, job: Job) -> None:
        log.info("KV cache full: pausing sequence %d until another finishes", job.slot)
        self.preemptions += 1
        slot = self.slots[job.slot]
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.tokens, slot.clean, slot.job = [], 0, None
        self._running.remove(job)
        self._leave_side(job)
        job.exact = False  # it resumes from a re-read answer, not as a fresh request would
        self._hold = True
        with self._wake:
            self._pending.appendleft(job)

    def _sample(self, job: Job, index: int, logits: np.ndarray | None = None) -> None:
        """Sample ``job``'s next token from batch row ``index``, or from ``logits`` kept
        from an earlier evaluation (see :class:`FirstLogits`)."""
        row = logits
        if job.sampler is None:
            if row is None:
                row = self._row(index)
            token = int(row.argmax())
        elif row is None:
            token = self._lib.llama_sampler_sample(job.sampler, self._ctx, index)
        else:
            token = self._sample_kept(job.sampler, row)
        if token in self._eog:
            if not job.ignore_eos:
                self._finish(job, DONE, "stop")
                return
            if row is None:
                row = self._row(index)
            token = self._best_not_eog(row)
        entry = None
        if job.logprobs:
            if row is None:
                row = self._row(index)
            entry = self._logprob(row, token, job.top_logprobs)
        job.produced.append(token)
        job.last = token
        job.send(TOKEN, (token, entry))
        if len(job.produced) >= job.limit:
            self._finish(job, DONE, "length")

    def _sample_kept(self, sampler: Any, row: np.ndarray) -> int:
        """What ``llama_sampler_sample`` does with a context's logits, done with a kept row:
        the candidates in token order, the chain applied, the choice accepted (so grammar
        and penalty state advance as usual)."""
        lib = self._lib
        candidates = np.zeros(len(row), dtype=TOKEN_DATA)
        candidates["id"] = np.arange(len(row), dtype=np.int32)
        candidates["logit"] = row
        array = lib.llama_token_data_array(
            data=candidates.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
            size=len(row),
            selected=-1,
            sorted=False,
        )
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < len(row):
            raise RuntimeError("the sampler chose no token")
        token = int(candidates["id"][array.selected])
        lib.llama_sampler_accept(sampler, token)
        return token

    def _row(self, index: int) -> np.ndarray:
        """The logits of batch row ``index``: a view into llama.cpp's output buffer, which
        holds the rows that asked for logits in batch order, fetched once per step.

        The buffer stays where it is from step to step (llama.cpp reallocates it only to grow
        it), so the numpy view is rebuilt only when its address or row count changes: building
        one (``np.ctypeslib.as_array``) took a quarter of the scheduler's time per token, time
        the next decode step waited for.
        """
        if self._outputs is None:
            pointer = self._lib.llama_get_logits(self._ctx)
            key = (ctypes.cast(pointer, ctypes.c_void_p).value, len(self._out_index))
            if key != self._view_key:
                self._view = np.ctypeslib.as_array(pointer, shape=(key[1], self._n_vocab))
                self._view_key = key
            self._outputs = self._view
        return self._outputs[self._out_index[index]]

    def _best_not_eog(self, row: np.ndarray) -> int:
        """The likeliest token that does not end generation (for ``ignore_eos``)."""
        return int(next(t for t in np.argsort(row)[::-1] if int(t) not in self._eog))

    def _finish(self, job: Job, kind: str, value: Any) -> None:
        self._leave_side(job)
        if job in self._running:
            self._running.remove(job)
            self._hold = False
        slot = self.slots[job.slot] if job.slot >= 0 else None
        if slot is not None and slot.job is job:
            slot.job = None
            if len(slot.tokens) != job.n_past:  # out of step after an error: forget it
                self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens, slot.clean = [], 0
        self._free_sampler(job)
        job.send(kind, value)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def piece_reader(lib: Any, vocab: Any) -> Callable[[int], bytes]:
    """A thread-safe token → bytes function with buffers that grow (llama-cpp-python's own
    detokenize uses 32 bytes and returns nothing for longer tokens).

    Each thread gets its own buffer: streams turn tokens into text in their own threads, and a
    shared buffer let one stream read another's bytes (garbled words under concurrency).
    """
    local = threading.local()

    def piece(token: int) -> bytes:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = local.buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    return piece
