"""Status bar: model, state, thinking, time to first token, tok/s, (with an assistant drafter) the share of
drafts kept, peak memory and context, in one line.

It is laid out for the width it has: at 80 columns the numbers that matter while chatting (TTFT, generation
tok/s, memory, context) always fit; the prompt speed, then the words around the numbers, then the model name go
first when space runs out.
"""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

from ..events import Stats

SEP = " · "


def short_count(n: int, scale: int | None = None) -> str:
    """1234 -> "1234", 131072 -> "131k": context sizes stay short. ``scale``: the number shown before this one, so
    that a limit under a count in thousands is in thousands too ("106k/4k", not "106k/4096")."""
    return str(n) if max(n, scale or 0) < 10_000 else f"{n / 1000:.0f}k"


def status_parts(model: str, state: str, thinking: bool, s: Stats) -> list[tuple[int, str, str]]:
    """(priority, full text, short text); lower priority is dropped first, then shortened."""
    parts = [(9, model, model)]
    if state:
        parts.append((10, state, state))
    parts.append((3, "thinking on" if thinking else "thinking off", "think" if thinking else ""))
    if s.generation_tokens or s.prompt_tokens:
        if s.generation_tokens:  # stopped before its first token: no time to first token, no speed
            parts.append((8, f"TTFT {s.ttft:.2f}s", f"TTFT {s.ttft:.1f}s"))
        parts.append(
            (2, f"prompt {s.cached_tokens} cached" if s.cached_tokens and not s.prompt_tokens  # answered again
             else f"prompt {s.prompt_tps:.0f} tok/s" + (f" +{s.cached_tokens} cached" if s.cached_tokens else ""), ""))
        if s.generation_tokens > 1:  # one token gives no rate (the library reports 0), so none is shown
            parts.append((8, f"{s.generation_tps:.1f} tok/s", f"{s.generation_tps:.0f} tok/s"))
        if s.acceptance is not None:   # speculative decoding: the share of drafted tokens the model kept
            parts.append((4, f"drafts {s.acceptance:.0%} kept", f"{s.acceptance:.0%} kept"))
        if s.peak_memory_gb:
            mem = f"{s.peak_memory_gb:.1f} GB" if s.peak_memory_gb >= 1 else f"{s.peak_memory_gb * 1000:.0f} MB"
            parts.append((7, f"{s.memory_kind} {mem}", mem))  # "peak" (MLX's allocator) or "RSS" (the process)
    if s.context_limit:
        ctx = f"{short_count(s.context_used)}/{short_count(s.context_limit, s.context_used)}"
        parts.append((8, f"ctx {ctx}", f"ctx {ctx}"))
    return parts


def fit(parts: list[tuple[int, str, str]], width: int) -> str:
    """The fullest line that fits `width`: shorten low-priority parts, then cut the model name (to 10 characters at
    least), then drop whole parts, least important first (a number cut in half said a wrong one: "ctx 32" for
    3253/4096), then cut the model name further."""
    texts = [full for _, full, _ in parts]

    def line() -> str:
        return SEP.join(t for t in texts if t)

    def cut_name(keep: int) -> None:
        if len(line()) > width and texts[0]:
            room = max(width - (len(line()) - len(texts[0])), keep)
            texts[0] = texts[0] if room >= len(texts[0]) else (texts[0][: room - 1] + "…" if room > 1 else "")

    order = sorted(range(len(parts)), key=lambda i: parts[i][0])
    for i in order:  # shorten, least important first
        if len(line()) <= width:
            return line()
        if i:  # the model name (index 0) is cut below
            texts[i] = parts[i][2]
    cut_name(min(len(texts[0]), 10))
    for i in order[:-1]:  # drop whole parts, least important first
        if len(line()) <= width:
            return line()
        if i:
            texts[i] = ""
    cut_name(0)
    return line()[:width]


class StatusBar(Static):
    model = reactive("no model")
    state = reactive("")
    thinking = reactive(False)
    stats: reactive[Stats] = reactive(Stats, always_update=True)

    def render(self) -> str:
        width = self.content_size.width or 200
        return fit(status_parts(self.model, self.state, self.thinking, self.stats), width)

    def on_resize(self) -> None:
        self.refresh()
