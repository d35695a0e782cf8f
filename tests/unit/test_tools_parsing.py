"""edgelm.tools: the streaming parser, the prompts for templates with and without tools, the
forced-call grammar, and the remote engine's pass-through of tools."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from edgelm.engines.base import check_capabilities, collect
from edgelm.engines.remote import RemoteEngine
from edgelm.errors import Unsupported
from edgelm.tools import (
    ToolCallParser,
    call_schema,
    chat_messages,
    example_arguments,
    fallback_messages,
    grammar_schema,
    parse_tool_calls,
    validate_call,
    wrap_call_grammar,
)
from edgelm.types import Chunk, FunctionTool, GenerationRequest, Message

WEATHER = FunctionTool(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
TEXT = (
    "Checking both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "opts": {"days": 2}}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"arguments": {"x": 1}, "name": "calc"}\n</tool_call>'
)


def run(text: str, step: int) -> tuple[str, dict[int, list[str]], int]:
    parser = ToolCallParser(ids=lambda: "call_x")
    content, calls, pieces = "", {}, 0
    for i in range(0, len(text), step):
        c, deltas = parser.push(text[i : i + step])
        content += c
        for d in deltas:
            pieces += 1
            calls.setdefault(d.index, ["", ""])
            calls[d.index][0] += d.name or ""
            calls[d.index][1] += d.arguments
    c, deltas = parser.finish()
    content += c
    for d in deltas:
        calls.setdefault(d.index, ["", ""])
        calls[d.index][0] += d.name or ""
        calls[d.index][1] += d.arguments
    return content, calls, pieces


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 13, 1000])
def test_parser_gives_the_same_answer_however_the_text_is_cut(step: int) -> None:
    content, calls, _ = run(TEXT, step)
    assert content == "Checking both."
    assert calls[0][0] == "get_weather"
    assert json.loads(calls[0][1]) == {"city": "Paris", "opts": {"days": 2}}
    # a call whose arguments come before its name is sent whole at its end
    assert calls[1] == ["calc", '{"x": 1}']


def test_arguments_stream_in_fragments_as_generated() -> None:
    _, _, pieces = run(TEXT, 2)
    assert pieces > 10


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("no call <tool here> at all", "no call <tool here> at all"),
        ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after"),
        ('<tool_call>{"no": "name"}</tool_call>', '<tool_call>{"no": "name"}</tool_call>'),
        ("ends with <tool_ca", "ends with <tool_ca"),
        ("  spaced answer  ", "  spaced answer  "),
    ],
)
def test_text_that_is_not_a_call_stays_content(text: str, content: str) -> None:
    for step in (1, 4, 100):
        got, calls, _ = run(text, step)
        assert got == content and not calls


def test_unclosed_call_is_read_at_the_end() -> None:
    content, calls, _ = run('<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}', 3)
    assert content == "" and calls[0][0] == "f" and json.loads(calls[0][1]) == {"a": [1, 2]}


def test_text_after_a_call_is_content_without_the_gap() -> None:
    content, calls, _ = run('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.', 2)
    assert content == "Done." and calls[0] == ["f", "{}"]


async def _chunks(texts: list[str]) -> AsyncIterator[Chunk]:
    for i, text in enumerate(texts):
        yield Chunk(text=text, completion_tokens=i + 1, finish_reason="stop" if i == len(texts) - 1 else None)


def _fold(texts: list[str]) -> tuple[str, str]:
    request = GenerationRequest(messages=[Message(role="user", content="q")], tools=[WEATHER])

    async def go() -> list[Chunk]:
        return [c async for c in parse_tool_calls(_chunks(texts), request)]

    result = collect(iter(asyncio.run(go())))
    return result.text, result.finish_reason


def test_parse_stream_sets_finish_reason_and_stops_after_one_call_when_asked() -> None:
    texts = ['<tool_call>{"name": "get_weather", ', '"arguments": {"city": "A"}}</tool_call>',
             '<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>', ""]
    request = GenerationRequest(
        messages=[Message(role="user", content="q")], tools=[WEATHER], parallel_tool_calls=False
    )

    async def go() -> list[Chunk]:
        return [c async for c in parse_tool_calls(_chunks(texts), request)]

    chunks = asyncio.run(go())
    assert len(chunks) == 2  # the generation is stopped after the first call
    assert chunks[-1].finish_reason == "tool_calls"
    names = [d.name for c in chunks for d in c.tool_calls if d.name]
    assert names == ["get_weather"]
    text, finish = _fold(["plain ", "answer"])
    assert (text, finish) == ("plain answer", "stop")


def test_fallback_prompt_for_templates_without_tools() -> None:
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Weather in Paris and Rome?"),
        Message(
            role="assistant",
            content=None,
            tool_calls=[
                {"id": "a", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "b", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        ),
        Message(role="tool", tool_call_id="a", content="18"),
        Message(role="tool", tool_call_id="b", content="21"),
    ]
    out = fallback_messages(messages, [WEATHER])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert out[3]["content"] == (
        "<tool_response>\n18\n</tool_response>\n<tool_response>\n21\n</tool_response>"
    )


def test_template_messages_carry_arguments_as_json_values() -> None:
    request = GenerationRequest(
        messages=[
            Message(role="developer", content="sys"),
            Message(
                role="assistant",
                tool_calls=[{"id": "a", "function": {"name": "f", "arguments": '{"x": 1}'}}],
            ),
            Message(role="tool", tool_call_id="a", content="ok"),
        ],
        tools=[WEATHER],
    )
    messages, tools = chat_messages(request, template_has_tools=True)
    assert messages[0]["role"] == "system"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert messages[2]["tool_call_id"] == "a"
    assert tools == [{"type": "function", "function": WEATHER.model_dump(exclude_none=True,
                                                                         exclude={"strict"})}]
    none = request.model_copy(update={"tool_choice": "none"})
    assert chat_messages(none, template_has_tools=True)[1] is None


def test_forced_call_grammar_and_schema() -> None:
    calc = FunctionTool(name="calc", parameters={"type": "object", "properties": {}})
    assert call_schema([WEATHER])["properties"]["name"] == {"const": "get_weather"}
    assert len(call_schema([WEATHER, calc])["anyOf"]) == 2
    gbnf = wrap_call_grammar('root ::= object\nobject ::= "{" "}"', parallel=False)
    assert gbnf.splitlines()[0] == "root ::= tool-call"
    assert 'tool-call ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"' in gbnf
    assert "tool-call-json ::= object" in gbnf
    assert wrap_call_grammar("root ::= x", parallel=True).startswith(
        'root ::= tool-call ("\\n" tool-call)*'
    )


def test_forced_call_grammar_is_one_llama_cpp_parses() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_grammar import LlamaGrammar

    grammar = LlamaGrammar.from_json_schema(json.dumps(call_schema([WEATHER])), verbose=False)
    text = wrap_call_grammar(grammar._grammar, parallel=True)
    assert LlamaGrammar.from_string(text, verbose=False)._grammar
    assert llama_cpp  # parsed without error above


def test_example_arguments_and_validation() -> None:
    args = example_arguments(WEATHER.parameters)
    assert args == {"city": "x"}
    assert validate_call([WEATHER], "get_weather", json.dumps(args)) is None
    assert "unknown function" in (validate_call([WEATHER], "nope", "{}") or "")
    assert "not JSON" in (validate_call([WEATHER], "get_weather", "{") or "")
    assert "schema" in (validate_call([WEATHER], "get_weather", '{"city": 3}') or "")


def test_engines_without_tools_refuse_them() -> None:
    from edgelm.engines.base import Engine

    class Plain(Engine):
        model_id = "plain"

        def stream(self, request, cancel=None):  # type: ignore[no-untyped-def]
            yield Chunk(text="")

    request = GenerationRequest(messages=[Message(role="user", content="q")], tools=[WEATHER])
    with pytest.raises(Unsupported) as info:
        check_capabilities(Plain(), request)
    assert info.value.param == "tools"
    image = GenerationRequest(
        messages=[Message(role="user", content=[{"type": "image_url", "image_url": {}}])]
    )
    with pytest.raises(Unsupported) as info:
        check_capabilities(Plain(), image)
    assert info.value.param == "messages[0].content[0]" and "'plain'" in info.value.message


# -- the remote engine passes tools through -----------------------------------------------------


def test_remote_sends_tools_and_reads_the_upstreams_calls() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        events = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_up", "type": "function",
                 "function": {"name": "get_weather", "arguments": ""}}]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '{"city": '}}]}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(),
                              headers={"content-type": "text/event-stream"})

    engine = RemoteEngine("http://up/v1", "m", transport=httpx.MockTransport(handler))
    request = GenerationRequest(
        messages=[
            Message(role="user", content=[{"type": "text", "text": "hi"},
                                          {"type": "image_url", "image_url": {"url": "u"}}]),
        ],
        tools=[WEATHER],
        tool_choice="get_weather",
        parallel_tool_calls=False,
    )
    result = collect(engine.stream(request))
    assert result.finish_reason == "tool_calls"
    body = seen[0]
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][0]["content"][1]["type"] == "image_url"  # the upstream may read it

    async def go() -> list[Chunk]:
        async def source() -> AsyncIterator[Chunk]:
            for chunk in engine.stream(request):
                yield chunk

        return [c async for c in parse_tool_calls(source(), request)]

    from edgelm.engines.base import Fold

    fold = Fold()
    for chunk in asyncio.run(go()):
        fold.add(chunk)
    assert fold.tool_calls == [
        {"id": "call_up", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert fold.finish == "tool_calls"


def run_named(text: str, step: int) -> tuple[str, dict[int, list[str]]]:
    parser = ToolCallParser(ids=lambda: "call_x", names={"get_weather", "calc"})
    content, calls = "", {}
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for out in [parser.push(p) for p in pieces] + [parser.finish()]:
        content += out[0]
        for d in out[1]:
            calls.setdefault(d.index, ["", ""])
            calls[d.index][0] += d.name or ""
            calls[d.index][1] += d.arguments
    return content, calls


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_untagged_calls_of_offered_functions(step: int) -> None:
    # Qwen2.5-Coder-0.5B answers a tool prompt with the bare object
    content, calls = run_named(' {"name": "get_weather", "arguments": {"city": "Tokyo"}}', step)
    assert content == "" and calls == {0: ["get_weather", '{"city": "Tokyo"}']}
    content, calls = run_named(
        '{"name": "calc", "arguments": {"x": 1}}\n{"name": "get_weather", "arguments": {}}\nok',
        step,
    )
    assert calls == {0: ["calc", '{"x": 1}'], 1: ["get_weather", "{}"]} and content == "ok"
    fenced = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Tokyo"\n  }\n}\n```'
    content, calls = run_named(fenced, step)
    assert content == "" and calls[0][0] == "get_weather"
    assert json.loads(calls[0][1]) == {"city": "Tokyo"}
    content, calls = run_named(fenced + "\nDone.", step)
    assert content == "Done." and len(calls) == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Ada", "arguments": {"age": 36}}',  # not an offered function
        '{"a": 1}',
        "{ not json",
        '{"name": "calc"',  # cut off
        "Sure: {\"name\": \"calc\", \"arguments\": {}}",  # not at the start
        "```python\nprint(1)\n```",
        "```json\n{\"a\": 1}\n```",
    ],
)
def test_json_answers_that_are_not_calls_stay_content(text: str) -> None:
    for step in (1, 4, 100):
        content, calls = run_named(text, step)
        assert not calls and content == text


def test_grammar_strings_exclude_raw_control_characters() -> None:
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_grammar import LlamaGrammar

    from edgelm.engines.llamacpp import _strict_strings

    grammar = LlamaGrammar.from_json_schema(json.dumps(call_schema([WEATHER])), verbose=False)
    strict = _strict_strings(grammar._grammar)
    assert strict != grammar._grammar
    assert r'char ::= [^"\\\x7F\x00-\x1F] |' in strict
    assert LlamaGrammar.from_string(wrap_call_grammar(strict, False), verbose=False)._grammar


def test_grammar_schema_writes_small_integer_ranges_as_values() -> None:
    """llama-cpp-python's converter ignores minimum/maximum, so a forced call could say
    ``"days": 30`` for a 1..7 field; small ranges become an enum the grammar does enforce."""
    schema = {
        "type": "object",
        "properties": {
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "top": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4},
            "year": {"type": "integer", "minimum": 0, "maximum": 100_000},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": 1}},
        },
    }
    props = grammar_schema(schema)["properties"]
    assert props["days"] == {"enum": [1, 2, 3, 4, 5, 6, 7]}
    assert props["top"] == {"enum": [1, 2, 3]}
    assert props["year"] == schema["properties"]["year"]  # too wide: left to validation
    assert props["ratio"] == schema["properties"]["ratio"]  # not an integer
    assert props["tags"]["items"] == {"enum": [-1, 0, 1]}
    assert schema["properties"]["days"]["maximum"] == 7  # the caller's schema is not changed


def test_grammar_for_a_bounded_integer_rejects_values_outside_it() -> None:
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_grammar import LlamaGrammar

    bounded = {"type": "object", "properties": {"days": {"type": "integer", "maximum": 7,
                                                          "minimum": 1}}, "required": ["days"]}
    text = LlamaGrammar.from_json_schema(json.dumps(grammar_schema(bounded)), verbose=False)._grammar
    assert '"7"' in text and '"30"' not in text
