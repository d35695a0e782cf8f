"""The llama.cpp engine on the real tiny model (SmolLM2-135M), without HTTP in between."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path

import pytest

from edgelm.engines.base import collect
from edgelm.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError
from edgelm.types import GenerationRequest, Message, ResponseFormat

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path):
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_model_path, "smollm2-135m", n_ctx=1024, threads=2)
    yield eng
    eng.close()


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[Message(role="user", content=text)], **kw)


def test_chat_stream_chunks_carry_tokens_timing_and_usage(engine) -> None:
    request = chat("Name a colour.", temperature=0, max_tokens=16)
    chunks = list(engine.stream(request))
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    times = [c.t for c in chunks]
    assert times == sorted(times)
    assert [c.completion_tokens for c in chunks] == sorted(c.completion_tokens for c in chunks)
    result = collect(iter(chunks))
    assert result.text.strip()
    assert len(result.token_ids) == result.usage.completion_tokens > 0
    rendered = engine.render(request)
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    assert result.usage.prompt_tokens == engine.count_tokens(rendered)
    assert 0 < result.timing.ttft_s <= result.timing.total_s
    assert chunks[-1].prompt_seconds is not None
    # The text is exactly the token ids' bytes: nothing dropped, nothing doubled.
    assert result.text == b"".join(engine._piece(t) for t in result.token_ids).decode()


def test_completion_of_a_raw_prompt(engine) -> None:
    prompt = "The capital of France is"
    result = collect(engine.stream(GenerationRequest(prompt=prompt, temperature=0, max_tokens=8)))
    assert result.text
    assert result.usage.prompt_tokens == engine.count_tokens(prompt)
    assert "Paris" in result.text


def test_max_tokens_gives_length_with_exactly_that_many_tokens(engine) -> None:
    result = collect(engine.stream(chat("Write a long poem.", temperature=0, max_tokens=7)))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7 == len(result.token_ids)


def test_ignore_eos_runs_past_the_end_of_the_answer_to_max_tokens(engine) -> None:
    request = chat("Name a colour.", temperature=0, max_tokens=60)
    natural = collect(engine.stream(request))
    assert natural.finish_reason == "stop" and natural.usage.completion_tokens < 60
    forced = collect(engine.stream(request.model_copy(update={"ignore_eos": True})))
    assert forced.finish_reason == "length"
    assert forced.usage.completion_tokens == 60 == len(forced.token_ids)


def test_stop_sequence_is_never_emitted(engine) -> None:
    request = GenerationRequest(prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=30)
    free = collect(engine.stream(request)).text
    assert " 8" in free  # the model counts on; stop where it would write 8
    stopped = collect(engine.stream(request.model_copy(update={"stop": [" 8"]})))
    assert stopped.finish_reason == "stop"
    assert " 8" not in stopped.text
    assert stopped.text == free[: free.index(" 8")]


def test_temperature_zero_and_seed_are_reproducible(engine) -> None:
    greedy = chat("Tell me a short story about a cat.", temperature=0, max_tokens=24)
    seeded = chat("Tell me a short story about a cat.", temperature=0.8, seed=42, max_tokens=24)
    runs = []
    for _ in range(2):
        runs.append((collect(engine.stream(greedy)).text, collect(engine.stream(seeded)).text))
        # Something else in between, so the second run meets a different KV cache.
        collect(engine.stream(chat("Hi there", temperature=0.9, max_tokens=8)))
    assert runs[0] == runs[1]
    other_seed = collect(engine.stream(seeded.model_copy(update={"seed": 43}))).text
    unseeded = {collect(engine.stream(seeded.model_copy(update={"seed": None}))).text for _ in "ab"}
    assert other_seed != runs[0][1] or len(unseeded) == 2


def test_logprobs_are_cheap_rows_of_the_real_distribution(engine) -> None:
    request = chat("Name a fruit.", temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    result = collect(engine.stream(request))
    assert len(result.logprobs) == result.usage.completion_tokens
    for lp in result.logprobs:
        assert lp["logprob"] <= 0
        top = [value for _, value in lp["top"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert lp["top"][0][0] == lp["token"] and math.isclose(top[0], lp["logprob"], abs_tol=1e-4)
    plain = collect(engine.stream(request.model_copy(update={"logprobs": False})))
    assert plain.logprobs == [] and plain.text == result.text


def test_json_object_output_parses(engine) -> None:
    fmt = ResponseFormat(type="json_object")
    request = chat(
        "Describe a dog as JSON with keys name and breed.",
        response_format=fmt,
        temperature=0,
        max_tokens=80,
    )
    result = collect(engine.stream(request))
    assert result.finish_reason == "stop"
    assert isinstance(json.loads(result.text), dict)


def test_json_schema_output_matches_the_schema(engine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": False,
    }
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "person", "schema": schema})
    request = chat("Describe a person.", response_format=fmt, temperature=0, max_tokens=64)
    data = json.loads(collect(engine.stream(request)).text)
    assert set(data) == {"name", "age", "pet"}
    assert isinstance(data["name"], str) and len(data["name"]) <= 20
    assert isinstance(data["age"], int) and data["pet"] in ("cat", "dog")


@pytest.mark.parametrize(
    "schema",
    [{"type": "nonsense"}, {"enum": []}],  # the second one made llama.cpp segfault unchecked
)
def test_unusable_schema_is_an_invalid_request(engine, schema) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema={"schema": schema})
    with pytest.raises(InvalidRequest):
        collect(engine.stream(chat("x", response_format=fmt)))
    assert collect(engine.stream(chat("Hi", max_tokens=2))).usage.completion_tokens


def test_embeddings_are_normalised_and_rank_similar_texts_higher(engine) -> None:
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by twelve percent.",
    ]
    vectors, used = engine.embed(texts)
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1
    assert used >= sum(engine.count_tokens(t) for t in texts) - 3
    for v in vectors:
        assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    # Embedding did not disturb generation (it runs in its own context).
    again = collect(engine.stream(chat("Name a colour.", temperature=0, max_tokens=16)))
    assert again.text.strip()


def test_cancel_stops_the_stream(engine) -> None:
    cancel = threading.Event()
    chunks = []
    for chunk in engine.stream(chat("Write a long story.", temperature=0, max_tokens=200), cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens <= 4
    # A client that left while the request queued costs no prompt evaluation at all.
    early = list(engine.stream(chat("Hi"), cancel))
    assert [(c.finish_reason, c.completion_tokens) for c in early] == [("cancelled", 0)]


def test_prefix_reuse_lowers_time_to_first_token(engine) -> None:
    system = "You are a helpful assistant who answers in one short sentence. " * 30

    def ttft(question: str) -> float:
        messages = [Message(role="system", content=system), Message(role="user", content=question)]
        request = GenerationRequest(messages=messages, max_tokens=2, temperature=0)
        return collect(engine.stream(request)).timing.ttft_s

    cold = ttft("What is the capital of Italy?")
    # ~30 of ~380 prompt tokens are evaluated again; the best of three rides out a busy CPU.
    warm = min(ttft(f"What is the capital of {c}?") for c in ("Spain", "Peru", "Chad"))
    assert warm < cold / 2


def test_utf8_characters_split_across_tokens_are_never_broken(engine) -> None:
    from edgelm.engines.job_stream import utf8_text

    emoji = "🙂".encode()
    pieces = {1: emoji[:1], 2: emoji[1:3], 3: emoji[3:], 4: "é".encode()[:1], 5: b"a"}
    text, end = utf8_text(pieces.__getitem__)
    assert [text(1), text(2), text(3)] == ["", "", "🙂"]
    assert text(4) == ""
    end()  # a half character cut off at the end is dropped, not shown as U+FFFD
    assert text(5) == "a"
    prompt = "Français: café, crème brûlée, naïve. 日本語: こんにちは、元気ですか。中文: 你好"
    for request in (
        GenerationRequest(prompt=prompt, temperature=0, max_tokens=40),
        chat("Réponds en français avec des accents et un emoji 🙂.", temperature=0, max_tokens=40),
    ):
        result = collect(engine.stream(request))
        assert "\ufffd" not in result.text
        assert any(ord(ch) > 127 for ch in result.text)


def test_long_tokens_are_not_dropped(engine) -> None:
    """llama-cpp-python's own detokenize returns b'' for tokens over 32 bytes."""
    text = "def f():\n" + " " * 40 + "return 1"
    tokens = engine.tokenize_prompt(text)
    assert b"".join(engine._piece(t) for t in tokens).decode() == text


