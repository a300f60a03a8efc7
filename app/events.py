"""What the backend (backend.py) posts to the app: Textual Messages about loading, the drafter, and each turn's
progress, text and end, with the turn's statistics (``Stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class Stats:
    ttft: float = 0.0
    prompt_tokens: int = 0          # prompt tokens computed this turn
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0     # this turn's peak of MLX's allocator, or the process RSS (see memory_kind)
    context_used: int = 0
    context_limit: int = 0
    cached_tokens: int = 0          # prompt tokens found in the cache
    memory_kind: str = "peak"       # "peak" (MLX) or "RSS" (the backend reports no peak, e.g. some CPU builds)
    drafted_tokens: int = 0         # with an assistant drafter: tokens drafted this turn
    accepted_tokens: int = 0        # ... and kept

    @property
    def acceptance(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


# -- messages the backend posts --------------------------------------------------------------------


@dataclass
class LoadProgress(Message):
    done: int
    total: int
    desc: str


@dataclass
class ModelLoaded(Message):
    name: str
    context_limit: int


@dataclass
class LoadFailed(Message):
    error: str


@dataclass
class AssistantChanged(Message):
    """The drafter in `path` is in use ("" : none); answers from now on decode with it."""

    path: str


@dataclass
class AssistantRefused(Message):
    """The drafter in `path` could not be used (`error` says why); the one before stays."""

    path: str
    error: str


@dataclass
class DrafterSkipped(Message):
    """The model loaded without the drafter of the settings, which did not load or fit it (`error` says why)."""

    path: str
    error: str


@dataclass
class TurnEvent(Message):
    conversation_id: int
    turn_id: int  # the history id of the user message being answered


@dataclass
class Working(TurnEvent):
    """Before the first token: `done` of `total` prompt tokens read (media are encoded with the first chunk)."""

    done: int
    total: int


@dataclass
class Streamed(TurnEvent):
    """A batch of new text: the whole thinking and answer so far, so handlers never lose a piece; the tool calls
    completed so far ({"id", "name", "arguments"}), shown as calls rather than the tokens they were written in."""

    thinking: str
    answer: str
    stats: Stats
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class Finished(TurnEvent):
    thinking: str
    answer: str          # as kept in the conversation (no thoughts, no media placeholders)
    finish_reason: str   # "stop" | "length" | "context" | "cancelled"
    stats: Stats
    tool_calls: list[dict] = field(default_factory=list)  # as in Streamed


@dataclass
class GenerationFailed(TurnEvent):
    error: str
    context_full: bool = False
    drop_turns: int = 0  # with context_full: dropping this many oldest turns makes it fit; 0: the message alone
                         # is too long, or the system prompt alone (too_long)
    too_long: str = "message"


@dataclass
class ContextCounted(Message):
    conversation_id: int
    used: int
    limit: int
