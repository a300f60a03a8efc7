"""The chat app driven with Pilot, over a scripted session that speaks ChatSession's interface.

These check the UI's own logic (streaming, cancel, attachments, commands, history); test_app_real.py runs
the same app on the real backend with a tiny random model.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from app.app import ChatApp
from app.backend import Backend, Settings
from app.history import History
from app.widgets.messages import ModelMessage, Notice, UserMessage
from app.widgets.prompt import PromptArea


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
    """Answers every message with `reply`, one word at a time, `delay` seconds apart."""

    def __init__(self, reply: str, delay: float = 0.0, limit: int = 4096, settings: Settings | None = None):
        self.reply, self.delay, self.context_limit = reply, delay, limit
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
                time.sleep(self.delay)
                out.append(w)
                self.context_used += 1
                last = i == len(words) - 1
                stop = kw["should_stop"]()
                yield Piece(w + ("" if last else " "), "stop" if last else ("cancelled" if stop else None),
                            generation_tokens=i + 1)
                if stop:
                    return
        finally:
            self.messages.append({"role": "assistant", "content": " ".join(out)})

    def drop_oldest_turns(self, n):
        del self.messages[: 2 * n]

    def reset(self):
        self.messages = []


def make_app(tmp_path: Path, reply: str = "Hello **there** friend", delay: float = 0.0, **kw) -> ChatApp:
    sessions = []

    def factory(model, processor, settings):
        sessions.append(ScriptedSession(reply, delay, settings=settings))
        return sessions[-1]

    backend = Backend("scripted", lambda progress: (None, None), session_factory=factory)
    app = ChatApp(backend, History(tmp_path / "data"), **kw)
    app.sessions = sessions
    return app


async def wait_for(pilot, cond, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        await pilot.pause(0.02)


async def send(pilot, text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")


def test_send_streams_and_saves(tmp_path):
    asyncio.run(_send_streams_and_saves(tmp_path))


async def _send_streams_and_saves(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "hi there")
        chat = app.chat_screen
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        msg = chat.query_one(ModelMessage)
        assert msg.answer == "Hello **there** friend"
        assert chat.query_one(UserMessage).text == "hi there"
        assert "ctx" in str(chat.query_one("#status").render())
    h = History(tmp_path / "data")
    [conv] = h.conversations()
    assert [(m.role, m.content) for m in h.messages(conv.id)] == [("user", "hi there"),
                                                                  ("assistant", "Hello **there** friend")]