def test_context_overflow_is_refused_before_any_work(engine) -> None:
    with pytest.raises(ContextLengthExceeded):
        collect(engine.stream(chat("word " * 2000)))
    with pytest.raises(ContextLengthExceeded):
        collect(engine.stream(chat("Hi", max_tokens=5000)))


def test_context_is_capped_at_what_the_model_was_trained_for(tiny_model_path: Path) -> None:
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_model_path, "smollm2-135m", n_ctx=16384, threads=2)
    try:
        assert eng.n_ctx == 8192
        assert eng.memory_bytes > tiny_model_path.stat().st_size
    finally:
        eng.close()


def test_created_from_a_catalog_entry_and_settings(tiny_model_path: Path) -> None:
    from edgelm.catalog import CatalogEntry
    from edgelm.engines import create_engine
    from edgelm.engines.llamacpp import LlamaCppEngine, default_threads
    from edgelm.settings import ComputeSettings, Settings

    settings = Settings(compute=ComputeSettings(n_ctx=512, threads=0, n_batch=100))
    entry = CatalogEntry(alias="tiny", engine="llamacpp")
    eng = create_engine(entry, settings, tiny_model_path)
    try:
        assert isinstance(eng, LlamaCppEngine)
        assert (eng.model_id, eng.n_ctx, eng.threads) == ("tiny", 512, default_threads())
        assert eng.n_batch == 96  # rounded to whole reuse blocks
        result = collect(eng.stream(chat("Hi", temperature=0, max_tokens=3)))
        assert result.usage.completion_tokens > 0
    finally:
        eng.close()


