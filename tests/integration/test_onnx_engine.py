"""The ONNX Runtime GenAI engine on the real tiny model (SmolLM2-135M converted to int4 ONNX),
without HTTP in between: the same checks the llama.cpp engine passes."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from edgelm.catalog import Catalog
from edgelm.engines.base import collect
from edgelm.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError
from edgelm.types import GenerationRequest, Message, ResponseFormat

# The first test may wait for the one-time conversion (tools install + convert, minutes).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def model_dir(onnx_tiny: tuple[Path, str]) -> Path:
    home, alias = onnx_tiny
    entry = Catalog.load(home).resolve(alias)
    assert entry.engine == "onnx" and entry.path is not None
    return entry.path.parent


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    from edgelm.engines.onnx import OnnxEngine

    eng = OnnxEngine(model_dir, "smollm2-135m:onnx-cpu-int4", n_ctx=1024, threads=2)
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
    # The chat template travelled from the GGUF through the conversion.
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    assert result.usage.prompt_tokens == engine.count_tokens(rendered)
    assert 0 < result.timing.ttft_s <= result.timing.total_s
    assert chunks[-1].prompt_seconds is not None
    # The text is exactly the token ids' text: nothing dropped, nothing doubled.
    assert result.text == engine.decode(result.token_ids)


def test_completion_of_a_raw_prompt(engine) -> None:
    prompt = "The capital of France is"
    result = collect(engine.stream(GenerationRequest(prompt=prompt, temperature=0, max_tokens=8)))
    assert result.text
    assert result.usage.prompt_tokens == engine.count_tokens(prompt)


class CountingTokenizer:
    """The library's tokenizer, counting calls of its per-call chat template renderer."""

    def __init__(self, inner) -> None:
        self.inner, self.renders = inner, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self.inner.apply_chat_template(*args, **kwargs)


def test_the_chat_template_is_compiled_once_and_renders_as_the_library_does(
    engine, monkeypatch
) -> None:
    # onnxruntime-genai's apply_chat_template parses the template on every call (~8 ms for
    # Qwen2.5's); the engine renders with a template compiled at load, to the same text.
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": 'c "quoted" \u00fc'},
        ],
    ]
    counting = CountingTokenizer(engine._tokenizer)
    monkeypatch.setattr(engine, "_tokenizer", counting)
    for messages in conversations:
        ours = engine.render(GenerationRequest(messages=[Message(**m) for m in messages]))
        assert counting.renders == 0
        theirs = counting.inner.apply_chat_template(
            json.dumps(messages), template_str=engine._template, add_generation_prompt=True
        )
        assert ours == str(theirs)


def test_max_tokens_gives_length_with_exactly_that_many_tokens(engine) -> None:
    result = collect(engine.stream(chat("Write a long poem.", temperature=0, max_tokens=7)))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7 == len(result.token_ids)


def test_ignore_eos_runs_past_the_end_of_the_answer_to_max_tokens(engine) -> None:
    natural = collect(engine.stream(chat("Name a colour.", temperature=0, max_tokens=200)))
    limit = natural.usage.completion_tokens + 10  # past wherever the model ended by itself
    forced = collect(
        engine.stream(chat("Name a colour.", temperature=0, max_tokens=limit, ignore_eos=True))
    )
    assert forced.finish_reason == "length"
    assert forced.usage.completion_tokens == limit == len(forced.token_ids)


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
        collect(engine.stream(chat("Hi there", temperature=0.9, max_tokens=8)))
    assert runs[0] == runs[1]
    other_seed = collect(engine.stream(seeded.model_copy(update={"seed": 43}))).text
    unseeded = {collect(engine.stream(seeded.model_copy(update={"seed": None}))).text for _ in "ab"}
    assert other_seed != runs[0][1] or len(unseeded) == 2


def test_logprobs_are_rows_of_the_real_distribution(engine) -> None:
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


def test_json_object_output_is_json(engine) -> None:
    fmt = ResponseFormat(type="json_object")
    request = chat("Reply with an empty JSON object.", response_format=fmt, temperature=0)
    result = collect(engine.stream(request.model_copy(update={"max_tokens": 48})))
    text = result.text.strip()
    assert text.startswith("{")
    if result.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("schema", [{"type": "nonsense"}, {"enum": []}])
def test_unusable_schema_is_an_invalid_request(engine, schema) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema={"schema": schema})
    with pytest.raises(InvalidRequest):
        collect(engine.stream(chat("x", response_format=fmt)))
    assert collect(engine.stream(chat("Hi", max_tokens=2))).usage.completion_tokens


