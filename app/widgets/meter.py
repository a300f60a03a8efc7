"""The recording bar: a red dot, elapsed time against the cap, a live level meter and the keys, in one line."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

KEYS = "Ctrl+R attach · Esc discard"


class LevelMeter(Static):
    level = reactive(0.0)  # 0..1
    elapsed = reactive(0.0)
    limit = reactive(30.0)

    def render(self) -> str:
        head = f"● REC {self.elapsed:4.1f}/{self.limit:.0f}s "
        room = (self.content_size.width or 80) - len(head) - len(KEYS) - 2
        width = max(4, min(24, room))
        filled = round(self.level * width)
        return f"{head}{'█' * filled}{'░' * (width - filled)}  {KEYS}"
