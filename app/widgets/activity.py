"""The line that says what the model is doing while nothing streams yet: encoding media, reading the prompt."""

from __future__ import annotations

import time
from typing import Callable

from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Static

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def media_words(counts: dict[str, int]) -> str:
    """{"image": 2, "video": 1} -> "2 images and 1 video"."""
    words = [f"{n} {kind}{'s' if n > 1 and kind != 'audio' else ''}" for kind, n in counts.items() if n]
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def activity_text(media: str, done: int, total: int, elapsed: float, waiting: bool = False) -> str:
    """What is happening, how far, and for how long (``waiting``: the model is still loading)."""
    if waiting:
        what = "Waiting for the model to load"
    elif total and done:
        what = f"Reading the prompt: {done:,}/{total:,} tokens"
    elif media:
        what = f"Encoding {media}" + (f" and reading {total:,} prompt tokens" if total else "")
    elif total:
        what = f"Reading the prompt ({total:,} tokens)"
    else:
        what = "Preparing the prompt"
    return f"{what} · {elapsed:.0f}s · Esc stops"


class Activity(Static):
    """Hidden unless `start()`ed; `progress()` moves it on, `stop()` hides it (the first streamed text does)."""

    DEFAULT_CSS = "Activity { height: 1; padding: 0 1; color: $text-muted; display: none; }"

    done = reactive(0)
    total = reactive(0)

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, **kwargs)
        self.media = ""
        self.waiting: Callable[[], bool] | None = None
        self.started = 0.0
        self._frame = 0
        self._timer: Timer | None = None

    @property
    def active(self) -> bool:
        return self._timer is not None

    def start(self, media: dict[str, int], waiting: Callable[[], bool] | None = None) -> None:
        """Show it; ``waiting`` says whether the model is still loading (the message waits for it)."""
        self.media = media_words(media)
        self.waiting = waiting
        self.done = self.total = 0
        self.started = time.monotonic()
        self.display = True
        if self._timer is None:
            self._timer = self.set_interval(1 / 8, self.tick)
        self.tick()

    def progress(self, done: int, total: int) -> None:
        if self.active:
            self.done, self.total = done, total
            self.tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.display = False

    def tick(self) -> None:
        self._frame = (self._frame + 1) % len(SPINNER)
        waiting = self.waiting is not None and self.waiting()
        text = activity_text(self.media, self.done, self.total, time.monotonic() - self.started, waiting)
        self.update(f"{SPINNER[self._frame]} {text}")
