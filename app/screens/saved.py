"""A saved conversation as the model reads it (``session_messages``) and as the screen draws it
(``message_widgets``)."""

from __future__ import annotations

from pathlib import Path

from ..history import SavedMessage
from ..widgets.messages import ModelMessage, UserMessage
from ..widgets.thumbnail import ImagePreview
from ..widgets.tool_calls import result_line
from .answering import finish_note


def session_messages(saved: list[SavedMessage], missing: list[str] | None = None) -> list[dict]:
    """History rows as chat messages for the model (text plus the saved copies of attachments). An answer that
    called tools becomes the calls, their results (the app runs none: the model is told so) and its text. A saved
    copy gone from the app's folder is left out, its name added to ``missing`` (every later turn failed on it,
    naming the copy's path, with advice for a file just dragged in)."""
    out = []
    for m in saved:
        calls = m.stats.get("tool_calls") if m.role == "assistant" else None
        if calls:
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": c.get("id", ""), "type": "function",
                 "function": {"name": c["name"], "arguments": c.get("arguments") or {}}} for c in calls]})
            out += [{"role": "tool", "tool_call_id": c.get("id", ""), "name": c["name"],
                     "content": result_line(c)} for c in calls]
            out.append({"role": "assistant", "content": m.content})  # closes the model's turn
            continue
        if not m.attachments:
            out.append({"role": m.role, "content": m.content})
            continue
        there = [a for a in m.attachments if a.path.is_file()]
        if missing is not None:
            missing += [a.name for a in m.attachments if a not in there]
        parts: list[dict] = [{"type": a.kind, a.kind: str(a.path)} for a in there]
        out.append({"role": m.role, "content": parts + [{"type": "text", "text": m.content}]})
    return out


# Messages drawn when a conversation opens; the earlier ones when asked (each is a Markdown widget: a conversation
# of 300 turns took 35 s to open, the screen frozen, on a 2-core machine).
SHOWN = 40


def message_widgets(saved: list[SavedMessage]) -> list:
    """The transcript's widgets for saved messages, oldest first."""
    widgets = []
    for m in saved:
        if m.role == "user":
            widgets.append(UserMessage(m.content, [(a.kind, a.path, a.label) for a in m.attachments]))
        else:
            widgets.append(ModelMessage(m.thinking, m.content, finish_note(m.stats.get("finish")),
                                        calls=m.stats.get("tool_calls")))
            if m.stats.get("annotated") and Path(m.stats["annotated"]).exists():
                widgets.append(ImagePreview(Path(m.stats["annotated"])))
    return widgets
