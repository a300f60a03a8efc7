"""The recording bar: a red dot, elapsed time against the cap, and a live level meter."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class LevelMeter(Static):
    level = reactive(0.0)  # 0..1
    elapsed = reactive(0.0)
    limit = reactive(30.0)

    def render(self) -> str:
        width = 24
        filled = round(self.level * width)
        bar = "█" * filled + "░" * (width - filled)
        return f"● REC {self.elapsed:4.1f}s / {self.limit:.0f}s  {bar}  Ctrl+R to stop and attach, Esc to discard"
