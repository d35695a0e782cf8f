"""The onnx engine's choice of execution provider, with onnxruntime-genai replaced by a fake:
GPU providers are tried only when enabled and really offered, and a failing one falls back
to the CPU; and the engine's own parts of generation (template, logprobs) on a fake generator.
(Generation itself is tested on the real model in tests/integration.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgelm.engines import onnx
from edgelm.engines.base import collect
from edgelm.engines.onnx import OnnxEngine, provider_candidates
from edgelm.errors import MissingExtra, ModelLoadError
from edgelm.types import GenerationRequest, Message


def fake_og(claims: dict[str, bool], broken: set[str] = frozenset()) -> Any:  # type: ignore[assignment]
    """A stand-in for the onnxruntime_genai module that records what was opened how."""
    opened: list[str] = []

    class Config:
        def __init__(self, path: str):
            self.path, self.providers, self.overlays = path, [], []

        def clear_providers(self) -> None:
            self.providers = []

        def append_provider(self, name: str) -> None:
            self.providers.append(name)

        def overlay(self, text: str) -> None:
            self.overlays.append(json.loads(text))

    def model(config: Config) -> SimpleNamespace:
        provider = config.providers[0] if config.providers else "cpu"
        opened.append(provider)
        if provider in broken:
            raise RuntimeError(f"{provider} execution provider is not supported in this build")
        return SimpleNamespace(config=config)

    def probe(name: str):
        def check() -> bool:
            if name == "explodes":
                raise RuntimeError("probe failed")
            return claims.get(name, False)

        return check

    return SimpleNamespace(
        Config=Config,
        Model=model,
        Tokenizer=lambda m: SimpleNamespace(eos_token_ids=[2]),
        # The engine makes each slot's generator when it loads.
        GeneratorParams=lambda m: SimpleNamespace(set_search_options=lambda **kw: None),
        Generator=lambda m, params: SimpleNamespace(),
        is_cuda_available=probe("cuda"),
        is_dml_available=probe("dml"),
        is_webgpu_available=probe("WebGPU"),
        opened=opened,
    )


def test_candidates_follow_the_setting_and_the_runtime() -> None:
    og = fake_og({"cuda": True, "WebGPU": True})
    assert provider_candidates(og, enable_gpu=False) == ["cpu"]
    assert provider_candidates(og, enable_gpu=True) == ["cuda", "WebGPU", "cpu"]
    # A claim the runtime itself cannot back (the Linux CPU wheel claims WebGPU) is dropped.
    cpu_runtime = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert provider_candidates(og, True, cpu_runtime) == ["cpu"]
    assert provider_candidates(og, True, ["CUDAExecutionProvider"]) == ["cuda", "cpu"]
    exploding = fake_og({})
    exploding.is_cuda_available = lambda: 1 / 0
    assert provider_candidates(exploding, True) == ["cpu"]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    config = {
        "model": {
            "context_length": 2048,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "vocab_size": 100,
            "decoder": {
                "num_hidden_layers": 2,
                "num_key_value_heads": 2,
                "head_size": 8,
            },
        }
    }
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 1000)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    return tmp_path


def test_enabled_gpu_falls_back_to_the_cpu_when_a_provider_fails(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    og = fake_og({"cuda": True, "dml": True}, broken={"cuda"})
    monkeypatch.setattr(onnx, "import_genai", lambda: og)
    monkeypatch.setattr(onnx, "runtime_providers", lambda: None)
    engine = OnnxEngine(model_dir, "m", n_ctx=4096, threads=3, enable_gpu=True)
    assert engine.provider == "dml" and og.opened == ["cuda", "dml"]
    options = engine._model.config.overlays[0]["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 3
    assert options["session.intra_op.allow_spinning"] == "0"
    assert engine.n_ctx == 2048  # capped at the trained context
    assert engine.memory_bytes >= 2 * 2 * 2 * 8 * 4 * 2048  # at least a full fp32 KV cache
    assert engine._template == "{{ x }}"

    og = fake_og({"cuda": True}, broken={"cuda"})
    monkeypatch.setattr(onnx, "import_genai", lambda: og)
    assert OnnxEngine(model_dir, "m", enable_gpu=True).provider == "cpu"
    og = fake_og({"cuda": True})
    monkeypatch.setattr(onnx, "import_genai", lambda: og)
    assert OnnxEngine(model_dir, "m", enable_gpu=False).provider == "cpu"
    assert og.opened == ["cpu"]  # never touched the GPU when not asked to


def test_a_model_no_provider_opens_is_a_load_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx, "import_genai", lambda: fake_og({}, broken={"cpu"}))
    with pytest.raises(ModelLoadError, match="model convert"):
        OnnxEngine(model_dir, "m")


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_genai(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime_genai":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    with pytest.raises(MissingExtra, match=r"edgelm\[onnx\]"):
        onnx.import_genai()


def test_system_info_lists_the_usable_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgelm import sysinfo

    assert sysinfo.onnx_genai_providers()[-1:] in (["cpu"], [])
    assert "onnx_genai_providers" in sysinfo.system_info(probe_llama_cpp=False)


PIECES = {0: "<s>", 1: "Hi", 2: "</s>", 3: " there"}


def generating_og(answer: list[int], rows: list[list[float]]) -> Any:
    """``fake_og`` that also generates: each token evaluated (appended by the engine's own
    sampler, or ``answer`` token by token through the library's) moves on to the next logits
    row, which the generator overwrites in place (as the real one reuses its buffer)."""
    og = fake_og({})
    applied: list[tuple[list[dict[str, str]], str]] = []

    class Tokenizer:
        eos_token_ids = (2,)

        def __init__(self, model: Any):
            pass

        def encode(self, text: str) -> list[int]:
            og.encoded.append(text)
            return [1] * len(text.split())

        def decode(self, tokens: Any) -> str:
            return "".join(PIECES[int(t)] for t in tokens)

        def create_stream(self) -> Any:
            return SimpleNamespace(decode=lambda t: PIECES[int(t)])

        def apply_chat_template(self, messages: str, template_str: str, **kw: Any) -> str:
            applied.append((json.loads(messages), template_str))
            return "<prompt>"

    class Generator:
        def __init__(self, model: Any, params: Any):
            self.step = 0
            self.prompted = False
            self.logits = np.array([[rows[0]]], dtype=np.float32)

        def append_tokens(self, tokens: Any) -> None:
            if self.prompted:  # a sampled token: the logits of the next position
                self.generate_next_token()
            self.prompted = True

        def rewind_to(self, n: int) -> None:
            self.prompted = n > 0

        def is_done(self) -> bool:
            return self.step >= len(answer)

        def get_logits(self) -> np.ndarray:
            return self.logits

        def generate_next_token(self) -> None:
            self.step += 1
            self.logits[0, -1] = rows[min(self.step, len(rows) - 1)]

        def get_next_tokens(self) -> list[int]:
            return [answer[self.step - 1]]

    og.Tokenizer = Tokenizer
    og.Generator = Generator
    og.GeneratorParams = lambda model: SimpleNamespace(set_search_options=lambda **kw: None)
    og.applied = applied
    og.encoded = []
    return og


def test_a_template_jinja2_cannot_compile_is_left_to_the_library(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    og = generating_og([1, 2], [[0.0, 2.0, 1.0, 0.0]])
    monkeypatch.setattr(onnx, "import_genai", lambda: og)
    engine = OnnxEngine(model_dir, "m")
    engine.render(GenerationRequest(messages=[Message(role="user", content="hi")]))
    assert og.applied == [([{"role": "user", "content": "hi"}], "{% if %}")]


def test_generation_through_the_shared_renderer_and_logprob(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's own parts around the library: the chat template through the renderer the
    llama.cpp engine shares (compiled once with Jinja2, not the library's per-call renderer),
    and logprobs from the row the sampler used, not the next one."""
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}})
    )
    rows = [[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 5.0, 0.0]]
    og = generating_og([1, 3, 2], rows)
    monkeypatch.setattr(onnx, "import_genai", lambda: og)
    engine = OnnxEngine(model_dir, "m")
    request = GenerationRequest(
        messages=[
            Message(role="developer", content="be brief"),
            Message(role="user", content="hi"),
        ],
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    result = collect(engine.stream(request))
    assert og.encoded == ["<s>[system] be brief [user] hi "] and og.applied == []
    assert result.text == "Hi there" and result.finish_reason == "stop"
    first, second = result.logprobs
    log_z = math.log(sum(math.exp(v) for v in rows[0]))
    assert first["token"] == "Hi" and first["logprob"] == pytest.approx(2.0 - log_z, abs=1e-6)
    assert [t for t, _ in first["top"]] == ["Hi", "</s>"]
    assert second["token"] == " there" and second["top"][0][0] == " there"