def test_kv_type_and_batch_settings_reach_the_llama_cpp_context(tiny_model_path: Path) -> None:
    import llama_cpp

    from edgelm.catalog import CatalogEntry
    from edgelm.engines import create_engine
    from edgelm.settings import ComputeSettings, Settings

    entry = CatalogEntry(alias="tiny", engine="llamacpp")
    engines = {}
    try:
        for kv_type in ("f16", "q8_0"):
            compute = ComputeSettings(
                n_ctx=2048,
                threads=2,
                parallel=4,
                kv_type=kv_type,
                n_batch=4096,
                n_ubatch=256,
                kv_unified=kv_type == "f16",
            )
            engines[kv_type] = create_engine(entry, Settings(compute=compute), tiny_model_path)
        f16, q8 = engines["f16"], engines["q8_0"]
        params = q8._ctx.params
        assert params.type_k == params.type_v == llama_cpp.GGML_TYPE_Q8_0
        assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        assert (params.n_ubatch, q8.n_batch) == (256, 2048)  # n_batch capped at the context
        assert f16._ctx.params.type_k == llama_cpp.GGML_TYPE_F16
        # One shared pool where asked, else a KV stream per sequence (the default)
        assert f16._ctx.params.kv_unified and f16._scheduler.unified
        assert not params.kv_unified and not q8._scheduler.unified
        assert (f16.live_info()["kv_unified"], q8.live_info()["kv_unified"]) == (True, False)
        # A q8_0 cache takes 34/32 bytes a value where f16 takes 2: the estimate follows
        # (8192 cells: ~88 MB less, far above the noise of the RSS measured over a load).
        assert q8._kv_per_token * 64 == f16._kv_per_token * 34
        assert f16.memory_bytes - q8.memory_bytes > 0.8 * (f16._kv_per_token - q8._kv_per_token) * 8192
        assert q8.live_info()["kv_type"] == "q8_0"
        # flash_attn auto: the f16 context decodes without it and reads long prompts in a
        # second context with it; a q8_0 context runs it itself; "off" and batch-invariant
        # answers use no second context.
        assert (f16.flash_prefill, q8.flash_prefill) == (True, False)
        assert f16._scheduler._open_prefill is not None and q8._scheduler._open_prefill is None
        for flash, invariant in (("off", False), ("on", False), ("auto", True)):
            other = ComputeSettings(n_ctx=256, flash_attn=flash, batch_invariant=invariant)
            engines[f"{flash}{invariant}"] = create_engine(
                entry, Settings(compute=other), tiny_model_path
            )
            assert engines[f"{flash}{invariant}"].live_info()["flash_prefill"] is False
        for eng in (f16, q8):
            result = collect(eng.stream(chat("What is the capital of France?", temperature=0,
                                             max_tokens=12)))
            assert result.usage.completion_tokens > 0 and result.text.strip()
    finally:
        for eng in engines.values():
            eng.close()


