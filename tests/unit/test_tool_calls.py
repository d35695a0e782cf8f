"""Tool calling, ``n`` choices and content-part checks on /v1/chat/completions, through the
official ``openai`` client, raw SSE (exact delta shapes) and LangChain, on fake engines whose
scripted replies call tools the way Qwen2.5 writes calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.server.app import create_app
from edgelm.server.hybrid_model import HybridModels
from edgelm.settings import Settings

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO_CALLS = (
    CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'
    "\n</tool_call>"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def tools_catalog(isolated_home: Path) -> Catalog:
    def fake(alias: str, **options: Any) -> CatalogEntry:
        return CatalogEntry(alias=alias, engine="fake", tier="custom", options=options)

    entries = [
        fake("caller", reply="Let me check.\n" + CALL),
        fake("two-calls", reply=TWO_CALLS),
        fake("round-trip", replies=[CALL, "It is 18 degrees and sunny in Paris."]),
        fake("plain"),
        CatalogEntry(alias="big", engine="fake", tier="llm"),
        CatalogEntry(alias="small", engine="fake", tier="slm"),
    ]
    return Catalog(entries, user_file=isolated_home / "models.toml")


@pytest.fixture
def app(settings: Settings, tools_catalog: Catalog):  # type: ignore[no-untyped-def]
    return create_app(settings, catalog=tools_catalog, virtual=[HybridModels()])


@pytest.fixture
def base(app, serve_app) -> str:  # type: ignore[no-untyped-def]
    return serve_app(app)


def oai(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def sse_events(base: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=30) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_tool_call_non_streaming(base: str) -> None:
    completion = oai(base).chat.completions.create(model="caller", messages=ASK, tools=[WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_parallel_calls_and_content_null(base: str) -> None:
    body = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "two-calls", "messages": ASK, "tools": [WEATHER, TIME]},
    ).json()
    message = body["choices"][0]["message"]
    assert message["content"] is None  # OpenAI's shape: no text beside the calls
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert json.loads(message["tool_calls"][1]["function"]["arguments"]) == {
        "timezone": "Europe/Paris"
    }
    ids = {c["id"] for c in message["tool_calls"]}
    assert len(ids) == 2


def test_parallel_tool_calls_false_keeps_the_first_call(base: str) -> None:
    completion = oai(base).chat.completions.create(
        model="two-calls", messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    choice = completion.choices[0]
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert choice.finish_reason == "tool_calls"


def test_streamed_tool_call_deltas_have_openai_shapes(base: str) -> None:
    events = sse_events(
        base, {"model": "two-calls", "messages": ASK, "tools": [WEATHER, TIME], "stream": True}
    )
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    pieces = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert not any(d.get("content") for d in deltas)  # the markup never leaks as text
    heads = [p for p in pieces if "id" in p]
    assert [h["index"] for h in heads] == [0, 1]
    for head in heads:  # first piece of a call: index, id, type, name, empty arguments
        assert set(head) == {"index", "id", "type", "function"}
        assert head["type"] == "function" and head["id"].startswith("call_")
        assert head["function"]["arguments"] == ""
    assert [h["function"]["name"] for h in heads] == ["get_weather", "get_time"]
    rest = [p for p in pieces if "id" not in p]
    assert rest and all(set(p) == {"index", "function"} for p in rest)
    assert all(set(p["function"]) == {"arguments"} for p in rest)
    assert len([p for p in rest if p["index"] == 0]) > 1  # arguments arrive in fragments
    args = ["".join(p["function"]["arguments"] for p in pieces if p["index"] == i) for i in (0, 1)]
    assert json.loads(args[0]) == {"city": "Paris"}
    assert json.loads(args[1]) == {"timezone": "Europe/Paris"}
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}


def test_openai_client_accumulates_a_streamed_call(base: str) -> None:
    stream = oai(base).chat.completions.create(
        model="caller", messages=ASK, tools=[WEATHER], stream=True
    )
    content, name, arguments, finish = "", "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_full_round_trip_reaches_the_model(app, base: str) -> None:  # type: ignore[no-untyped-def]
    client = oai(base)
    first = client.chat.completions.create(model="round-trip", messages=ASK, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18, "sky": "sunny"}'},
    ]
    second = client.chat.completions.create(
        model="round-trip", messages=messages, tools=[WEATHER]
    )
    assert second.choices[0].message.content == "It is 18 degrees and sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls
    engine = app.state.edgelm.pool.models["round-trip"].engine
    prompt = engine.prompt_text(engine.requests[-1])
    # the fallback prompt: tools listed, the call written back, the result as a response
    assert '"name": "get_weather"' in prompt.split("<|im_start|>user")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response>\n{"celsius": 18, "sky": "sunny"}\n</tool_response>' in prompt


@pytest.mark.parametrize(
    ("choice", "name"),
    [("required", "get_weather"), ({"type": "function", "function": {"name": "get_time"}}, "get_time")],
)
def test_forced_tool_choice_calls_with_valid_arguments(base: str, choice, name: str) -> None:  # type: ignore[no-untyped-def]
    completion = oai(base).chat.completions.create(
        model="plain", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == name
    from edgelm.tools import validate_call
    from edgelm.types import FunctionTool

    tools = [FunctionTool(**t["function"]) for t in (WEATHER, TIME)]
    assert validate_call(tools, call.function.name, call.function.arguments) is None


def test_tool_choice_none_answers_in_text(app, base: str) -> None:  # type: ignore[no-untyped-def]
    completion = oai(base).chat.completions.create(
        model="plain", messages=ASK, tools=[WEATHER], tool_choice="none"
    )
    assert completion.choices[0].message.content.startswith("Fake answer to:")
    engine = app.state.edgelm.pool.models["plain"].engine
    assert "get_weather" not in engine.prompt_text(engine.requests[-1])


def test_n_choices(base: str) -> None:
    completion = oai(base).chat.completions.create(model="plain", messages=ASK, n=2, seed=4)
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content.startswith("Fake answer to") for c in completion.choices)
    per_choice = 5  # "Fake answer to: " + the question's words, fake tokens
    assert completion.usage.completion_tokens == 2 * (per_choice + 4)
    assert completion.usage.prompt_tokens < completion.usage.completion_tokens  # counted once


def test_n_choices_streamed(base: str) -> None:
    events = sse_events(
        base,
        {
            "model": "plain",
            "messages": ASK,
            "n": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    texts = {0: "", 1: "", 2: ""}
    finishes = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert set(texts.values()) == {"Fake answer to: What is the weather in Paris?"}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert events[-1]["usage"]["completion_tokens"] == 3 * 9


def test_image_part_to_a_text_model_is_400(base: str) -> None:
    with pytest.raises(BadRequestError) as info:
        oai(base).chat.completions.create(
            model="plain",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
        )
    error = info.value.body
    assert "'plain'" in error["message"] and "'image_url'" in error["message"]
    assert error["param"] == "messages[0].content[1]"


def test_audio_part_streamed_is_400_before_the_stream(base: str) -> None:
    response = httpx.post(
        f"{base}/v1/chat/completions",
        json={
            "model": "plain",
            "stream": True,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
                    ],
                }
            ],
        },
    )
    assert response.status_code == 400
    assert "'input_audio'" in response.json()["error"]["message"]


def test_virtual_models_refuse_tools_and_n_by_name(base: str) -> None:
    for extra, param in (({"tools": [WEATHER]}, "tools"), ({"n": 2}, "n")):
        response = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "hybrid:small+big", "messages": ASK, **extra},
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "hybrid:small+big" in error["message"]


def test_accepted_fields_that_cannot_change_the_answer(base: str) -> None:
    completion = oai(base).chat.completions.create(
        model="plain",
        messages=ASK,
        user="u1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        prompt_cache_key="abc",
        modalities=["text"],
        logit_bias={},
    )
    assert completion.choices[0].message.content.startswith("Fake answer")


# -- LangChain ---------------------------------------------------------------------------------


def test_langchain_bind_tools_invoke(base: str) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"18 degrees in {city}"

    llm = ChatOpenAI(model="caller", base_url=f"{base}/v1", api_key="unused", max_retries=0)
    message = llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_agent_loop_with_one_tool(app, base: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    calls: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return '{"celsius": 18, "sky": "sunny"}'

    llm = ChatOpenAI(
        model="round-trip", base_url=f"{base}/v1", api_key="unused", max_retries=0
    ).bind_tools([get_weather])
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    for _ in range(4):  # the loop every agent framework runs
        reply = llm.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            result = get_weather.invoke(call["args"])
            messages.append(ToolMessage(result, tool_call_id=call["id"]))
    assert calls == ["Paris"]
    assert messages[-1].content == "It is 18 degrees and sunny in Paris."
    engine = app.state.edgelm.pool.models["round-trip"].engine
    last = engine.requests[-1]
    assert [m.role for m in last.messages] == ["user", "assistant", "tool"]
    assert last.messages[2].tool_call_id == last.messages[1].tool_calls[0]["id"]


def test_langchain_streams_a_tool_call(base: str) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="caller", base_url=f"{base}/v1", api_key="unused", max_retries=0)
    merged = None
    for piece in llm.bind_tools([WEATHER]).stream("Weather in Paris?"):
        merged = piece if merged is None else merged + piece
    assert merged is not None
    assert merged.tool_calls[0]["name"] == "get_weather"
    assert merged.tool_calls[0]["args"] == {"city": "Paris"}


def test_tool_use_eval_scores_through_the_service(base: str) -> None:
    from edgelm.evals.tool_calls import load_set, run, summary

    tools, items = load_set()
    assert len(items) == 20 and {t["function"]["name"] for t in tools} == {
        "get_weather", "calculate", "search_web", "convert_currency"
    }
    # the fake engine never calls with "auto" and, forced, calls the first function with the
    # smallest valid arguments: right only for the weather prompts, none with the right city
    results = run(f"{base}/v1", "plain")
    figures = summary(results)
    assert figures["auto"]["n"] == 20 and figures["auto"]["correct"] == 0.25
    assert figures["auto"]["no_tool_prompts_correct"] == 1.0
    assert figures["required"]["n"] == 15
    assert figures["required"]["tool_prompts_correct"] == round(4 / 15, 3)
    assert figures["required"]["tool_prompts_args_match"] == 0.0


def test_rag_models_refuse_tools_and_media_by_name(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/chat/completions",
        json={"model": "rag:inline", "messages": ASK, "tools": [WEATHER]},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools"
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {}}]
    response = client.post(
        "/v1/chat/completions",
        json={"model": "rag:inline", "messages": [{"role": "user", "content": parts}]},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1]" and "rag:inline" in error["message"]
