"""The bodies the OpenAI routes answer with, as pydantic models: chat
completions and their stream chunks, legacy completions and their chunks,
embeddings, models, errors, health, and the Responses API's response object.

The service builds these and the routes serialise them (``model_dump``),
and ``openapi.py`` documents each response from the same class, so the
document and the JSON on the wire cannot drift apart. Every field is always
written, except those a class lists in ``optional``: such a field is written
only when it was given (at construction or by assignment), so a field may be
absent, null or set, as the OpenAI shapes need.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer

FinishReason = Literal["stop", "length", "tool_calls"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class Reply(BaseModel):
    """A response body, or a part of one, as the server writes it."""
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    def body(self) -> dict[str, Any]:
        """The JSON object (as Python data) the client receives."""
        return self.model_dump()


class SparseReply(Reply):
    """A ``Reply`` with fields that are left out unless given."""
    optional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):  # no return type: the JSON schema is the fields'
        data = handler(self)
        for name in self.optional:
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if handler.mode == "serialization" and "required" in target:
            target["required"] = [n for n in target["required"] if n not in cls.optional]
        return schema


# -- errors --------------------------------------------------------------------------
class ErrorDetail(Reply):
    message: str
    type: str
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | None = Field(default=None, description="A stable word for the error (e.g. invalid_value), "
                                                       "when there is one.")


class ErrorResponse(Reply):
    """Every error on the OpenAI routes, and the last event of a stream that failed."""
    error: ErrorDetail


# -- models ----------------------------------------------------------------------------
class ModelCapabilities(Reply):
    chat: bool
    completion: bool
    fim: bool
    tools: bool
    embeddings: bool
    vision: bool


class Model(Reply):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thox"
    context_length: int = Field(description="The context window the model is served with (tokens).")
    max_model_len: int = Field(description="The same as context_length (vLLM's name).")
    capabilities: ModelCapabilities


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[Model]


class Health(Reply):
    status: Literal["ok"] = "ok"
    version: str
    model_loaded: bool
    models: list[dict[str, Any]] = Field(description="Each installed model and its state in the engine.")


# -- shared by chat and legacy completions ---------------------------------------------
class PromptTokensDetails(Reply):
    cached_tokens: int = 0


class CompletionUsage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> CompletionUsage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


# -- chat --------------------------------------------------------------------------------
class FunctionCallOut(Reply):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCallOut(Reply):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(Reply):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(Reply):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Reply):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatMessage(SparseReply):
    optional = frozenset({"tool_calls", "reasoning_content"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = Field(default=None, description="Text the model wrote inside <think>.")


class ChatChoice(Reply):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(Reply):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str


class ChatDelta(SparseReply):
    optional = frozenset({"role", "reasoning_content", "content", "tool_calls"})
    role: Literal["assistant"] | None = None
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Reply):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(SparseReply):
    """One ``data:`` event of a streamed chat completion; the stream ends with
    ``data: [DONE]``. With ``stream_options.include_usage`` every chunk has a
    ``usage`` (null but in the last, which has no choices)."""
    optional = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


# -- legacy completions ----------------------------------------------------------------------
class CompletionLogprobs(Reply):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Reply):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(Reply):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    system_fingerprint: str


class CompletionChunk(SparseReply):
    """One ``data:`` event of a streamed completion; the stream ends with
    ``data: [DONE]``. With ``stream_options.include_usage`` a last chunk
    without choices carries the ``usage``."""
    optional = frozenset({"system_fingerprint", "usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


# -- embeddings --------------------------------------------------------------------------------
class Embedding(Reply):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str] = Field(description="The vector, or its little-endian float32 "
                                                           "bytes in base64 (encoding_format base64).")


class EmbeddingUsage(Reply):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Reply):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- the Responses API ---------------------------------------------------------------------------
class ReasoningText(Reply):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = Field(description="Text the model wrote inside <think>.")


class ReasoningItem(Reply):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, Any]] = []
    status: ItemStatus
    content: list[ReasoningText]


class OutputText(Reply):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []


class MessageItem(Reply):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(Reply):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str = Field(description="A function_call_output input item with this call_id answers the call.")
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[Union[ReasoningItem, MessageItem, FunctionCallItem], Field(discriminator="type")]


class InputTokensDetails(Reply):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(Reply):
    reasoning_tokens: int = 0


class ResponseUsage(Reply):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(Reply):
    code: str
    message: str


class IncompleteDetails(Reply):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ReasoningConfig(Reply):
    effort: None = None
    summary: None = None


class ResponseTextConfig(Reply):
    format: dict[str, Any] = Field(description="The request's text.format ({'type': 'text'} when none).")


class ResponseFunctionTool(Reply):
    type: Literal["function"] = "function"
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool


ResponseStatus = Literal["completed", "incomplete", "in_progress", "failed"]


class ResponseObject(SparseReply):
    """A Responses API response (``object: "response"``)."""
    optional = frozenset({"usage", "user"})
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    completed_at: int | None
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningConfig = ReasoningConfig()
    store: bool
    temperature: float
    text: ResponseTextConfig
    tool_choice: Union[str, dict[str, Any]]
    tools: list[ResponseFunctionTool]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str]
    usage: ResponseUsage | None = None
    user: str | None = None


class DeletedResponse(Reply):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
