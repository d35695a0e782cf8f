"""Concurrent streams for the ONNX Runtime GenAI engine: one scheduler thread per loaded model
decodes requests that arrive together as one batched generator (one weight pass a step for all
of them), takes those groups and the single streams in turn, keeps a generator (and its KV
cache) per slot, and reuses cached prompt prefixes.

Why not the library's own continuous batching (``og.Engine``, onnxruntime-genai 0.18)? Its
dynamic path, the one that lets requests join and leave between steps, needs a model built with
PagedAttention, which the model builder makes only for CUDA (fp16/bf16) and WebGPU (fp16): the
CPU int4 models ``edgelm model convert`` builds get its *static* path instead. Measured on the
converted SmolLM2-135M: a request submitted while another runs waits until the whole running
batch has finished (exactly the 3.6 s TTFT at 4 streams this engine had when it served one
stream at a time); a finished request cannot take a next turn ("model state is no longer
resident"), so nothing is cached between turns; and it gives no logits, so no logprobs.

So the steps are ours, on ``og.Generator``: each slot owns a generator whose KV cache holds
n_ctx tokens, a turn gives every running stream one token (newcomers' prompts first, up to
n_batch tokens a turn so a long prompt cannot stall the others for long), and sampling is done
here from the generator's logits (:func:`sample`), which lets one generator serve any request
whatever its temperature, seed or penalties.

Batched groups (static batching): a generator made with ``batch_size=N`` decodes N sequences
in one weight pass, 2.3x the tokens/s of one sequence at N=4 and 2.9x at N=8 on SmolLM2 here
(3.1x at 8 on Qwen2.5-0.5B). Its limits in 0.18 shape how we use it: ``append_tokens`` may be
called once (so a group is formed from requests that arrive together, its prompts padded after
their ends in one array, :func:`right_padded`, and nobody joins later); the library samples, so
our sampler's choice for each row is fed back as logits only that token can win
(:func:`forced_logits`) to its greedy search. An idle scheduler waits BATCH_WINDOW_S for
companions of a first request (longer while they keep arriving). A late request runs as a single stream (or a group with those
that arrived with it) and takes turns with the groups. A finished or cancelled row is fed a
filler until its group ends (counted in ``batch_rows_wasted``); a group half finished whose
survivors are not reproducible requests ends early, and those go on as single streams after
evaluating their prompt and answer so far again. The answers of a group are those of the same
requests alone (greedy and seeded: tested; a row's logits come out as alone, since rows in a
multi-row step are computed as in a fresh run, see below) except past GROUP_SPAN tokens, where
a group's survivors also move to single streams. A group's prompts are evaluated in one pass
before any of its first tokens, so a burst's first tokens come when all its prompts are in.

Prompt reuse: after a request, its slot keeps the generator with the prompt and answer in its
KV cache. A newcomer takes the idle slot holding the longest usable prefix of its prompt (the
previous turn of the same conversation, or the same system prompt), ``rewind_to`` cuts the
cache there and only the rest of the prompt is evaluated. What is usable (:func:`plan_keep`)
follows from how ONNX Runtime's CPU int4 kernels behave: a row evaluated in a step of two or
more tokens comes out bit-identical however the prompt was cut into such steps, but a row
evaluated alone (a one-token step, as every generated token is) differs slightly (logits off
by up to ~0.6 on SmolLM2, enough to flip a greedy choice). So a reproducible request
(temperature 0 or a seed) keeps only the slot's *clean* prefix (rows evaluated in steps of two
or more: prompts) and evaluates at least its last two tokens, and prompts are never cut so as
to leave a one-token step; it gets exactly the answer it gets on a fresh engine. Other requests
keep the longest common prefix, the previous answer included.

Requests with ``response_format`` (llguidance, a generator parameter) get a generator of their
own with the library's sampler, dropped when they finish. They, prompts that would make a
group's one pass longer than n_batch tokens or mostly padding (:func:`pick_group`), and
newcomers with a long prefix cached in a free slot (REUSE_OVER_BATCH) are single streams.

Known limit: onnxruntime-genai's Python binding keeps the GIL for the whole forward pass
(``append_tokens`` of 300 tokens: no other Python thread ran for its 5 s), so the event loop
and the streams' text work run between steps, not during them. Running the engine in a child
process (the runner) takes that off the service's loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelm.engines.batching import DONE, ERROR, TOKEN, Job, Sampling, _common_prefix

log = logging.getLogger("edgelm.engines.onnx")

# Tokens the repeat penalty looks back over, as llama.cpp's penalty_last_n.
PENALTY_LAST_N = 64
# Candidates a nucleus (top-p) cut looks at first; the whole vocabulary is sorted only when
# they do not hold top_p of the probability.
_NUCLEUS_FIRST = 1024
# A newcomer whose prompt has at least this many tokens cached in a free slot (and at least
# half of it) takes that slot rather than joining a batched group: a group's generator starts
# empty, so it would evaluate that prefix again.
REUSE_OVER_BATCH = 64
# How long an idle scheduler waits, after a request arrives, for another to arrive with it,
# and at most in all: clients that start several streams at once reach us some milliseconds
# apart, and those that arrive together share a batched generator for their whole answers,
# while a late one would run beside them alone. A lone request waits BATCH_WINDOW_S once.
# 5 ms was tried: streams the openai client starts together arrived 0.1-3 ms apart, but the
# bench's workers, each sending its next request as its answer ends, split into smaller groups
# (4 streams: TTFT p90 1.34 s against 0.83 s, 8 streams: p50 1.84 s against 1.58 s).
BATCH_WINDOW_S = 0.015
BATCH_WINDOW_MAX_S = 0.15
# How long the scheduler thread sleeps, once a stream's first token is sent, before the next
# forward pass. onnxruntime-genai's binding holds the GIL for a whole pass, so the thread that
# delivers tokens (the event loop, the runner's relay, a caller's iterator) could take the token
# only after that pass: every first token came one decode step late (TTFT p50 99 ms against 75
# ms with this pause, Qwen2.5-0.5B int4, 2 threads, in-process). Only first tokens wait for it:
# later ones still arrive a step after they are sampled, but the same step late each time,
# which leaves the gaps between them, and the time to the last token, as they are.
FIRST_TOKEN_HANDOFF_S = 0.0005
# Tokens a batched generator is made for past its longest prompt. Making one zeroes its KV
# cache up front (0.45 s for 4 rows of 4096 tokens of SmolLM2 here, on the way to the first
# token), so a group is made for this many and its survivors go on as single streams after.
GROUP_SPAN = 256
# Padding a group's prompt pass may carry, over its real prompt tokens. Its prompts are
# right-padded to the longest and read in one pass, and no member has a first token before
# it ends: four prompts of 347, 455, 549 and 1821 tokens (Qwen2.5-0.5B int4, 2 threads) went
# through as 4 x 1821 tokens, 33 s to every first token where llama.cpp's path took 12 s at
# the median. A group is now chosen among prompts of similar length (pick_group).
GROUP_PAD_MAX = 0.25


@dataclass(eq=False)
class OnnxJob(Job):
    """One request in the ONNX scheduler. ``generator`` is set for a request with its own
    generator (structured output); the others run on a slot's reusable one."""

    generator: Any = None
    eos: frozenset[int] = frozenset()
    rng: np.random.Generator | None = None
    group: BatchGroup | None = None  # set while it decodes as a row of a batched generator


