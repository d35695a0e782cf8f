"""Tool calling: how functions reach a model, and how its calls come back out of its text.

Local chat models call tools by writing text. Qwen2.5 (and every "Hermes"-style model) was
trained to answer with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, and
its chat template lists the functions in the system turn. So:

* **In**: a template that renders ``tools`` gets them as OpenAI sends them, and the turns of a
  tool round trip (assistant ``tool_calls``, ``role: "tool"`` results) as it expects them
  (:func:`template_messages`). A template without a tools section (SmolLM2's, or ChatML when a
  file has none) gets the fallback: the same instructions in Qwen's words in the system turn,
  earlier calls written back as ``<tool_call>`` blocks and results as ``<tool_response>``
  blocks in a user turn (:func:`fallback_messages`). One output format for every model means
  one parser.
* **Out**: :class:`ToolCallParser` reads the answer as it streams, passes text through as
  content and turns each ``<tool_call>`` block into OpenAI's tool-call deltas: the call's
  ``id`` and ``name`` first, then ``arguments`` fragments as they are generated.
  :func:`parse_tool_calls` wraps a chunk stream with it; the non-streaming answer is the fold
  of the same stream, so the two never disagree.
* **Forced**: with ``tool_choice`` ``required`` or a named function, the llama.cpp engine
  samples under a grammar that admits only such blocks whose JSON matches one of the
  functions' parameter schemas (:func:`call_schema`, :func:`wrap_call_grammar`): the call
  always parses and validates.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from typing import Any

from edgelm.types import Chunk, FunctionTool, GenerationRequest, Message, ToolCallDelta

OPEN = "<tool_call>"
CLOSE = "</tool_call>"

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
"""The system-turn text given to models whose chat template has no tools section: Qwen2.5's
own wording, so that every model is asked for (and parsed in) the same format."""

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def new_call_id() -> str:
    """An id in OpenAI's style (``call_`` and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def template_supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders a ``tools`` variable (llama.cpp's server decides
    the same way: by looking for it in the template's source)."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def tool_dicts(tools: list[FunctionTool]) -> list[dict[str, Any]]:
    """The tools as OpenAI sends them (what chat templates iterate over)."""
    return [
        {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"strict"})}
        for t in tools
    ]


def _arguments_value(arguments: Any) -> Any:
    """Arguments as a JSON value: templates write ``arguments | tojson``, and OpenAI clients
    send them as a JSON string, which would otherwise be written as a quoted string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_parts(call: dict[str, Any]) -> tuple[str, Any]:
    function = call.get("function") or {}
    return str(function.get("name", "")), _arguments_value(function.get("arguments", {}))


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as a tools-aware chat template reads them: ``developer`` as ``system``,
    content as text, ``tool_calls`` with their arguments as JSON values."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }
                for call in m.tool_calls
                for name, args in [_call_parts(call)]
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it (Qwen2.5's template writes earlier calls the same)."""
    return f'{OPEN}\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n{CLOSE}'


def fallback_messages(
    messages: list[Message], tools: list[FunctionTool]
) -> list[dict[str, Any]]:
    """Plain-text turns for a template without a tools section: the instructions (when
    ``tools`` is not empty) in the system turn, earlier calls as ``<tool_call>`` blocks in the
    assistant's text, and consecutive tool results as one user turn of ``<tool_response>``
    blocks. Every turn has a role and a string content, which any template renders."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            blocks = [call_block(*_call_parts(call)) for call in m.tool_calls]
            text = "\n".join([text, *blocks] if text else blocks)
        if m.role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "tool_results": True})
            continue
        out.append({"role": role, "content": text})
    for item in out:
        item.pop("tool_results", None)
    if tools:
        listing = "".join("\n" + json.dumps(t) for t in tool_dicts(tools))
        instructions = FALLBACK_INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{instructions}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def has_tool_turns(request: GenerationRequest) -> bool:
    """Whether a chat request offers tools or carries earlier calls or tool results."""
    return bool(request.tools) or any(
        m.tool_calls or m.role == "tool" for m in request.messages or []
    )


def chat_messages(
    request: GenerationRequest, template_has_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render a chat request with: the template's own tools section when
    it has one, the fallback otherwise. ``tools`` is None when the model is not offered any
    (none sent, or ``tool_choice: "none"``)."""
    messages = request.messages or []
    offered = request.tools if request.offers_tools else []
    if template_has_tools:
        return template_messages(messages), (tool_dicts(offered) if offered else None)
    return fallback_messages(messages, offered), None


