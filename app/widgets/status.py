"""Status bar: model, time to first token, prompt and generation speed, peak memory, context used / limit."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

from ..backend import Stats


class StatusBar(Static):
    model = reactive("no model")
    state = reactive("")
    thinking = reactive(False)
    stats: reactive[Stats] = reactive(Stats, always_update=True)

    def render(self) -> str:
        s = self.stats
        parts = [self.model]
        if self.state:
            parts.append(self.state)
        parts.append("thinking on" if self.thinking else "thinking off")
        if s.generation_tokens or s.prompt_tokens:
            parts += [
                f"TTFT {s.ttft:.2f}s",
                f"prompt {s.prompt_tokens} tok @ {s.prompt_tps:.1f} tok/s",
                f"gen {s.generation_tokens} tok @ {s.generation_tps:.1f} tok/s",
                f"peak {s.peak_memory_gb:.2f} GB",
            ]
        if s.context_limit:
            parts.append(f"ctx {s.context_used}/{s.context_limit}")
        return " │ ".join(parts)
