"""The data that flows through edgelm: generation requests, streamed chunks, usage, timings.

Every consumer (HTTP service, terminal chat, bench, router, RAG, evals) speaks these types, so
an engine only has to turn a :class:`GenerationRequest` into :class:`Chunk` objects once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


class Message(BaseModel):
    """One chat turn. ``content`` may be OpenAI's list-of-parts form; only text parts count
    (engines that read no other part refuse them, see ``check_capabilities``).

    An assistant turn may carry ``tool_calls`` (OpenAI's shape: ``id``, ``type``,
    ``function.name``, ``function.arguments`` as a JSON string) and a ``tool`` turn answers one
    of them by ``tool_call_id``.
    """

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None

    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema to constrain to (``json_schema.schema``), if any."""
        if self.type != "json_schema" or not self.json_schema:
            return None
        return self.json_schema.get("schema", self.json_schema)


class FunctionTool(BaseModel):
    """One function the model may call: OpenAI's ``tools[i].function``."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    strict: bool | None = None


ToolChoice = Literal["auto", "none", "required"] | str
"""``auto``/``none``/``required``, or the name of the one function the model must call."""


class GenerationRequest(BaseModel):
    """What an engine is asked to do. Either ``messages`` (chat) or ``prompt`` (raw completion)."""

    messages: list[Message] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    ignore_eos: bool = False
    """Generate until max_tokens even past the end-of-generation token, as vLLM's and
    llama.cpp's servers allow: benchmarks then compare answers of the same length."""
    tools: list[FunctionTool] = Field(default_factory=list)
    """Functions the model may call (see :mod:`edgelm.tools`); empty: plain chat."""
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True

    @property
    def forced_tools(self) -> list[FunctionTool]:
        """The functions one of which the answer must call (``required`` or a named one);
        empty when the model may answer in text."""
        if not self.tools or self.tool_choice in ("auto", "none"):
            return []
        if self.tool_choice == "required":
            return list(self.tools)
        return [t for t in self.tools if t.name == self.tool_choice]

    @property
    def offers_tools(self) -> bool:
        """Whether the model is shown the tools (``tool_choice`` other than ``none``)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one sampled token, with the runners-up when asked for."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of one tool call in a stream, as OpenAI streams them: the first piece of call
    ``index`` carries its ``id`` and ``name``, later ones fragments of ``arguments`` (a JSON
    text whose fragments concatenate to the whole)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Chunk:
    """One step of a stream: the new text and the tokens behind it, with its own timing.

    ``t`` is seconds since the request reached the engine, so TTFT and inter-token latency are
    read off the same stream that serves users. The last chunk carries ``finish_reason``.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    t: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_seconds: float | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def decode_rate(completion_tokens: int, first_token_s: float | None, end_s: float) -> float | None:
    """Decode speed in tokens/s: the tokens after the first over the time after the first.

    The first token's time belongs to the prompt (it is the time to first token), so it is
    left out of both sides. Times are seconds on one clock (since the request started, or
    absolute); None when there is no second token or no time after the first to divide by.
    The one definition behind every decode tokens/s edgelm shows: the engine's timing, the
    bench's per-request figures and the client's results.
    """
    if first_token_s is None or completion_tokens < 2 or end_s <= first_token_s:
        return None
    return (completion_tokens - 1) / (end_s - first_token_s)


def prompt_rate(prompt_tokens: int, ttft_s: float | None) -> float | None:
    """Prompt speed in tokens/s: the prompt's tokens over the time to the first token (which
    is what reading them took, plus the first decode step); None when either is missing."""
    if not ttft_s or not prompt_tokens:
        return None
    return prompt_tokens / ttft_s


class Timing(BaseModel):
    """Latency decomposition of one generation, measured inside the engine's stream."""

    ttft_s: float | None = None
    total_s: float = 0.0
    prompt_s: float | None = None
    decode_s: float | None = None
    decode_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None


class Completion(BaseModel):
    """A whole answer: the fold of a stream (see :func:`edgelm.engines.base.collect`)."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)
