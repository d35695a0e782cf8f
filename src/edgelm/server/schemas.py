"""OpenAI request bodies, validated with the ranges OpenAI documents.

Unknown fields are ignored (clients such as LangChain send extras), but known fields are checked
strictly so a wrong type or an out-of-range value is a 400 that names the parameter.

Every field of OpenAI's chat request is decided here (see ``_REFUSED`` and ``_ACCEPTED``):
honoured, accepted because it cannot change the answer (``user``, ``metadata``, ``store``,
``service_tier``, ...), or refused with a 400 that names it, never ignored where ignoring it
would change the answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgelm.errors import InvalidRequest
from edgelm.types import FunctionTool, GenerationRequest, Message, ResponseFormat

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Field(ge=1)]
MAX_CHOICES = 16
"""Most answers one request may ask for (``n``); OpenAI allows 128, a local model's memory
and cores fewer."""

# OpenAI fields edgelm cannot honour and that would change the answer if ignored: a 400 that
# names them (and says what to use instead) whenever they are set to anything but a no-op.
_REFUSED: dict[str, str] = {
    "functions": "the deprecated 'functions' parameter is not supported; send 'tools' instead",
    "function_call": "the deprecated 'function_call' parameter is not supported; send "
    "'tool_choice' instead",
    "logit_bias": "logit_bias is not supported (token ids differ from model to model)",
    "audio": "audio output is not supported: edgelm's models answer in text",
    "reasoning_effort": "reasoning_effort is not supported: edgelm's models do not reason "
    "in separate tokens",
    "verbosity": "verbosity is not supported; ask for the length you want in the messages",
    "web_search_options": "web search is not supported by a local model",
    "best_of": "best_of is not supported; use n to get several answers",
}
# Accepted and not acted on, because they cannot change the answer: user, metadata, store,
# service_tier, prompt_cache_key, safety_identifier, prediction (a latency hint whose answer
# must be the same without it), modalities ["text"], stream_options.include_obfuscation.
_NO_OPS: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
    "best_of": (1,),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=1000)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repeat_penalty: Annotated[float, Field(ge=0.0, le=4.0)] | None = None
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field edgelm cannot honour that is set to something that
        would change the answer."""
        extra = self.model_extra or {}
        for name, message in _REFUSED.items():
            value = getattr(self, name, extra.get(name))
            if value is None or value in _NO_OPS.get(name, ()):
                continue
            raise InvalidRequest(message, param=name)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "stop": self.stop_list(),
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "ignore_eos": self.ignore_eos,
        }
        for key in ("temperature", "top_p", "top_k", "repeat_penalty"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "function"
    function: FunctionTool


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: dict[str, Any]


# Kinds of message content parts OpenAI defines, and edgelm's ``document`` (texts for a
# ``rag:`` model to answer from); which of them a model reads is the engine's to say
# (``check_capabilities``), an unknown kind is a 400 here.
CONTENT_PARTS = ("text", "image_url", "input_audio", "file", "refusal", "document")


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    modalities: list[Literal["text", "audio"]] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # accepted, cannot change the answer
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None

    def to_generation(self) -> GenerationRequest:
        self.refuse_unsupported()
        if self.modalities and "audio" in self.modalities:
            raise InvalidRequest(
                "audio output is not supported: edgelm's models answer in text",
                param="modalities",
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        self._check_messages()
        tools, choice = self._tools()
        params = self.sampling()
        params["max_tokens"] = self.max_completion_tokens or self.max_tokens
        return GenerationRequest(
            messages=self.messages,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            response_format=self.response_format,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            **params,
        )

    def _check_messages(self) -> None:
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    kind = part.get("type")
                    if kind not in CONTENT_PARTS:
                        raise InvalidRequest(
                            f"unknown content part type {kind!r} (OpenAI defines "
                            f"{', '.join(CONTENT_PARTS)})",
                            param=f"messages[{i}].content[{j}].type",
                        )
            if message.role == "tool" and not message.tool_call_id:
                raise InvalidRequest(
                    "a message with role 'tool' needs the tool_call_id of the call it answers",
                    param=f"messages[{i}].tool_call_id",
                )
            for k, call in enumerate(message.tool_calls or []):
                function = call.get("function")
                if message.role != "assistant" or not isinstance(function, dict) or not (
                    isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments", ""), str | dict)
                ):
                    raise InvalidRequest(
                        "tool_calls belong to assistant messages, each as {id, type: "
                        "'function', function: {name, arguments}}",
                        param=f"messages[{i}].tool_calls[{k}]",
                    )

    def _tools(self) -> tuple[list[FunctionTool], str]:
        """The offered functions and the tool choice as a plain string (a function's name
        when one is named)."""
        tools: list[FunctionTool] = []
        for i, raw in enumerate(self.tools or []):
            if raw.get("type", "function") != "function":
                raise InvalidRequest(
                    f"tool type {raw.get('type')!r} is not supported; edgelm's models call "
                    "functions (type 'function')",
                    param=f"tools[{i}].type",
                )
            try:
                tools.append(FunctionSpec.model_validate(raw).function)
            except ValueError as exc:
                raise InvalidRequest(
                    f"tools[{i}] is not a function tool: {_first_error(exc)}",
                    param=f"tools[{i}].function",
                ) from None
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("two tools have the same function name", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name")
            if name not in names:
                raise InvalidRequest(
                    f"tool_choice names function {name!r}, which is not among the tools "
                    f"({', '.join(names) or 'none sent'})",
                    param="tool_choice",
                )
            return tools, str(name)
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
        return tools, choice or "auto"


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(exc)


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None

    def to_generation(self) -> GenerationRequest:
        self.refuse_unsupported()
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
        params = self.sampling()
        if params["max_tokens"] is None:
            params["max_tokens"] = 16  # OpenAI's documented default for completions
        return GenerationRequest(
            prompt=prompt,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            **params,
        )


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if len(self.input) > 2048:
            raise InvalidRequest("at most 2048 inputs per request", param="input")
        return list(self.input)