def test_cancel_stops_the_stream(engine) -> None:
    cancel = threading.Event()
    chunks = []
    for chunk in engine.stream(chat("Write a long story.", temperature=0, max_tokens=200), cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens <= 4
    early = list(engine.stream(chat("Hi"), cancel))
    assert [(c.finish_reason, c.completion_tokens) for c in early] == [("cancelled", 0)]


def test_utf8_characters_are_never_broken(engine) -> None:
    prompt = "Français: café, crème brûlée, naïve. 日本語: こんにちは、元気ですか。中文: 你好"
    for request in (
        GenerationRequest(prompt=prompt, temperature=0, max_tokens=40),
        chat("Réponds en français avec des accents et un emoji 🙂.", temperature=0, max_tokens=40),
    ):
        result = collect(engine.stream(request))
        assert "\ufffd" not in result.text
        assert any(ord(ch) > 127 for ch in result.text)
        assert result.text == engine.decode(result.token_ids)


def test_context_overflow_is_refused_before_any_work(engine) -> None:
    with pytest.raises(ContextLengthExceeded):
        collect(engine.stream(chat("word " * 2000)))
    with pytest.raises(ContextLengthExceeded):
        collect(engine.stream(chat("Hi", max_tokens=5000)))


def test_raw_speed_for_the_micro_benchmark(engine) -> None:
    pp_s, tg_s = engine.raw_speed(16, 4)
    assert pp_s > 0 and tg_s > 0


def test_context_is_capped_and_memory_estimated(model_dir: Path) -> None:
    from edgelm.engines.onnx import OnnxEngine

    eng = OnnxEngine(model_dir / "genai_config.json", "tiny", n_ctx=16384, threads=1)
    try:
        assert eng.n_ctx == 8192  # SmolLM2's trained context
        assert eng.memory_bytes > (model_dir / "model.onnx.data").stat().st_size
    finally:
        eng.close()


def test_gpu_setting_falls_back_to_the_cpu(model_dir: Path) -> None:
    """Without a usable GPU provider (WebGPU is claimed by this build but not in it), the
    engine still loads, on the CPU, and says so."""
    import onnxruntime_genai as og

    from edgelm.engines.onnx import OnnxEngine, provider_candidates

    assert provider_candidates(og, True)[-1] == "cpu"
    eng = OnnxEngine(model_dir, "tiny", n_ctx=512, threads=1, enable_gpu=True)
    try:
        if not (og.is_cuda_available() or og.is_dml_available()):
            assert eng.provider == "cpu"
        assert collect(eng.stream(chat("Hi", temperature=0, max_tokens=2))).usage.completion_tokens
    finally:
        eng.close()


def test_created_from_the_catalog_variant_and_settings(onnx_tiny: tuple[Path, str]) -> None:
    from edgelm.engines import create_engine
    from edgelm.engines.onnx import OnnxEngine
    from edgelm.model_cache import ModelStore
    from edgelm.settings import ComputeSettings, Settings

    home, alias = onnx_tiny
    entry = Catalog.load(home).resolve(alias)
    settings = Settings(home=home, compute=ComputeSettings(n_ctx=512, threads=1))
    store = ModelStore(settings)
    assert store.is_cached(entry)
    eng = create_engine(entry, settings, store.path_for(entry))
    try:
        assert isinstance(eng, OnnxEngine)
        assert (eng.model_id, eng.n_ctx, eng.threads, eng.provider) == (alias, 512, 1, "cpu")
        result = collect(eng.stream(chat("Hi", temperature=0, max_tokens=3)))
        assert result.usage.completion_tokens > 0
    finally:
        eng.close()


def test_bad_model_directories_raise_model_load_error(
    model_dir: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    from edgelm.catalog import CatalogEntry
    from edgelm.engines.onnx import OnnxEngine
    from edgelm.settings import Settings

    with pytest.raises(ModelLoadError, match=r"genai_config\.json"):
        OnnxEngine(tmp_path / "missing", "missing")
    with pytest.raises(ModelLoadError, match="model convert"):
        OnnxEngine(tiny_model_path, "gguf")
    with pytest.raises(ModelLoadError, match="model convert smollm2-135m --to onnx"):
        OnnxEngine.from_entry(
            CatalogEntry(alias="smollm2-135m", engine="onnx"), Settings(), tiny_model_path
        )
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, broken / name)
    (broken / "model.onnx").write_bytes(b"not an onnx graph" * 100)
    with pytest.raises(ModelLoadError, match="could not load"):
        OnnxEngine(broken, "broken")
    (broken / "genai_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        OnnxEngine(broken, "broken")