@dataclass(eq=False)
class BatchGroup:
    """Requests admitted together, decoding as the rows of one batched generator: each step is
    one weight pass for all of them. ``rows[i]`` is None once row i's request has finished (its
    row keeps being fed a filler token until the group ends)."""

    generator: Any
    rows: list[OnnxJob | None]
    room: int = 0  # tokens the generator can still take

    @property
    def live(self) -> list[OnnxJob]:
        return [job for job in self.rows if job is not None]


@dataclass(eq=False)
class GeneratorSlot:
    """A generator and the tokens its KV cache holds (positions 0..len-1)."""

    index: int
    generator: Any = None
    tokens: list[int] = field(default_factory=list)
    clean: int = 0  # leading tokens evaluated in steps of two or more (see plan_keep)
    job: OnnxJob | None = None


def plan_keep(cached: list[int], clean: int, prompt: list[int], exact: bool) -> int:
    """How many tokens of a slot's cache ``prompt`` keeps. An ``exact`` request keeps only the
    clean prefix and evaluates at least two tokens, so every row it depends on is computed as a
    fresh run computes it; others keep the longest common prefix but the last prompt token,
    whose logits the first sample needs."""
    common = _common_prefix(cached, prompt)
    if exact:
        return max(0, min(common, clean, len(prompt) - 2))
    return max(0, min(common, len(prompt) - 1))


