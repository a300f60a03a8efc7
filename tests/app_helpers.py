"""Helpers for the app's Pilot tests: a scripted session that speaks ChatSession's interface, an app built on it,
and waiting for a state (not for a time)."""

from __future__ import annotations

import numpy as np

import threading
import time
from pathlib import Path

from app.app import ChatApp
from app.backend import Backend, Settings
from app.history import History
from app.widgets.prompt import PromptArea
from mlx_gemma4.chat import chat_responses
from mlx_gemma4.generation import GenerationResponse

# Only a guard against a test that would hang for ever: the waits below end when the state is reached.
HANG_GUARD_S = 300.0


def piece(text: str, finish_reason: str | None = None, generation_tokens: int = 1) -> GenerationResponse:
    return GenerationResponse(text, 0, prompt_tokens=7, prompt_tps=100.0, generation_tokens=generation_tokens,
                              generation_tps=50.0, ttft=0.01, peak_memory_gb=0.5, finish_reason=finish_reason)


class ScriptedSession:
    """Speaks ChatSession's streaming interface: answers any conversation with `reply`, one word at a time,
    `delay` seconds apart (or, with `gate`, each word once the test lets it through)."""

    def __init__(self, reply: str, delay: float = 0.0, limit: int = 4096, settings: Settings | None = None,
                 gate: threading.Semaphore | None = None):
        self.reply, self.delay, self.context_limit, self.gate = reply, delay, limit, gate
        self.context_used = 0
        self.last_reused = 0
        self.calls: list[dict] = []
        self.enable_thinking = settings.enable_thinking if settings else False
        self.max_soft_tokens = None

    def stream(self, messages, **kw):
        self.calls.append(dict(kw, messages=[dict(m) for m in messages], thinking=self.enable_thinking,
                               max_soft_tokens=self.max_soft_tokens))
        return chat_responses(self._answer(kw))  # split as ChatSession splits its pieces

    def _answer(self, kw):
        words = self.reply.split(" ")
        for i, w in enumerate(words):
            if self.gate is not None:
                while not self.gate.acquire(timeout=0.01):
                    if kw["should_stop"]():
                        break
            time.sleep(self.delay)
            self.context_used += 1
            last = i == len(words) - 1
            stop = kw["should_stop"]()
            yield piece(w + ("" if last else " "), "stop" if last else ("cancelled" if stop else None), i + 1)
            if stop:
                return

    def count_tokens(self, messages):
        return sum(len(str(m["content"]).split()) for m in messages)


def user_turn(call: dict) -> tuple[str, list[str]]:
    """(text, image paths) of the last user message a session was asked to answer."""
    content = call["messages"][-1]["content"]
    if isinstance(content, str):
        return content, []
    return content[-1]["text"], [p["image"] for p in content if p["type"] == "image"]


def make_app(tmp_path: Path, reply: str = "Hello **there** friend", session: type = ScriptedSession,
             delay: float = 0.0, load=None, gate: threading.Semaphore | None = None, **kw) -> ChatApp:
    """The app over scripted sessions (kept in `app.sessions`), history under tmp_path/data."""
    sessions = []

    def factory(model, processor, settings):
        sessions.append(session(reply, delay=delay, settings=settings, gate=gate))
        return sessions[-1]

    backend = Backend("scripted", load or (lambda progress: (None, None)), session_factory=factory)
    app = ChatApp(backend, History(tmp_path / "data"), **kw)
    app.sessions = sessions
    return record_notes(app)


def record_notes(app: ChatApp) -> ChatApp:
    """Keep every toast the app shows, in order, in ``app.notes``."""
    app.notes = []
    shown = app.notify

    def notify(message, *args, **kwargs):
        app.notes.append(str(message))
        return shown(message, *args, **kwargs)

    app.notify = notify
    return app


async def until(pilot, cond) -> None:
    """Let the app run until `cond()` holds."""
    end = time.monotonic() + HANG_GUARD_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("the app never reached the awaited state")
        await pilot.pause(0.02)


async def open_screen(pilot, key: str, kind: type):
    """Press ``key`` and let the app run until a screen of ``kind`` is up and laid out; that screen."""
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, kind))
    await pilot.pause()
    return pilot.app.screen


async def send(pilot, text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")


class FakeStream:
    """Stands in for sounddevice.InputStream: the test pushes blocks through the callback."""

    def __init__(self, samplerate, channels, dtype, callback, fail_start=False):
        assert (samplerate, channels, dtype) == (16000, 1, "float32")
        self.callback = callback
        self.started = self.closed = False
        self.fail_start = fail_start

    def start(self):
        if self.fail_start:
            raise RuntimeError("device busy")
        self.started = True

    def stop(self):
        self.started = False

    def close(self):
        self.closed = True

    def feed(self, samples: np.ndarray, block: int = 1600):
        for i in range(0, len(samples), block):
            chunk = samples[i : i + block, None]  # (frames, channels) like PortAudio
            self.callback(chunk, len(chunk), None, None)


def sine(seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (amp * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


async def answered_and_counted(pilot) -> None:
    """Until the answer on show has ended and the status shows the conversation's count (made after it)."""
    from app.widgets.status import StatusBar

    app = pilot.app
    chat = app.chat_screen
    await until(pilot, lambda: not chat.generating and chat.query("ModelMessage"))
    status = chat.query_one(StatusBar)
    want = app.sessions[-1].count_tokens(chat.conversation_messages(chat.conversation_id))
    await until(pilot, lambda: status.stats.context_used == want)
