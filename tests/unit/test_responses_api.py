"""/v1/responses through the official ``openai`` client on fake engines: plain, streamed with
its semantic events, function calls and their outputs, and chained by previous_response_id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.server.app import create_app
from edgelm.settings import Settings

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def app(settings: Settings, isolated_home: Path):  # type: ignore[no-untyped-def]
    def fake(alias: str, **options: Any) -> CatalogEntry:
        return CatalogEntry(alias=alias, engine="fake", tier="custom", options=options)

    catalog = Catalog(
        [fake("plain"), fake("agent", replies=[CALL, "It is 18 degrees in Paris."])],
        user_file=isolated_home / "models.toml",
    )
    return create_app(settings, catalog=catalog)


@pytest.fixture
def client(app, serve_app) -> OpenAI:  # type: ignore[no-untyped-def]
    return OpenAI(base_url=f"{serve_app(app)}/v1", api_key="unused", max_retries=0)


def engine(app, name: str):  # type: ignore[no-untyped-def]
    return app.state.edgelm.pool.models[name].engine


def test_plain_input(app, client: OpenAI) -> None:  # type: ignore[no-untyped-def]
    response = client.responses.create(
        model="plain", input="Say hi", instructions="Be brief.", max_output_tokens=50
    )
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Fake answer to: Say hi"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant"
    assert response.usage.output_tokens == 5 and response.usage.input_tokens > 0
    sent = engine(app, "plain").requests[-1]
    assert [m.role for m in sent.messages] == ["system", "user"]
    assert sent.max_tokens == 50


def test_streamed_events(client: OpenAI) -> None:
    events = list(client.responses.create(model="plain", input="Say hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Fake answer to: Say hi"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == text


def test_function_call_round_trip_and_chaining(app, client: OpenAI) -> None:  # type: ignore[no-untyped-def]
    first = client.responses.create(model="agent", input="Weather in Paris?", tools=[WEATHER])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_")
    second = client.responses.create(
        model="agent",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],
    )
    assert second.output_text == "It is 18 degrees in Paris."
    sent = engine(app, "agent").requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[1].tool_calls[0]["id"] == call.call_id
    assert sent.messages[2].tool_call_id == call.call_id
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_streamed_function_call_events(client: OpenAI) -> None:
    events = list(
        client.responses.create(model="agent", input="Weather?", tools=[WEATHER], stream=True)
    )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(args) == {"city": "Paris"} and done.arguments == args
    assert kinds[-1] == "response.completed"


def test_errors_name_the_field(client: OpenAI, app, serve_app) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFoundError):
        client.responses.create(model="plain", input="x", previous_response_id="resp_nope")
    base = str(client.base_url).rstrip("/")
    for payload, param in (
        ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning.effort"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "messages[0].content[0]",
        ),
        ({"input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
        ({"input": "x", "text": {"format": "json"}}, "text.format"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": "x", "max_tool_calls": 2}, "max_tool_calls"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "top_logprobs": 3}, "top_logprobs"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "x", "reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ):
        response = httpx.post(f"{base}/responses", json={"model": "plain", **payload})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_openai_agents_sdk_runs_an_agent_with_one_tool(app, serve_app) -> None:  # type: ignore[no-untyped-def]
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "18C and sunny"

    client = AsyncOpenAI(base_url=f"{serve_app(app)}/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer weather questions with the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="agent", openai_client=client),
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?")
    assert calls == ["Paris"]
    assert result.final_output == "It is 18 degrees in Paris."
    sent = engine(app, "agent").requests[-1]
    assert sent.messages[-1].role == "tool" and sent.messages[-1].text() == "18C and sunny"


def test_store_keeps_responses_for_the_retention_time(tmp_path: Path) -> None:
    from edgelm.errors import ModelNotFound
    from edgelm.server.responses_routes import ResponseStore
    from edgelm.types import Message

    store = ResponseStore(tmp_path / "r.sqlite", retention_s=3600)
    store.save("resp_a", [Message(role="user", content="hi")], {"id": "resp_a"})
    assert store.conversation("resp_a")[0].text() == "hi"
    expired = ResponseStore(tmp_path / "r.sqlite", retention_s=-1)  # everything is too old
    expired.save("resp_b", [Message(role="user", content="yo")], {"id": "resp_b"})
    with pytest.raises(ModelNotFound) as info:
        store.conversation("resp_a")
    assert info.value.param == "previous_response_id"
    assert store.body("resp_b") == {"id": "resp_b"}


def test_calls_ending_and_starting_in_one_chunk_close_with_their_own_ids() -> None:
    """One chunk holding the end of call 0 and the start of call 1: call 0's done events
    carry call 0's id and name, not the next call's."""
    import asyncio

    from edgelm.engines.base import Fold
    from edgelm.server.openai_routes import OpenedAnswer
    from edgelm.server.responses_routes import _events
    from edgelm.types import Chunk, ToolCallDelta

    async def stream():  # type: ignore[no-untyped-def]
        yield Chunk("", tool_calls=[ToolCallDelta(0, id="call_a", name="first", arguments='{"x"')])
        yield Chunk(
            "",
            tool_calls=[
                ToolCallDelta(0, arguments=": 1}"),
                ToolCallDelta(1, id="call_b", name="second", arguments='{"y": 2}'),
            ],
            finish_reason="tool_calls",
        )

    fold, fc_ids = Fold(), []  # type: ignore[var-annotated]

    async def collect() -> bytes:
        opened = OpenedAnswer([stream()], None, 0.0)
        events = _events(opened, fold, fc_ids, "msg_x", lambda s: {"status": s}, lambda: {"status": "completed"})
        return b"".join([part async for part in events])

    raw = asyncio.run(collect()).decode()
    payloads = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    done = [p["item"] for p in payloads if p["type"] == "response.output_item.done"]
    assert [(d["call_id"], d["name"], d["arguments"]) for d in done] == [
        ("call_a", "first", '{"x": 1}'),
        ("call_b", "second", '{"y": 2}'),
    ]
    assert [d["id"] for d in done] == fc_ids
    args_done = [p for p in payloads if p["type"] == "response.function_call_arguments.done"]
    assert [p["item_id"] for p in args_done] == fc_ids


def test_no_op_fields_and_off_values_are_accepted(client: OpenAI) -> None:
    base = str(client.base_url).rstrip("/")
    payload = {
        "model": "plain",
        "input": "Say hi",
        "user": "u1",
        "metadata": {"k": "v"},
        "service_tier": "auto",
        "store": False,
        "parallel_tool_calls": True,
        "safety_identifier": "s",
        "prompt_cache_key": "c",
        "include": [],
        "truncation": "disabled",
        "top_logprobs": 0,
        "background": False,
        "conversation": None,
        "prompt": None,
        "max_tool_calls": None,
        "reasoning": {"effort": None, "summary": None},
    }
    response = httpx.post(f"{base}/responses", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["content"][0]["text"] == "Fake answer to: Say hi"


@pytest.mark.parametrize("n", [1, 2])
def test_closing_choice_chunks_closes_every_engine_stream(n: int) -> None:
    """A request abandoned midway (client gone, non-streaming path cancelled) stops its
    engine: closing the merged iterator closes each choice's stream, one choice or several."""
    import asyncio

    from edgelm.server.openai_routes import OpenedAnswer, choice_chunks
    from edgelm.types import Chunk

    closed: list[int] = []

    async def stream(i: int):  # type: ignore[no-untyped-def]
        try:
            for k in range(1000):
                yield Chunk(f"{i}:{k} ")
                await asyncio.sleep(0)
        finally:
            closed.append(i)

    async def abandon() -> list[int]:
        streams = [stream(i) for i in range(n)]
        first = await anext(streams[0])
        merged = choice_chunks(OpenedAnswer(streams, first, 0.0))
        async for _index, chunk in merged:
            if chunk.text.endswith(":2 "):
                break
        await merged.aclose()
        return sorted(closed)  # before asyncio.run's shutdown finalizes leftover generators

    assert asyncio.run(abandon()) == list(range(n))


def test_a_chain_is_held_to_the_message_limit(app, client: OpenAI) -> None:  # type: ignore[no-untyped-def]
    """``service.max_messages`` bounds a conversation however it grows: a Responses chain
    through previous_response_id counts its stored turns too."""
    app.state.edgelm.settings.service.max_messages = 3
    first = client.responses.create(model="plain", input="one")  # stored: user, assistant
    second = client.responses.create(model="plain", input="two", previous_response_id=first.id)
    assert second.status == "completed"  # 3 messages reached the model
    with pytest.raises(BadRequestError) as caught:
        client.responses.create(model="plain", input="three", previous_response_id=second.id)
    assert caught.value.body["param"] == "input" and "max_messages" in caught.value.body["message"]