def pick_group(lengths: list[int], pass_max: int, pad_max: float = GROUP_PAD_MAX) -> list[int]:
    """Which of the prompts (their ``lengths``) share one batched generator: the most that
    fit one pass of ``pass_max`` tokens padding included (members x the longest), with
    padding at most ``pad_max`` of their real tokens; among as many, the shortest prompts
    (their first tokens come soonest). Indices in the given order; none when under two fit.
    The others are read as single streams, in chunks, each with its first token as soon as
    its own prompt is in."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best: list[int] = []
    best_total = 0
    for start in range(len(order)):
        total = 0
        for end in range(start, len(order)):
            width = lengths[order[end]]
            total += width
            members = end - start + 1
            if members * width > pass_max:
                break  # the pass only grows from here
            fits = members * width - total <= pad_max * total
            if fits and (members > len(best) or (members == len(best) and total < best_total)):
                best, best_total = order[start : end + 1], total
    return sorted(best) if len(best) >= 2 else []


def right_padded(prompts: list[list[int]], pad: int) -> np.ndarray:
    """The prompts of a group as one (rows, longest) array, each padded after its end with the
    pad token: onnxruntime-genai 0.18 reads each row's length from its trailing pad run (left
    padding gave wrong answers on these models, right padding the same as alone)."""
    width = max(len(p) for p in prompts)
    out = np.full((len(prompts), width), pad, dtype=np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


def forced_logits(shape: tuple[int, ...], tokens: np.ndarray) -> np.ndarray:
    """Logits that make the library's greedy search pick ``tokens`` (one per row): how our own
    sampler's choices are fed to a batched generator, whose ``append_tokens`` may be called
    only once."""
    out = np.full(shape, -1e9, dtype=np.float32)
    out.reshape(shape[0], -1, shape[-1])[np.arange(shape[0]), -1, tokens] = 0.0
    return out


def chunk_size(todo: int, budget: int) -> int:
    """Prompt tokens to evaluate now, at most ``budget``, never leaving (or taking) a
    one-token step when more are due: such a row would not be clean (see plan_keep). 0: wait
    for the next turn."""
    if todo <= 1:
        return todo
    take = min(todo, budget)
    if todo - take == 1:
        take -= 1
    return take if take >= 2 else 0


def sample(
    row: np.ndarray,
    s: Sampling,
    rng: np.random.Generator | None,
    context: list[int],
    produced: list[int],
    banned: frozenset[int] = frozenset(),
) -> int:
    """The next token from one logits row: penalties, then greedy or temperature / top-k /
    top-p sampling with ``rng`` (seeded per request, so a seed reproduces an answer).
    ``context`` is what the repeat penalty looks back over, ``produced`` what the frequency and
    presence penalties count; ``banned`` tokens are never picked (end of sequence under
    ``ignore_eos``)."""
    logits = row
    if banned or s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        logits = np.array(row, dtype=np.float32)
        if s.repeat_penalty != 1.0 and context:
            seen = np.unique(np.asarray(context[-PENALTY_LAST_N:], dtype=np.int64))
            values = logits[seen]
            logits[seen] = np.where(
                values > 0, values / s.repeat_penalty, values * s.repeat_penalty
            )
        if (s.frequency_penalty or s.presence_penalty) and produced:
            ids, counts = np.unique(np.asarray(produced, dtype=np.int64), return_counts=True)
            logits[ids] -= counts * s.frequency_penalty + s.presence_penalty
        if banned:
            logits[list(banned)] = -np.inf
    if s.temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    n_vocab = logits.shape[0]
    k = s.top_k if 0 < s.top_k < n_vocab else n_vocab
    top_p = s.top_p if 0 < s.top_p < 1 else 1.0
    first = k if k < n_vocab else (min(_NUCLEUS_FIRST, n_vocab) if top_p < 1 else n_vocab)
    candidates = _best(logits, first)
    scaled = logits[candidates].astype(np.float64) / s.temperature
    if first < k:  # a nucleus cut inside the first candidates needs their share of all
        z = np.exp(logits.astype(np.float64) / s.temperature - scaled[0]).sum()
        probs = np.exp(scaled - scaled[0]) / z
        if probs.sum() < top_p:
            candidates = _best(logits, n_vocab)
            scaled = logits[candidates].astype(np.float64) / s.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if top_p < 1:
        cut = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        probs = probs[:cut] / probs[:cut].sum()
        candidates = candidates[:cut]
    if s.min_p > 0:
        keep = probs >= s.min_p * probs[0]
        probs, candidates = probs[keep] / probs[keep].sum(), candidates[keep]
    choice = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(candidates[min(choice, len(candidates) - 1)])


def _best(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest logits, largest first (ties: lower index first)."""
    if k >= logits.shape[0]:
        return np.argsort(-logits, kind="stable")
    part = np.argpartition(-logits, k - 1)[:k]
    return part[np.argsort(-logits[part], kind="stable")]


