"""Tool calling on the real tiny model (SmolLM2-135M, whose template has no tools section, so
the fallback prompt is used): with ``tool_choice`` required or named, the grammar built from
the functions' schemas makes every answer a call with schema-valid arguments."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from edgelm.tools import validate_call
from edgelm.types import FunctionTool

TINY = "smollm2-135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": 60}},
            "required": ["expression"],
        },
    },
}
TOOLS = [FunctionTool(**t["function"]) for t in (WEATHER, CALC)]


@pytest.fixture(scope="module")
def client(live_service: str) -> OpenAI:
    return OpenAI(base_url=f"{live_service}/v1", api_key="not-needed", max_retries=0)


@pytest.mark.parametrize(
    "prompt", ["What's the weather in Tokyo?", "What is 12 times 7?", "Tell me a joke."]
)
def test_required_gives_schema_valid_calls(client: OpenAI, prompt: str) -> None:
    response = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": prompt}],
        tools=[WEATHER, CALC],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert validate_call(TOOLS, call.function.name, call.function.arguments) is None
    assert call.id.startswith("call_")


def test_named_function_streamed(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "How warm is it in Oslo, in celsius?"}],
        tools=[WEATHER, CALC],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,  # else this tiny model writes calls until max_tokens
        temperature=0.7,
        seed=11,
        max_tokens=120,
        stream=True,
    )
    names, arguments, finish, content = [], "", None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.index == len(names):  # a call's first delta: its id and name
                assert call.id and call.function.name
                names.append(call.function.name)
            else:
                assert call.id is None and call.function.name is None
            if call.index == 0:
                arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert names == ["get_weather"]
    assert validate_call(TOOLS, "get_weather", arguments) is None
    assert json.loads(arguments)["unit"] in ("celsius", "fahrenheit")


def test_round_trip_through_the_template(client: OpenAI) -> None:
    """A tool result goes back into the conversation and the model answers in text."""
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    ]
    response = client.chat.completions.create(
        model=TINY,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    choice = response.choices[0]
    assert not choice.message.tool_calls and choice.message.content
    assert response.usage.prompt_tokens > 40  # the call and its result were in the prompt


def test_n_choices_on_the_real_engine(client: OpenAI) -> None:
    ask = {
        "model": TINY,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "temperature": 1.0,
        "seed": 5,
        "max_tokens": 12,
    }
    one = client.chat.completions.create(**ask)
    response = client.chat.completions.create(n=3, **ask)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content for c in response.choices)
    assert response.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert 3 <= response.usage.completion_tokens <= 36


def test_n_choices_share_the_prompts_kv_cache(
    tiny_model_path, tmp_path_factory: pytest.TempPathFactory
) -> None:  # type: ignore[no-untyped-def]
    """The other choices start once the first has read the prompt, and copy its KV cache."""
    from fastapi.testclient import TestClient

    from edgelm.catalog import Catalog
    from edgelm.server.app import create_app
    from tests.integration.conftest import settings_for

    home = tmp_path_factory.mktemp("n-home")
    settings = settings_for(home, **{"compute.n_ctx": 1024, "compute.parallel": 4})
    app = create_app(settings, catalog=Catalog.load(home))
    question = "Describe the sea in one sentence. " * 4
    with TestClient(app) as http:
        body = http.post(
            "/v1/chat/completions",
            json={
                "model": TINY,
                "messages": [{"role": "user", "content": question}],
                "n": 3,
                "temperature": 0.8,
                "seed": 1,
                "max_tokens": 8,
            },
        ).json()
        stats = app.state.edgelm.pool.models[TINY].engine.live_info()  # runs in a runner
    assert len(body["choices"]) == 3
    prompt = body["usage"]["prompt_tokens"]
    assert stats["prefix_copies"] == 2
    assert stats["reused_prompt_tokens"] >= 2 * (prompt - 1)
