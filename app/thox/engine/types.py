"""Plain data passed between the API layer and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int | None = None          # None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None             # GBNF text
    # text markers that switch the stream into "tool call" capture mode
    capture_markers: list[str] = field(default_factory=list)


@dataclass
class TokenLogprob:
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]


@dataclass
class Piece:
    """Visible text produced by one step (may be empty while text is held back)."""
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    finish_reason: str                     # stop | length | capture
    prompt_tokens: int
    completion_tokens: int
    captured: str = ""                     # text after a capture marker (tool calls)
    cached_tokens: int = 0
    first_token_at: float | None = None    # time.monotonic() of the first generated token


@dataclass
class GenerationJob:
    prompt_tokens: list[int]
    params: SamplingParams
    prefix_text: str = ""                  # echo: text emitted before generation
    extra: dict[str, Any] = field(default_factory=dict)
