"""What every engine declares and provides: how it is built, what it can do, and the helpers
the local engines share (the prompt renderer and the per-token logprob)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.engines import BACKENDS, create_engine, engine_class
from edgelm.engines.base import Engine, render_prompt, token_logprob
from edgelm.engines.fake import FakeEngine
from edgelm.errors import ConfigError, InvalidRequest, Unsupported
from edgelm.pool import ModelPool
from edgelm.settings import Settings, load_settings
from edgelm.types import FunctionTool, GenerationRequest, Message


def chat(*messages: tuple[str, str], **kw) -> GenerationRequest:
    return GenerationRequest(messages=[Message(role=r, content=c) for r, c in messages], **kw)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_declares_what_it_implements(name: str) -> None:
    cls = engine_class(name)
    assert "from_entry" in vars(cls), f"{name} is built by the base class's refusal"
    assert cls.supports_embeddings == (cls.embed is not Engine.embed)
    assert cls.supports_raw_speed == (cls.raw_speed is not Engine.raw_speed)


def test_fake_is_built_through_from_entry(settings: Settings) -> None:
    entry = CatalogEntry(alias="fk", engine="fake", options={"reply": "hi there", "n_ctx": 300})
    engine = create_engine(entry, settings, None)
    assert isinstance(engine, FakeEngine)
    assert (engine.model_id, engine.n_ctx, engine.script.reply) == ("fk", 300, "hi there")


class Plain(Engine):
    name = "plain"
    model_id = "p"

    def stream(self, request, cancel=None):
        yield from ()


def test_an_engine_without_from_entry_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="plain engine cannot be built"):
        Plain.from_entry(CatalogEntry(alias="p"), settings, None)


def test_require_is_the_one_capability_check() -> None:
    plain = Plain()
    plain.require("chat")
    assert plain.supports("completions") and not plain.supports("raw_speed")
    with pytest.raises(Unsupported) as caught:
        plain.require("logprobs", " for chat")
    error = caught.value
    assert error.message == "model 'p' (plain) does not return logprobs for chat"
    assert (error.param, error.code, error.status) == ("logprobs", "unsupported", 400)
    with pytest.raises(Unsupported, match="no raw pp/tg benchmark"):
        plain.raw_speed(8, 8)
    with pytest.raises(Unsupported, match="does not serve embeddings"):
        plain.embed(["x"])
    plain.supports_logprobs = True  # an instance may declare more than its class
    plain.require("logprobs")


def test_render_prompt_shared_by_local_engines() -> None:
    seen: list[list[dict[str, str]]] = []

    def template(messages: list[dict[str, str]], tools: list[dict] | None) -> str:
        assert tools is None  # no tools offered
        seen.append(messages)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    request = chat(("developer", "be brief"), ("user", "hi"))
    assert render_prompt(request, template) == "system:be brief|user:hi"
    assert seen == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    assert render_prompt(request, None) == (
        "<|im_start|>developer\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(GenerationRequest(prompt="Once upon"), template) == "Once upon"

    def strict(messages: list[dict[str, str]], tools: list[dict] | None) -> str:
        raise ValueError("roles must alternate")

    with pytest.raises(InvalidRequest, match="rejected the messages: roles must alternate") as e:
        render_prompt(request, strict)
    assert e.value.param == "messages"


def test_render_prompt_routes_tools_by_template() -> None:
    """Tools reach a template with a tools section as data, and any other model through the
    fallback instructions in the system turn."""
    tool = FunctionTool(name="get_weather", parameters={"type": "object", "properties": {}})
    request = chat(("user", "weather?"), tools=[tool])
    got: list[list[dict] | None] = []

    def with_tools(messages: list[dict], tools: list[dict] | None) -> str:
        got.append(tools)
        return str(len(messages))

    assert render_prompt(request, with_tools, template_has_tools=True) == "1"
    assert got[-1] is not None and got[-1][0]["function"]["name"] == "get_weather"
    assert render_prompt(request, with_tools, template_has_tools=False) == "2"
    assert got[-1] is None
    fallback = render_prompt(request, None)
    assert fallback.startswith("<|im_start|>system\n") and "get_weather" in fallback


def test_token_logprob_is_the_log_softmax_of_the_row() -> None:
    row = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    pieces = {0: b"a", 1: b"b", 2: b"\xc3\xa9", 3: b"\xff"}
    entry = token_logprob(row, 2, 2, pieces.__getitem__)
    log_z = math.log(sum(math.exp(v) for v in row.tolist()))
    assert entry.token == "é" and entry.bytes == [0xC3, 0xA9]
    assert entry.logprob == pytest.approx(2.0 - log_z, abs=1e-6)
    assert [t for t, _ in entry.top] == ["b", "é"]  # most likely first
    assert entry.top[0][1] == pytest.approx(3.0 - log_z, abs=1e-6)
    assert token_logprob(row, 3, 0, pieces.__getitem__).token == "\ufffd"


class NoExtras(FakeEngine):
    """A single-stream fake engine without logprobs or embeddings."""

    supports_logprobs = False
    supports_embeddings = False


def test_pool_refuses_an_unsupported_request_before_it_queues(isolated_home: Path) -> None:
    settings = load_settings(env={"EDGELM_HOME": str(isolated_home)})
    slow = {"reply": "w " * 40, "token_delay_s": 0.25, "single_stream": True}
    catalog = Catalog([CatalogEntry(alias="a", engine="fake", options=slow)])

    def factory(entry: CatalogEntry, settings: Settings, path: Path | None) -> Engine:
        return NoExtras.from_entry(entry, settings, path)

    async def main() -> None:
        pool = ModelPool(settings, catalog, engine_factory=factory)
        busy = pool.stream("a", chat(("user", "hi")))
        await busy.__anext__()  # the only slot is taken for ~10 s
        refused = pool.stream("a", chat(("user", "hi"), logprobs=True))
        with pytest.raises(Unsupported, match="logprobs"):
            await asyncio.wait_for(refused.__anext__(), 2)
        with pytest.raises(Unsupported, match="embeddings"):
            await asyncio.wait_for(pool.embed("a", ["x"]), 2)
        assert pool.models["a"].waiting == 0
        await busy.aclose()
        await pool.close()

    asyncio.run(main())