def test_a_quantised_cache_without_flash_attention_is_refused(tiny_model_path: Path) -> None:
    from pydantic import ValidationError

    from edgelm.engines.llamacpp import LlamaCppEngine, flash_attention
    from edgelm.settings import ComputeSettings

    with pytest.raises(ValidationError, match="needs flash attention"):
        ComputeSettings(kv_type="q4_0", flash_attn="off")
    with pytest.raises(ModelLoadError, match="needs flash attention"):
        LlamaCppEngine(tiny_model_path, "tiny", n_ctx=256, kv_type="q8_0", flash_attn=False)
    with pytest.raises(ModelLoadError, match="unknown KV cache type"):
        LlamaCppEngine(tiny_model_path, "tiny", n_ctx=256, kv_type="q2")
    # Answers that must not depend on what else is cached cannot share one KV pool.
    with pytest.raises(ValidationError, match=r"set compute\.kv_unified to false"):
        ComputeSettings(kv_unified=True, batch_invariant=True)
    with pytest.raises(ModelLoadError, match="KV stream per sequence"):
        LlamaCppEngine(tiny_model_path, "tiny", n_ctx=256, kv_unified=True, batch_invariant=True)
    assert flash_attention("auto", "f16") is False
    assert flash_attention("on", "f16") is True
    assert flash_attention("auto", "q8_0") is True
    assert flash_attention("off", "f16") is False


def test_bad_files_raise_model_load_error(tiny_model_path: Path, tmp_path: Path) -> None:
    from edgelm.engines.llamacpp import LlamaCppEngine

    with pytest.raises(ModelLoadError, match="does not exist"):
        LlamaCppEngine(tmp_path / "missing.gguf", "missing")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaCppEngine(garbage, "garbage")
    truncated = tmp_path / "truncated.gguf"
    with tiny_model_path.open("rb") as src:
        truncated.write_bytes(src.read(1_000_000))
    with pytest.raises(ModelLoadError, match="not a readable GGUF model file: the header ends"):
        LlamaCppEngine(truncated, "truncated")


def test_reuse_plan_keeps_only_clean_aligned_prefixes_for_exact_requests() -> None:
    from edgelm.engines.llamacpp import REUSE_ALIGN as A
    from edgelm.engines.llamacpp import plan_reuse

    prompt = list(range(100))
    cached = [*prompt[:90], 999, 998]  # previous prompt shared 90 tokens, then generated ones
    # Exact: an aligned, clean prefix; everything after it is evaluated as a fresh batch would.
    assert plan_reuse(cached, 64, prompt, True, 512) == (64, 96)
    assert plan_reuse(cached, 32, prompt, True, 512) == (32, 96)
    # Sampling without a seed: the longest prefix, and the clean part shrinks to what is safe.
    assert plan_reuse(cached, 64, prompt, False, 512) == (90, 64)
    # The same prompt again: at least two tokens are evaluated (a lone row computes differently).
    again = [*prompt[: 2 * A + 1], 7, 7]
    assert plan_reuse(again, 2 * A, prompt[: 2 * A + 1], True, 512) == (A, 2 * A)
    assert plan_reuse(again, 2 * A, prompt[: 2 * A + 1], False, 512) == (2 * A, A * 2)
    assert plan_reuse([], 0, prompt, True, 512) == (0, 96)