class GeneratorScheduler:
    """Runs every stream of one ONNX model, a token each in turn, on a thread of its own.

    ``new_generator()`` makes a slot's generator (KV cache for n_ctx tokens); ``logprob(row,
    token, top)`` builds a logprob entry. Events reach each stream through its job's
    ``deliver`` (the event loop) or ``events`` queue, as in :mod:`edgelm.engines.batching`.
    """

    def __init__(
        self,
        model_id: str,
        slots: int,
        n_batch: int,
        new_generator: Callable[[], Any],
        logprob: Callable[[np.ndarray, int, int], Any],
        new_batch: Callable[[int, int], Any] | None = None,
        pad_token: int = -1,
    ):
        self.slots = [GeneratorSlot(index=i) for i in range(max(1, slots))]
        self.n_batch = max(1, n_batch)
        self._new_generator = new_generator
        self._logprob = logprob
        # new_batch(rows, max_length): a batched generator (no batching without one).
        self._new_batch = new_batch if pad_token >= 0 else None
        self._pad = pad_token
        self._groups: list[BatchGroup] = []
        self._wake = threading.Condition()
        self._pending: deque[OnnxJob] = deque()
        self._running: list[OnnxJob] = []
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stop = False
        self.steps = 0  # turns that produced at least one token
        self.tokens = 0  # tokens produced, all streams
        self.reused_tokens = 0  # prompt tokens whose KV came from a slot's cache
        self.prompt_tokens = 0  # prompt tokens evaluated
        self.batched_steps = 0  # weight passes that decoded two or more streams at once
        self.batched_tokens = 0  # tokens those passes produced
        self.groups = 0  # batched groups formed
        self.largest_group = 0
        self.wasted_rows = 0  # rows of batched passes spent on finished streams
        self._first_sent = False  # a first token went out since the last forward pass
        # Every slot's generator now, on the loading thread: making one zeroes its KV cache
        # (~0.15 s for 2048 tokens of SmolLM2 here), which the first requests to arrive
        # together would otherwise wait for in turn on the scheduler's thread.
        for slot in self.slots:
            slot.generator = new_generator()
        self._thread = threading.Thread(
            target=self._run, name=f"edgelm-onnx-{model_id}", daemon=True
        )
        self._thread.start()

    # -- called from request threads and the event loop ----------------------------------
    def submit(self, job: OnnxJob) -> None:
        with self._wake:
            if self._stop:
                raise RuntimeError("the model was unloaded")
            self._pending.append(job)
            self._wake.notify()

    def poke(self) -> None:
        """Wake the thread (a stream was cancelled)."""
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler's thread while no stream runs (the raw benchmark)."""
        future: Future[Any] = Future()
        with self._wake:
            if self._stop:
                raise RuntimeError("the model was unloaded")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result()

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._pending)

    def stats(self) -> dict[str, int]:
        return {
            "slots": len(self.slots),
            "running": len(self._running),
            "waiting": len(self._pending),
            "decode_steps": self.steps,
            "generated_tokens": self.tokens,
            "prompt_tokens_evaluated": self.prompt_tokens,
            "reused_prompt_tokens": self.reused_tokens,
            "cached_slots": sum(1 for s in self.slots if s.tokens and s.job is None),
            "batched_steps": self.batched_steps,
            "batched_tokens": self.batched_tokens,
            "batch_groups": self.groups,
            "largest_batch": self.largest_group,
            "batch_rows_wasted": self.wasted_rows,
            "batch_groups_running": len(self._groups),
            "batched_streams_running": sum(len(g.live) for g in self._groups),
        }

    def close(self) -> None:
        """Fail what is queued or running, drop the generators and end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._pending or self._running or self._calls):
                    self._wake.wait()
                if self._stop:
                    break
                call = self._calls.popleft() if self._calls and not self._running else None
                # Those that left while they waited go now, not when a slot would have come free.
                left = [job for job in self._pending if job.cancel.is_set()]
                for job in left:
                    self._pending.remove(job)
                newcomers: list[OnnxJob] = []
                room = len(self.slots) - len(self._running)
                while self._pending and len(newcomers) < room:
                    newcomers.append(self._pending.popleft())
                if newcomers and not self._running and self._new_batch is not None:
                    self._gather(newcomers, room)
            for job in left:
                job.send(DONE, "cancelled")
            if call is not None:
                self._run_call(*call)
            for job in self._form_group(newcomers):
                self._admit(job)
            self._turn()
        self._shut_down()

    def _gather(self, newcomers: list[OnnxJob], room: int) -> None:
        """With the lock held and nothing running: wait for more requests to start with
        ``newcomers``, BATCH_WINDOW_S after the latest arrival, BATCH_WINDOW_MAX_S in all."""
        start = time.perf_counter()
        deadline = start + BATCH_WINDOW_S
        while len(newcomers) < room and not self._stop:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
            arrived = False
            while self._pending and len(newcomers) < room:
                newcomers.append(self._pending.popleft())
                arrived = True
            if arrived:
                deadline = min(time.perf_counter() + BATCH_WINDOW_S, start + BATCH_WINDOW_MAX_S)

    def _shut_down(self) -> None:
        unloaded = RuntimeError("the model was unloaded")
        with self._wake:
            jobs = [*self._running, *self._pending]
            self._running.clear()
            self._pending.clear()
            calls = list(self._calls)
            self._calls.clear()
        for job in jobs:
            job.send(ERROR, unloaded)
        for _fn, future in calls:
            future.set_exception(unloaded)
        for slot in self.slots:
            slot.generator, slot.tokens, slot.clean, slot.job = None, [], 0, None
        self._groups.clear()

    def _run_call(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def _groupable(self, job: OnnxJob, free: list[GeneratorSlot]) -> bool:
        """Whether ``job`` may decode as a row of a batched group: not a structured-output
        request (the library samples those), not ending in the pad token (the library would
        read it as padding), and no long prefix of it cached in a free slot (a single stream
        reuses that, and the slot is taken out of ``free`` for it; see REUSE_OVER_BATCH).
        Which of these form the group is :func:`pick_group`'s choice (one pass of at most
        n_batch tokens, little padding)."""
        prompt = job.prompt
        if job.generator is not None or job.cancel.is_set() or not prompt:
            return False
        if prompt[-1] == self._pad:
            return False
        if free:
            best = max(free, key=lambda s: plan_keep(s.tokens, s.clean, prompt, job.exact))
            reuse = plan_keep(best.tokens, best.clean, prompt, job.exact)
            if reuse >= REUSE_OVER_BATCH and 2 * reuse >= len(prompt):
                free.remove(best)
                return False
        return True

    def _form_group(self, newcomers: list[OnnxJob]) -> list[OnnxJob]:
        """Put the newcomers that may share a batched generator (two or more) into one group,
        its prompts evaluated in one pass; return those to admit as single streams. The
        group's rows take slots too (so ``parallel`` still bounds the streams), and those
        slots drop their generators while it runs: the group's KV cache takes their memory."""
        if self._new_batch is None or len(newcomers) < 2:
            return newcomers
        free = [s for s in self.slots if s.job is None]  # less those kept for reuse
        candidates = [job for job in newcomers if self._groupable(job, free)]
        chosen = pick_group([len(job.prompt) for job in candidates], self.n_batch)
        members = [candidates[i] for i in chosen]
        if len(members) < 2:
            return newcomers
        width = max(len(job.prompt) for job in members)
        span = min(GROUP_SPAN, max(job.limit for job in members))
        max_length = width + span + 1
        try:
            generator = self._new_batch(len(members), max_length)
            generator.append_tokens(right_padded([job.prompt for job in members], self._pad))
        except Exception:
            log.exception("a batched generator could not start; serving the streams singly")
            return newcomers
        self.prompt_tokens += sum(len(job.prompt) for job in members)
        group = BatchGroup(generator=generator, rows=list(members), room=span)
        free.sort(key=lambda s: len(s.tokens))  # the least useful caches go first
        now = time.perf_counter()
        for job, slot in zip(members, free, strict=False):
            slot.generator, slot.tokens, slot.clean, slot.job = None, [], 0, job
            job.slot, job.group, job.admitted_at = slot.index, group, now
            job.todo, job.n_past = [], len(job.prompt)
        self._groups.append(group)
        self.groups += 1
        self.largest_group = max(self.largest_group, len(members))
        with self._wake:
            self._running.extend(members)
        return [job for job in newcomers if job.group is None]

    def _admit(self, job: OnnxJob) -> None:
        if job.cancel.is_set():
            job.send(DONE, "cancelled")
            return
        free = [s for s in self.slots if s.job is None]
        prompt = job.inputs  # the prompt, and the answer so far for a group's survivor
        if job.generator is not None:  # its own generator: take the emptiest free slot
            slot = min(free, key=lambda s: len(s.tokens))
            slot.generator, slot.tokens, slot.clean = None, [], 0  # memory for the job's own
            job.todo, job.n_past = list(prompt), 0
        else:
            slot = max(
                free,
                key=lambda s: (
                    plan_keep(s.tokens, s.clean, prompt, job.exact),
                    s.generator is not None,
                ),
            )
            keep = plan_keep(slot.tokens, slot.clean, prompt, job.exact)
            try:
                if slot.generator is None:
                    slot.generator, slot.tokens, keep = self._new_generator(), [], 0
                elif keep < len(slot.tokens):
                    slot.generator.rewind_to(keep)
                    slot.tokens = slot.tokens[:keep]
            except Exception as exc:
                slot.generator, slot.tokens, slot.clean = None, [], 0
                job.send(ERROR, exc)
                return
            slot.clean = min(slot.clean, keep)
            self.reused_tokens += keep
            job.todo, job.n_past = list(prompt[keep:]), keep
        slot.job = job
        job.slot = slot.index
        job.admitted_at = time.perf_counter()
        with self._wake:
            self._running.append(job)

    def _turn(self) -> None:
        """Newcomers' prompts (up to n_batch tokens), then one token for every stream whose
        prompt is in."""
        for job in list(self._running):
            if job.cancel.is_set():
                self._finish(job, DONE, "cancelled")
        for group in list(self._groups):
            self._group_step(group)
        budget = self.n_batch
        for job in [j for j in self._running if j.todo and j.group is None]:
            if budget <= 0:
                break
            take = chunk_size(len(job.todo), budget)
            if take and self._guard(job, self._prompt_chunk, job, take):
                budget -= take
        produced = False
        for job in [j for j in self._running if not j.todo and j.group is None]:
            produced = self._guard(job, self._decode, job) or produced
        if produced:
            self.steps += 1

    def _group_step(self, group: BatchGroup) -> None:
        """One weight pass for every row of a group: sample each live row's token from its
        row of the logits (as a single stream's), send it, then feed the choices back through
        the library's greedy search (:func:`forced_logits`); finished rows get a filler."""
        for job in group.live:
            if job.cancel.is_set():
                self._finish(job, DONE, "cancelled")
        live = group.live
        if not live:
            self._end_group(group)
            return
        try:
            logits = group.generator.get_logits()
        except Exception as exc:
            self._fail_group(group, exc)
            return
        filler = next(t for t in range(len(group.rows) + 64) if t != self._pad and all(
            t not in job.eos for job in live
        ))
        fed = np.full(len(group.rows), filler, dtype=np.int64)
        before = self.tokens
        for i, job in enumerate(group.rows):
            if job is None:
                continue
            token = self._sample(job, logits[i, -1])
            if self._emit(job, token, logits[i, -1]):
                fed[i] = token
                job.n_past += 1
        produced = self.tokens - before
        if produced:
            self.steps += 1
            if len(group.rows) > 1:
                self.batched_steps += 1
                self.batched_tokens += produced
                self.wasted_rows += len(group.rows) - produced
        live = group.live
        if not live:
            self._end_group(group)
            return
        if group.room <= 0 or (
            2 * len(live) <= len(group.rows) and not any(job.exact for job in live)
        ):
            self._dissolve(group)
            return
        try:
            self._hand_over()
            group.generator.set_logits(forced_logits(logits.shape, fed))
            group.generator.generate_next_token()
            group.room -= 1
        except Exception as exc:
            self._fail_group(group, exc)

    def _dissolve(self, group: BatchGroup) -> None:
        """End a group that is half finished or out of room: its survivors go on as single
        streams, each evaluating its prompt and answer so far again on a slot's generator (one
        pass each, cheap next to decoding the rest of the group's longest answer with idle
        rows). A half-finished group is ended only when no survivor is reproducible: that pass
        computes the answer's rows differently from the steps that produced them, which could
        change a greedy continuation (past GROUP_SPAN tokens it may)."""
        survivors = group.live
        self._end_group(group)
        with self._wake:
            for job in survivors:
                if job in self._running:
                    self._running.remove(job)
        for job in survivors:
            self.slots[job.slot].job = None
            job.group, job.slot = None, -1
            self._admit(job)

    def _fail_group(self, group: BatchGroup, exc: Exception) -> None:
        log.exception("onnx batched step failed")
        for job in group.live:
            self._finish(job, ERROR, exc)
        self._end_group(group)

    def _end_group(self, group: BatchGroup) -> None:
        if group in self._groups:
            self._groups.remove(group)
        group.generator = None  # its KV cache is freed now
        group.rows = [None] * len(group.rows)

    def _guard(self, job: OnnxJob, fn: Callable[..., None], *args: Any) -> bool:
        """Run one step of ``job``; a failure ends that stream (and forgets its slot's cache),
        never the others."""
        try:
            fn(*args)
            return True
        except Exception as exc:
            log.exception("onnx stream step failed")
            slot = self.slots[job.slot]
            slot.generator, slot.tokens, slot.clean = None, [], 0
            self._finish(job, ERROR, exc)
            return False

    def _generator(self, job: OnnxJob) -> Any:
        return job.generator if job.generator is not None else self.slots[job.slot].generator

    def _prompt_chunk(self, job: OnnxJob, take: int) -> None:
        chunk = job.todo[:take]
        self._generator(job).append_tokens(np.asarray(chunk, dtype=np.int32))
        self.prompt_tokens += take
        job.todo = job.todo[take:]
        job.n_past += take
        if job.generator is None:
            slot = self.slots[job.slot]
            if take >= 2 and slot.clean == len(slot.tokens):
                slot.clean += take
            slot.tokens.extend(chunk)

    def _decode(self, job: OnnxJob) -> None:
        """Sample the next token from the logits in hand, send it, and (unless the answer
        is complete) evaluate it for the next one."""
        generator = self._generator(job)
        if job.generator is not None:  # the library samples (structured output)
            if generator.is_done():
                self._finish(job, DONE, "length")
                return
            row = (
                np.array(generator.get_logits()[0, -1], dtype=np.float32) if job.logprobs else None
            )
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
        else:
            row = generator.get_logits()[0, -1]
            token = self._sample(job, row)
        if not self._emit(job, token, row):
            return
        if job.generator is None:  # the library's sampler has evaluated it already
            self._hand_over()
            generator.append_tokens(np.asarray([token], dtype=np.int32))
            self.slots[job.slot].tokens.append(token)
        job.n_past += 1

    def _hand_over(self) -> None:
        """Before a forward pass: if a first token was just sent, let go of the GIL for a
        moment so the thread delivering it runs now (see FIRST_TOKEN_HANDOFF_S)."""
        if self._first_sent:
            self._first_sent = False
            time.sleep(FIRST_TOKEN_HANDOFF_S)

    @staticmethod
    def _sample(job: OnnxJob, row: np.ndarray) -> int:
        banned = job.eos if job.ignore_eos else frozenset()
        return sample(row, job.sampling, job.rng, job.prompt + job.produced, job.produced, banned)

    def _emit(self, job: OnnxJob, token: int, row: np.ndarray | None) -> bool:
        """Send ``token`` to its stream (with its logprobs from ``row``); whether the stream
        goes on (False: it ended at the end of sequence or its limit)."""
        if token in job.eos and not job.ignore_eos:
            self._finish(job, DONE, "stop")
            return False
        entry = None
        if job.logprobs and row is not None:
            entry = self._logprob(np.asarray(row, dtype=np.float32), token, job.top_logprobs)
        job.produced.append(token)
        self.tokens += 1
        job.send(TOKEN, (token, entry))
        if len(job.produced) == 1:
            self._first_sent = True
        if len(job.produced) >= job.limit:
            self._finish(job, DONE, "length")
            return False
        return True

    def _finish(self, job: OnnxJob, kind: str, value: Any) -> None:
        with self._wake:
            if job in self._running:
                self._running.remove(job)
        slot = self.slots[job.slot] if job.slot >= 0 else None
        if slot is not None and slot.job is job:
            slot.job = None
        if job.group is not None:  # its row is fed a filler until the group ends
            group, job.group = job.group, None
            group.rows = [None if j is job else j for j in group.rows]
        job.generator = None  # a structured-output generator's KV cache is freed now
        job.send(kind, value)