# -- forced calls ------------------------------------------------------------------------------


def call_schema(tools: list[FunctionTool]) -> dict[str, Any]:
    """JSON schema of one call's JSON to any of ``tools``: ``name`` fixed to the function,
    ``arguments`` its parameter schema (properties in this order, as the model writes them)."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


GRAMMAR_INT_RANGE = 256
"""Integer ranges up to this many values are written into the grammar as their values."""


def grammar_schema(schema: Any) -> Any:
    """``schema`` with the bounds llama-cpp-python's schema-to-grammar converter ignores
    turned into what it does enforce: an integer with ``minimum``/``maximum`` (or the exclusive
    forms) spanning at most :data:`GRAMMAR_INT_RANGE` values becomes an ``enum`` of them, so a
    forced call such as ``{"days": 1..7}`` cannot come out as 30. Wider ranges stay as they
    are (the call is still checked against the original schema)."""
    if isinstance(schema, list):
        return [grammar_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: grammar_schema(value) for key, value in schema.items()}
    if out.get("type") == "integer" and "enum" not in out:
        low = out.get("minimum")
        high = out.get("maximum")
        if isinstance(out.get("exclusiveMinimum"), int | float):
            low = math.floor(out["exclusiveMinimum"]) + 1
        if isinstance(out.get("exclusiveMaximum"), int | float):
            high = math.ceil(out["exclusiveMaximum"]) - 1
        if isinstance(low, int | float) and isinstance(high, int | float):
            first, last = math.ceil(low), math.floor(high)
            if 0 <= last - first < GRAMMAR_INT_RANGE:
                return {"enum": list(range(first, last + 1))}
    return out


def wrap_call_grammar(json_gbnf: str, parallel: bool) -> str:
    """A GBNF grammar (root rule ``root``) for the answer of a forced call, built from the
    grammar of :func:`call_schema` (root ``root``): one ``<tool_call>`` block or, when
    ``parallel``, several one per line. Nothing may come before or after them."""
    renamed = re.sub(r"^root ::=", "tool-call-json ::=", json_gbnf, flags=re.MULTILINE)
    call = f'tool-call ::= "{OPEN}\\n" tool-call-json "\\n{CLOSE}"'
    root = 'root ::= tool-call ("\\n" tool-call)*' if parallel else "root ::= tool-call"
    return f"{root}\n{call}\n{renamed}"


def example_arguments(schema: dict[str, Any]) -> Any:
    """A small value valid for simple schemas (the fake engine's forced calls)."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return example_arguments(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: example_arguments(props[k]) for k in schema.get("required", []) if k in props}
    return {"string": "x", "integer": 1, "number": 1, "boolean": True, "array": []}.get(kind)


# -- parsing -----------------------------------------------------------------------------------


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Splits a model's streamed text into content and OpenAI tool-call deltas.

    Text that might begin a ``<tool_call>`` tag is held back until it is clear. Inside a
    block, once ``{"name": "...", "arguments": {`` has been read the call's first delta (id,
    name) goes out, and the arguments text follows as it is generated, short of a tail that
    might close the block. A block that is not a call (unparsable JSON, no name) before
    anything of it was sent is passed through as content. Whitespace-only content next to calls
    is dropped, as OpenAI's answers with calls have no such content.

    Small models do not always write the tags: Qwen2.5-Coder-0.5B answers a tool prompt with
    the bare ``{"name": ..., "arguments": ...}`` object. When ``names`` are given, an answer
    that *starts* with such an object naming one of them is read as calls too (several
    objects in a row as several calls); any other answer starting with ``{`` is content.
    """

    def __init__(self, ids: Callable[[], str] = new_call_id, names: Collection[str] = ()):
        self._ids = ids
        self._names = frozenset(names)
        self._buffer = ""
        self._call: str | None = None  # text of the block being read
        self._bare = False  # the block is an untagged answer (see above)
        self._fenced = False  # ... inside a Markdown code fence
        self._start = bool(self._names)  # nothing but whitespace seen yet
        self._pending_ws = ""
        self._after_call = False
        self.calls = 0
        self._head_sent = False
        self._args_at = 0  # where the arguments start in the block's text
        self._args_sent = 0

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add generated text; return (content to send, tool-call deltas to send)."""
        self._buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._buffer:
            if self._start:
                decided = self._bare_start()
                if not decided:
                    break  # still only whitespace, or a prefix of '{"name":'
                continue
            if self._call is None:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = _held_prefix(self._buffer, OPEN)
                    cut = len(self._buffer) - keep
                    content.append(self._content(self._buffer[:cut]))
                    self._buffer = self._buffer[cut:]
                    break
                content.append(self._content(self._buffer[:at]))
                self._buffer = self._buffer[at + len(OPEN) :]
                self._open_block(bare=False)
                continue
            if self._bare:
                self._call += self._buffer
                self._buffer = ""
                if not self._head_sent and self._unknown_bare_name():
                    content.append(self._content(self._call))
                    self._call, self._bare = None, False
                    break
                whole = next(_objects(self._call), None)
                if whole is None:
                    deltas.extend(self._partial())
                    break
                # the object is complete: it is the call; what follows may be another one
                self._call, self._buffer = self._call[: whole[1]], self._call[whole[1] :]
                before = self.calls
                text_out, call_deltas = self._complete(closed=True)
                content.append(text_out)
                deltas.extend(call_deltas)
                self._start = self.calls > before
                continue
            at = self._buffer.find(CLOSE)
            if at < 0:
                keep = _held_prefix(self._buffer, CLOSE)
                cut = len(self._buffer) - keep
                self._call += self._buffer[:cut]
                self._buffer = self._buffer[cut:]
                deltas.extend(self._partial())
                break
            self._call += self._buffer[:at]
            self._buffer = self._buffer[at + len(CLOSE) :]
            text_out, call_deltas = self._complete(closed=True)
            content.append(text_out)
            deltas.extend(call_deltas)
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the answer: an unclosed block is read as a call if its JSON is whole."""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._start:  # the whole answer was whitespace or a prefix of a bare call
            self._start = False
        if self._call is not None:
            self._call += self._buffer
            self._buffer = ""
            text_out, deltas = self._complete(closed=False)
            content.append(text_out)
        elif self._buffer:
            content.append(self._content(self._buffer))
            self._buffer = ""
        if not self.calls and self._pending_ws:
            content.append(self._pending_ws)
        self._pending_ws = ""
        return "".join(content), deltas

    @property
    def in_call(self) -> bool:
        return self._call is not None

    def _bare_start(self) -> bool:
        """At the start of the answer (or after an untagged call): decide whether an
        untagged call follows, bare or in a Markdown ```json fence (Qwen2.5-Coder writes
        both). False while the text seen cannot tell yet."""
        head = self._buffer.lstrip()
        if not head:
            return False
        if self._fenced:  # the fence around the call before: drop its closing line
            if len(head) < 3 and "```".startswith(head):
                return False
            if head.startswith("```"):
                self._buffer, self._fenced = head[3:], False
                return True
            self._fenced = False
        compact = re.sub(r"\s+", "", head)
        for fence in ("```json", "```", ""):
            opener = fence + _BARE_OPEN
            if compact.startswith(opener):
                self._start, self._fenced = False, bool(fence)
                self._pending_ws += self._buffer[: len(self._buffer) - len(head)]
                self._buffer = head[head.index("{") :]
                self._open_block(bare=True)
                return True
            if opener.startswith(compact):
                return False
        self._start = False
        return True

    def _open_block(self, bare: bool) -> None:
        self._call, self._bare = "", bare
        self._head_sent, self._args_sent = False, 0

    def _unknown_bare_name(self) -> bool:
        match = _HEAD.match(self._call or "")
        return match is not None and _name(match.group(1)) not in self._names

    def _content(self, text: str) -> str:
        """Content to send now; trailing whitespace waits to see whether a call follows."""
        body = text.rstrip()
        if not body:
            self._pending_ws += text
            return ""
        out = self._pending_ws + body
        self._pending_ws = text[len(body) :]
        if self._after_call:  # text after a call starts where the call ends
            out, self._after_call = out.lstrip(), False
        return out

    def _partial(self) -> list[ToolCallDelta]:
        assert self._call is not None
        out: list[ToolCallDelta] = []
        if not self._head_sent:
            match = _HEAD.match(self._call)
            name = _name(match.group(1)) if match else None
            if match is None or name is None:
                return out
            self._head_sent, self._args_at = True, match.end()
            self._pending_ws = ""
            out.append(ToolCallDelta(index=self.calls, id=self._ids(), name=name))
        args = self._call[self._args_at :]
        safe = len(args.rstrip("} \t\r\n"))
        if safe > self._args_sent:
            out.append(ToolCallDelta(index=self.calls, arguments=args[self._args_sent : safe]))
            self._args_sent = safe
        return out

    def _complete(self, closed: bool) -> tuple[str, list[ToolCallDelta]]:
        """The block is whole: its remaining deltas, or its text as content if not a call.
        A tagged block holds one call; an untagged answer may hold several objects in a row,
        and text after them is content."""
        assert self._call is not None
        block, self._call = self._call, None
        bare, self._bare = self._bare, False
        head_sent, self._head_sent = self._head_sent, False
        deltas: list[ToolCallDelta] = []
        used = 0  # characters of the block taken by calls
        for value, end in _objects(block):
            call = _as_call(value, self._names if bare else None)
            if call is None:
                break
            if not deltas and head_sent:  # the call whose head and arguments were streamed
                raw = block[self._args_at : end].rstrip()[:-1].rstrip()  # without its "}"
                rest = raw[self._args_sent :]
                deltas.append(ToolCallDelta(index=self.calls, arguments=rest))
            else:
                name, arguments = call
                text = arguments if isinstance(arguments, str) else json.dumps(arguments)
                deltas.append(
                    ToolCallDelta(index=self.calls, id=self._ids(), name=name, arguments=text)
                )
            self.calls += 1
            used = end
            if not bare:
                break
        if not deltas and head_sent:  # streamed as a call, but its JSON did not close well
            rest = block[self._args_at :].rstrip()[self._args_sent :]
            deltas.append(ToolCallDelta(index=self.calls, arguments=rest))
            self.calls += 1
            used = len(block)
        deltas = [d for d in deltas if d.id is not None or d.arguments]
        if not used:
            tail = CLOSE if closed else ""
            return self._content(block if bare else f"{OPEN}{block}{tail}"), deltas
        self._pending_ws = ""
        self._after_call = True
        leftover = block[used:] if bare else ""  # inside tags, only the call counts
        return self._content(leftover), deltas


_BARE_OPEN = '{"name":'


def _name(escaped: str) -> str | None:
    try:
        value = json.loads(f'"{escaped}"')
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) and value else None


def _objects(text: str) -> Iterator[tuple[Any, int]]:
    """JSON values at the start of ``text``, one after another (whitespace between), each with
    where it ends; stops at the first thing that is not one."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield value, pos


def _as_call(value: Any, names: frozenset[str] | None) -> tuple[str, Any] | None:
    """(name, arguments) when ``value`` is a call (to one of ``names``, when given)."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict | str):
        return None
    return name, arguments


async def parse_tool_calls(
    chunks: AsyncIterator[Chunk], request: GenerationRequest
) -> AsyncIterator[Chunk]:
    """The stream with ``<tool_call>`` blocks turned into ``tool_calls`` deltas and the finish
    reason ``tool_calls`` when the answer made any. Without ``parallel_tool_calls`` the answer
    ends after its first call (the generation is stopped there)."""
    parser = ToolCallParser(names=[t.name for t in request.tools])
    passed = False  # calls the engine itself delivered (a remote upstream parses its own)
    try:
        async for chunk in chunks:
            passed = passed or bool(chunk.tool_calls)
            text, deltas = parser.push(chunk.text)
            done = bool(chunk.finish_reason)
            single_done = not request.parallel_tool_calls and parser.calls and not parser.in_call
            if done or single_done:
                tail, more = parser.finish()
                if single_done:
                    tail = ""  # whatever followed the one call is not part of the answer
                text, deltas = text + tail, deltas + more
            chunk.text = text
            chunk.tool_calls = [*chunk.tool_calls, *deltas]
            if single_done and not done:
                chunk.finish_reason = "stop"
            if chunk.finish_reason == "stop" and (parser.calls or passed):
                chunk.finish_reason = "tool_calls"
            yield chunk
            if chunk.finish_reason:
                return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def validate_call(
    tools: list[FunctionTool], name: str, arguments: str
) -> str | None:
    """Why a call does not fit the offered tools (unknown function, arguments not a JSON
    object matching its schema), or None when it does. Uses ``jsonschema`` when installed,
    else checks the JSON and the required keys only."""
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        return f"unknown function {name!r}"
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"arguments are not JSON: {exc}"
    if not isinstance(value, dict):
        return "arguments are not a JSON object"
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in tool.parameters.get("required", []) if k not in value]
        return f"missing required arguments {missing}" if missing else None
    try:
        jsonschema.validate(value, tool.parameters)
    except jsonschema.ValidationError as exc:
        return f"arguments do not match the schema: {exc.message}"
    return None
