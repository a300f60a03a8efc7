"""The one thread that owns the model: every MLX call (loading, prefill, decoding) runs on it.

MLX streams belong to the thread that made them, so loading and generating share one dedicated thread
rather than a fresh Textual thread worker per turn. The UI talks to the backend with method calls that return
at once; the backend answers with the dataclass Messages below, posted to whatever `post` the caller gave
(a Screen's `post_message`, which is thread-safe). Streaming text is batched to at most `fps` posts a second.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from textual.message import Message

from .attachments import Attachment

log = logging.getLogger(__name__)

Post = Callable[[Message], Any]
Progress = Callable[[int, int, str], None]


@dataclass
class Settings:
    """Generation settings the user can change; never part of the model config."""

    system_prompt: str = ""
    enable_thinking: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    max_tokens: int = 1024

    def sampling(self) -> dict:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclass
class Stats:
    ttft: float = 0.0
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    context_used: int = 0
    context_limit: int = 0


class Session(Protocol):
    """What mlx_gemma4.ChatSession offers the app."""

    messages: list[dict]
    context_used: int
    context_limit: int

    def send(self, text: str, **kwargs: Any) -> Iterator[Any]: ...
    def regenerate(self, **kwargs: Any) -> Iterator[Any]: ...
    def load_messages(self, messages: list[dict]) -> None: ...
    def forget_last_user_turn(self) -> None: ...
    def drop_oldest_turns(self, n: int) -> None: ...
    def reset(self) -> None: ...


LoadFn = Callable[[Progress], tuple[Any, Any]]
SessionFactory = Callable[[Any, Any, Settings], Session]


def chat_session(model: Any, processor: Any, settings: Settings) -> Session:
    from mlx_gemma4.chat import ChatSession

    return ChatSession(model, processor, system_prompt=settings.system_prompt or None,
                       enable_thinking=settings.enable_thinking)


# Control characters (a random model writes plenty) would reach the terminal; tabs and newlines stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of streamed text, without control characters."""
    from mlx_gemma4.processing.tokenizer import split_thinking as split

    return split(_CONTROL.sub("", text))


def forget_turns_after(session: Session, n: int) -> None:
    """Take the session back to its first `n` messages: a turn that failed half way leaves nothing behind."""
    while len(session.messages) > n:
        if session.messages[-1]["role"] == "user":
            session.forget_last_user_turn()  # also drops the turn's media
        else:
            session.messages.pop()


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
class Working(Message):
    """Before the first token: `done` of `total` prompt tokens read (media are encoded with the first chunk)."""

    done: int
    total: int


@dataclass
class Streamed(Message):
    """A batch of new text: the whole thinking and answer so far, so handlers never lose a piece."""

    thinking: str
    answer: str
    stats: Stats


@dataclass
class Finished(Message):
    thinking: str
    answer: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    stats: Stats
    context_full: bool = False


@dataclass
class GenerationFailed(Message):
    error: str
    context_full: bool = False


