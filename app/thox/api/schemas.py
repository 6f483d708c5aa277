"""OpenAI request bodies, validated with pydantic (strict types, unknown
fields ignored). Field names and ranges follow the OpenAI OpenAPI spec."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_N = 8
MAX_TOKENS = 1 << 20
MAX_PROMPTS = 64  # prompts in one legacy completion request
MAX_INPUTS = 2048  # inputs in one embeddings request
# messages (or input items) in one chat-style request: counted before any is
# validated, so one request cannot hold the interpreter lock for long
MAX_MESSAGES = 20_000


def at_most(limit: int, what: str, *, token_ids: bool = False) -> BeforeValidator:
    """A list of more than ``limit`` items is refused before its items are validated (with
    ``token_ids``, a list of integers is one item: a prompt of token ids)."""
    def check(v: Any) -> Any:
        if isinstance(v, list) and len(v) > limit and not (token_ids and all(type(x) is int for x in v)):
            raise ValueError(f"at most {limit} {what} per request, got {len(v)}")
        return v
    return BeforeValidator(check)


MessageCount = at_most(MAX_MESSAGES, "messages")

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Base(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# -- chat ----------------------------------------------------------------------
class TextPart(Base):
    type: Literal["text"]
    text: str


class FunctionCall(Base):
    name: str
    arguments: str = "{}"


class ToolCall(Base):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Base):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind in ("image_url", "input_audio", "file", "image"):
                    raise ValueError(f"content part {i}: type '{kind}' is not supported by this model")
                else:
                    raise ValueError(f"content part {i}: expected {{'type': 'text', 'text': <string>}}")
            return "".join(texts)
        return v

    @model_validator(mode="after")
    def _check(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs tool_call_id")
        return self


class FunctionDef(Base):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Base):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(Base):
    name: str


class NamedToolChoice(Base):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class JSONSchemaFormat(Base):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _need_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs 'json_schema'")
        return self


class StreamOptions(Base):
    include_usage: bool = False


MAX_STOP = 32  # stop strings in one request (OpenAI allows 4; editors send more)
StopParam = Union[str, Annotated[list[str], Field(max_length=MAX_STOP)], None]


class SamplingFields(Base):
    model: Annotated[str, Field(min_length=1)]
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopParam = None
    max_tokens: TokenCount | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] | None = None   # llama.cpp's, not OpenAI's

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, fail_fast=True), MessageCount]
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(fail_fast=True)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function '{self.tool_choice.function.name}' "
                                 f"which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# fail_fast: a long list with a bad item gets one error, not one per item
PromptParam = Annotated[Union[str, Annotated[list[str], Field(max_length=MAX_PROMPTS, fail_fast=True)],
                              Annotated[list[TokenId], Field(min_length=1, fail_fast=True)],
                              Annotated[list[Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]],
                                        Field(max_length=MAX_PROMPTS, fail_fast=True)]],
                        at_most(MAX_PROMPTS, "prompts", token_ids=True)]


class CompletionRequest(SamplingFields):
    prompt: PromptParam
    suffix: str | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = 16

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


EmbeddingInput = Annotated[Union[Annotated[str, Field(min_length=1)],
                                 Annotated[list[Annotated[str, Field(min_length=1)]],
                                           Field(min_length=1, max_length=MAX_INPUTS, fail_fast=True)],
                                 Annotated[list[TokenId], Field(min_length=1, fail_fast=True)],
                                 Annotated[list[Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]],
                                           Field(min_length=1, max_length=MAX_INPUTS, fail_fast=True)]],
                           at_most(MAX_INPUTS, "inputs", token_ids=True)]


class EmbeddingRequest(Base):
    model: Annotated[str, Field(min_length=1)]
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
