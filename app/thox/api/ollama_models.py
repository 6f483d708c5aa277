"""The bodies of the Ollama routes (``ollama.py``): what clients send, and
what the routes answer, as pydantic models (``openapi.py`` documents them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import create_model

from .response_models import Reply, SparseReply
from .schemas import Base, MessageCount


# -- requests --------------------------------------------------------------------------------
class OllamaRequest(Base):
    model: str | None = None
    name: str | None = None                 # older clients say name
    options: dict[str, Any] | None = None
    format: Union[str, dict[str, Any], None] = None
    stream: bool | None = True
    keep_alive: Union[str, int, float, None] = None
    think: Union[bool, str, None] = None

    @property
    def model_name(self) -> str | None:
        return self.model or self.name


class ChatBody(OllamaRequest):
    messages: Annotated[list[dict[str, Any]], MessageCount] = []
    tools: list[dict[str, Any]] | None = None


class GenerateBody(OllamaRequest):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    raw: bool | None = False
    images: list[Any] | None = None


class EmbedBody(OllamaRequest):
    input: Union[str, list[str], None] = None
    prompt: str | None = None               # /api/embeddings
    dimensions: int | None = None


# -- responses ---------------------------------------------------------------------------------
class OllamaError(Reply):
    error: str


class OllamaVersion(Reply):
    version: str


class OllamaDetails(Reply):
    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str = ""
    quantization_level: str = ""


class OllamaModel(Reply):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaDetails


class OllamaLoadedModel(OllamaModel):
    size_vram: int = 0
    expires_at: str
    context_length: int


class OllamaModels(Reply):
    models: list[OllamaModel]


class OllamaLoadedModels(Reply):
    models: list[OllamaLoadedModel]


class OllamaShow(Reply):
    modelfile: str
    parameters: str
    template: str = ""
    details: OllamaDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaToolFunction(Reply):
    name: str
    arguments: dict[str, Any]


class OllamaToolCall(Reply):
    id: str
    function: OllamaToolFunction


class OllamaMessage(SparseReply):
    optional = frozenset({"thinking", "tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None


DoneReason = Literal["stop", "length", "load"]
# the counts of a finished answer, after ``done``: left out of the pieces of a stream
COUNTS: dict[str, Any] = {"done_reason": (Optional[DoneReason], None), **{k: (Optional[int], None) for k in (
    "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")}}


def _answer_model(name: str, doc: str, optional: frozenset[str], **body: Any) -> type[SparseReply]:
    """A chat or generate answer: a piece of a stream (``done`` false), or the
    whole answer or the stream's last piece, with the counts (``done`` true).
    ``body`` holds the fields between ``created_at`` and ``done``."""
    cls = create_model(name, __base__=SparseReply, __doc__=doc, model=(str, ...), created_at=(str, ...), **body,
                       done=(bool, False), **COUNTS)
    cls.optional = frozenset(COUNTS) | optional
    return cls


OllamaChatResponse = _answer_model("OllamaChatResponse", "A chat answer.", frozenset(), message=(OllamaMessage, ...))
OllamaGenerateResponse = _answer_model("OllamaGenerateResponse", "A generate answer.", frozenset({"thinking"}),
                                       response=(str, ""), thinking=(Optional[str], None))


class OllamaEmbed(Reply):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int


class OllamaEmbedding(Reply):
    embedding: list[float]
