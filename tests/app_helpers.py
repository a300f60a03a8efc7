"""Helpers for the app's Pilot tests: a scripted session that speaks ChatSession's interface, an app built on it,
and waiting for a state (not for a time)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from app.app import ChatApp
from app.backend import Backend, Settings
from app.history import History
from app.widgets.prompt import PromptArea

# Only a guard against a test that would hang for ever: the waits below end when the state is reached.
HANG_GUARD_S = 300.0


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None
    token: int = 0
    prompt_tokens: int = 7
    prompt_tps: float = 100.0
    generation_tokens: int = 1
    generation_tps: float = 50.0
    ttft: float = 0.01
    peak_memory_gb: float = 0.5


class ScriptedSession:
    """Answers every message with `reply`, one word at a time."""

    def __init__(self, reply: str, limit: int = 4096, settings: Settings | None = None):
        self.reply, self.context_limit = reply, limit
        self.messages: list[dict] = []
        self.context_used = 0
        self.calls: list[dict] = []
        self.enable_thinking = settings.enable_thinking if settings else False

    def send(self, text, **kw):
        self.messages.append({"role": "user", "content": text})
        self.calls.append(dict(kw, text=text))
        return self._answer(kw)

    def regenerate(self, **kw):
        self.messages.pop()
        self.calls.append(dict(kw, regenerate=True))
        return self._answer(kw)

    def _answer(self, kw):
        words = self.reply.split(" ")
        out = []
        try:
            for i, w in enumerate(words):
                out.append(w)
                self.context_used += 1
                last = i == len(words) - 1
                yield Piece(w + ("" if last else " "), "stop" if last else None, generation_tokens=i + 1)
        finally:
            self.messages.append({"role": "assistant", "content": " ".join(out)})

    def load_messages(self, messages):
        self.messages = [dict(m) for m in messages]

    def forget_last_user_turn(self):
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def drop_oldest_turns(self, n):
        del self.messages[: 2 * n]

    def reset(self):
        self.messages = []


def make_app(tmp_path: Path, reply: str = "Hello **there** friend", session: type = ScriptedSession,
             **kw) -> ChatApp:
    """The app over scripted sessions (kept in `app.sessions`), history under tmp_path/data."""
    sessions = []

    def factory(model, processor, settings):
        sessions.append(session(reply, settings=settings))
        return sessions[-1]

    backend = Backend("scripted", lambda progress: (None, None), session_factory=factory)
    app = ChatApp(backend, History(tmp_path / "data"), **kw)
    app.sessions = sessions
    return app


async def until(pilot, cond) -> None:
    """Let the app run until `cond()` holds."""
    end = time.monotonic() + HANG_GUARD_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("the app never reached the awaited state")
        await pilot.pause(0.02)


async def send(pilot, text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