def test_astream_on_an_event_loop_answers_as_stream_does(tiny_model_path: Path) -> None:
    """The service's path: tokens go from the compute thread straight to the event loop.
    (Batch-invariant, so that the second of two identical requests, which finds the first's
    prefix cached, is answered identically.)"""
    from edgelm.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(
        tiny_model_path, "smollm2-135m", n_ctx=1024, threads=2, batch_invariant=True
    )
    requests = [
        chat("Name a colour.", temperature=0, max_tokens=12),
        GenerationRequest(prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=30, stop=[" 8"]),
        chat("Name a fruit.", temperature=0, max_tokens=4, logprobs=True, top_logprobs=2),
        chat("Say hi.", max_tokens=0),
    ]

    async def on_loop(request: GenerationRequest) -> list:
        return [chunk async for chunk in engine.astream(request)]

    try:
        for request in requests:
            expected = list(engine.stream(request))
            chunks = asyncio.run(on_loop(request))
            fields = ("text", "token_ids", "logprobs", "finish_reason", "completion_tokens")
            assert [[getattr(c, f) for f in fields] for c in chunks] == [
                [getattr(c, f) for f in fields] for c in expected
            ]
        assert chunks[-1].finish_reason == "length" and not chunks[-1].text  # max_tokens=0
        # a long request is read off the loop; its errors still reach the consumer
        with pytest.raises(ContextLengthExceeded):
            asyncio.run(on_loop(chat("word " * 2000)))
    finally:
        engine.close()


def test_astream_left_early_ends_the_sequence(engine) -> None:
    long_answer = chat("Write a long story.", temperature=0, max_tokens=800, ignore_eos=True)

    async def main() -> None:
        stream = engine.astream(long_answer)
        async for _chunk in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if engine.batch_stats()["running"] == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    steps = engine.batch_stats()["decode_steps"]
    time.sleep(0.3)  # an answer still being written would take several steps meanwhile
    assert engine.batch_stats()["running"] == 0
    assert engine.batch_stats()["decode_steps"] == steps


def test_a_request_that_leaves_while_queued_goes_at_once(tiny_model_path: Path) -> None:
    """Cancelled while every slot is busy: it leaves the queue at the next step, not when a
    slot would have come free (the pool's deadline relies on this for queued requests)."""
    from edgelm.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_model_path, "smollm2-135m", n_ctx=1024, threads=2, parallel=1)
    busy = threading.Event()
    long_answer = chat("Write a long story.", temperature=0, max_tokens=400, ignore_eos=True)

    def occupy() -> None:
        for _chunk in eng.stream(long_answer, busy):
            pass

    async def main() -> list[str | None]:
        waiting = threading.Event()
        finishes = []

        async def queued() -> None:
            async for chunk in eng.astream(chat("Hi"), waiting):
                finishes.append(chunk.finish_reason)

        task = asyncio.create_task(queued())
        for _ in range(200):
            if eng.batch_stats()["waiting"]:
                break
            await asyncio.sleep(0.01)
        assert eng.batch_stats()["waiting"] == 1
        waiting.set()
        await asyncio.wait_for(task, 5)
        assert eng.batch_stats()["waiting"] == 0
        assert eng.batch_stats()["running"] == 1  # the long answer is still being written
        return finishes

    worker = threading.Thread(target=occupy)
    worker.start()
    try:
        for _ in range(200):
            if eng.batch_stats()["running"]:
                break
            time.sleep(0.01)
        assert asyncio.run(main()) == ["cancelled"]
    finally:
        busy.set()
        worker.join()
        eng.close()
