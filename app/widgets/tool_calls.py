"""A tool call the model made, shown as such: the tool's name, its arguments and what came back."""

from __future__ import annotations

import json
from typing import Any

from textual.widgets import Static

from app.backend import printable

# The app runs no tools of its own: a call is shown, and the model is told it was not run.
NOT_RUN = "not run: this chat has no tools"


def call_line(call: dict[str, Any]) -> str:
    """``name(key=value, ...)`` with the values as JSON, the way a reader scans a call."""
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in (call.get("arguments") or {}).items())
    return f"{call.get('name', '?')}({args})"


def result_line(call: dict[str, Any]) -> str:
    result = call.get("result")
    if result is None:
        return NOT_RUN
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


class ToolCallView(Static):
    """One call: ``⚙ name(arguments)`` and, below it, ``→ result``. ``call`` is a dict with "name",
    "arguments" and, once the call was answered, "result"."""

    def __init__(self, call: dict[str, Any]) -> None:
        self.call = call
        super().__init__(self.text(), classes="tool-call", markup=False)

    def text(self) -> str:
        return printable(f"⚙ {call_line(self.call)}\n→ {result_line(self.call)}")