@dataclass
class Backend:
    """Owns the model, the chat session and the thread they live on."""

    name: str
    load_fn: LoadFn
    session_factory: SessionFactory = chat_session
    demo: bool = False
    fps: float = 20.0
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self._stop = threading.Event()
        self._busy = threading.Event()
        self.model: Any = None
        self.processor: Any = None
        self.session: Session | None = None

    @property
    def loaded(self) -> bool:
        return self.session is not None

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def _submit(self, fn: Callable, *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    # -- loading ---------------------------------------------------------------------------------

    def load(self, post: Post) -> Future:
        return self._submit(self._load, post)

    def _load(self, post: Post) -> None:
        try:
            self.model, self.processor = self.load_fn(lambda d, t, desc="": post(LoadProgress(d, t, desc)))
            self.session = self.session_factory(self.model, self.processor, self.settings)
        except Exception as e:  # shown in the app, which keeps running
            log.exception("loading failed")
            post(LoadFailed(f"{type(e).__name__}: {e}" if not str(e).startswith(type(e).__name__) else str(e)))
            return
        post(ModelLoaded(self.name, int(getattr(self.session, "context_limit", 0) or 0)))

    # -- conversation state ------------------------------------------------------------------------

    def new_session(self, messages: list[dict] | None = None) -> Future:
        """Start over with the current settings, optionally with earlier messages (resume)."""
        return self._submit(self._new_session, messages or [])

    def _new_session(self, messages: list[dict]) -> None:
        if self.model is None and self.session is None:
            return
        self.session = self.session_factory(self.model, self.processor, self.settings)
        if messages:
            system = self.settings.system_prompt
            if system and messages[0]["role"] != "system":  # load_messages replaces the whole conversation
                messages = [{"role": "system", "content": system}, *messages]
            self.session.load_messages(messages)

    def set_thinking(self, on: bool) -> Future:
        self.settings.enable_thinking = on
        return self._submit(self._apply_settings)

    def _apply_settings(self) -> None:
        s = self.session
        if s is None:
            return
        for attr, value in (("enable_thinking", self.settings.enable_thinking),
                            ("system_prompt", self.settings.system_prompt or None)):
            if hasattr(s, attr):
                setattr(s, attr, value)

    def apply_settings(self) -> Future:
        return self._submit(self._apply_settings)

    def drop_oldest_turns(self, n: int) -> Future:
        return self._submit(lambda: self.session and self.session.drop_oldest_turns(n))

    def context(self) -> tuple[int, int]:
        s = self.session
        return (int(getattr(s, "context_used", 0) or 0), int(getattr(s, "context_limit", 0) or 0)) if s else (0, 0)

    # -- generation --------------------------------------------------------------------------------

    def send(self, post: Post, text: str, attachments: list[Attachment] = ()) -> Future:
        media = {
            "images": [str(a.path) for a in attachments if a.kind == "image"],
            "audio": [str(a.path) for a in attachments if a.kind == "audio"],
            "videos": [str(a.path) for a in attachments if a.kind == "video"],
        }
        media = {k: v for k, v in media.items() if v}
        self._stop.clear()
        self._busy.set()
        return self._submit(self._generate, post, lambda kw: self.session.send(text, **media, **kw))

    def regenerate(self, post: Post) -> Future:
        self._stop.clear()
        self._busy.set()
        return self._submit(self._generate, post, lambda kw: self.session.regenerate(**kw), True)

    def cancel(self) -> None:
        """Ask the running generation to stop after the current token; the partial answer is kept."""
        self._stop.set()

    def _generate(self, post: Post, start: Callable[[dict], Iterator[Any]], regenerate: bool = False) -> None:
        from mlx_gemma4.errors import ContextLengthError

        text, stats, reason = "", Stats(), "stop"
        last_post = 0.0
        kept = len(self.session.messages) if self.session is not None else 0
        try:
            if self.session is None:
                raise RuntimeError("No model is loaded.")
            self._apply_settings()
            # closing(): the session files the (partial) answer when its generator closes.
            kwargs = dict(self.settings.sampling(), should_stop=self._stop.is_set,
                          progress=lambda done, total: post(Working(done, total)))
            with closing(start(kwargs)) as stream:
                for r in stream:
                    text += r.text or ""
                    stats = self._stats(r)
                    if r.finish_reason:
                        reason = r.finish_reason
                        break
                    now = time.monotonic()
                    if now - last_post >= 1.0 / self.fps:
                        last_post = now
                        post(Streamed(*split_thinking(text), stats))
            if self._stop.is_set() and reason == "stop":
                reason = "cancelled"
        except Exception as e:
            # ChatSession drops a new turn that does not fit or cannot be processed; one that failed while
            # answering is dropped here, so the session matches the app, which puts the text back in the prompt.
            if self.session is not None and not regenerate:
                forget_turns_after(self.session, kept)
            self._busy.clear()
            if isinstance(e, ContextLengthError):
                post(GenerationFailed(str(e), context_full=True))
            else:
                log.exception("generation failed")
                post(GenerationFailed(f"{type(e).__name__}: {e}"))
            return
        used, limit = self.context()
        stats.context_used, stats.context_limit = used or stats.context_used, limit or stats.context_limit
        full = reason == "length" and limit > 0 and used >= limit - 1
        self._busy.clear()
        post(Finished(*split_thinking(text), reason, stats, context_full=full))

    def _stats(self, r: Any) -> Stats:
        used, limit = self.context()
        return Stats(
            ttft=float(getattr(r, "ttft", 0.0) or 0.0),
            prompt_tokens=int(getattr(r, "prompt_tokens", 0) or 0),
            prompt_tps=float(getattr(r, "prompt_tps", 0.0) or 0.0),
            generation_tokens=int(getattr(r, "generation_tokens", 0) or 0),
            generation_tps=float(getattr(r, "generation_tps", 0.0) or 0.0),
            peak_memory_gb=float(getattr(r, "peak_memory_gb", 0.0) or getattr(r, "peak_memory", 0.0) or 0.0),
            context_used=used,
            context_limit=limit,
        )

    def shutdown(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
