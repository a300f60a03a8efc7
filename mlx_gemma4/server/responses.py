"""The model's streamed text as OpenAI chat-completion objects.

``Answer`` splits the text as it streams into what a client shows separately: thoughts
(``<|channel>thought\\n...<channel|>``, sent as ``reasoning_content``), tool calls (``<|tool_call>...<tool_call|>``,
sent as structured ``tool_calls`` once each call is complete) and the answer itself (``content``), and applies the
request's stop strings to the answer. The same object builds streamed deltas and, joined, the whole message.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..generation import GenerationResponse
from ..tools import ToolCall, ToolCallError, ToolCallStream, _partial_suffix

THINK_OPEN, THINK_CLOSE, THINK_LABEL = "<|channel>", "<channel|>", "thought\n"


class Answer:
    def __init__(self, stop: list[str] | None = None) -> None:
        self.stop = list(stop or [])
        self.stopped = False                # a stop string ended the answer
        self.calls: list[ToolCall] = []
        self._buf = ""                      # text not yet placed (may be the start of a marker)
        self._in_thought = False
        self._label_left: str | None = None  # what of the thought label may still come
        self._calls = _Calls()
        self._held = ""                     # answer text that may be the start of a stop string

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas (``{"content": ...}``, ``{"reasoning_content": ...}``, ``{"tool_calls": [...]}``) for ``text``."""
        if self.stopped:
            return []
        self._buf += text
        deltas: list[dict[str, Any]] = []
        while self._buf and not self.stopped:
            marker = THINK_CLOSE if self._in_thought else THINK_OPEN
            at = self._buf.find(marker)
            if at < 0:
                keep = _partial_suffix(self._buf, marker)
                piece, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                deltas += self._place(piece)
                break
            piece, self._buf = self._buf[:at], self._buf[at + len(marker):]
            deltas += self._place(piece)
            self._in_thought = not self._in_thought
            self._label_left = THINK_LABEL if self._in_thought else None
        return _merge(deltas)

    def close(self) -> list[dict[str, Any]]:
        """Deltas for whatever was held back at the end of the stream."""
        if self.stopped:
            return []
        rest, self._buf = self._buf, ""
        deltas = self._place(rest)
        deltas += self._answer_text(self._calls.close())
        if self._held and not self.stopped:
            deltas.append({"content": self._held})
            self._held = ""
        return _merge(deltas)

    # -- placing text --------------------------------------------------------------------------------------------
    def _place(self, piece: str) -> list[dict[str, Any]]:
        if not piece:
            return []
        if not self._in_thought:
            return self._answer_text(self._calls.feed(piece))
        if self._label_left:  # the section's "thought\n" label is not part of the thoughts
            n = 0
            while n < min(len(piece), len(self._label_left)) and piece[n] == self._label_left[n]:
                n += 1
            self._label_left = self._label_left[n:] if n == len(piece) else ""
            piece = piece[n:]
        return [{"reasoning_content": piece}] if piece else []

    def _answer_text(self, events: list[str | ToolCall]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ToolCall):
                if self._held:
                    deltas.append({"content": self._held})
                    self._held = ""
                index = len(self.calls)
                self.calls.append(event)
                deltas.append({"tool_calls": [tool_call_json(event, index)]})
            else:
                deltas += self._stop_filter(event)
            if self.stopped:
                break
        return deltas

    def _stop_filter(self, text: str) -> list[dict[str, Any]]:
        if not self.stop:
            return [{"content": text}] if text else []
        text = self._held + text
        hits = [(text.find(s), s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            self._held = ""
            at = min(hits)[0]
            return [{"content": text[:at]}] if at else []
        keep = max(_partial_suffix(text, s) for s in self.stop)
        self._held = text[len(text) - keep:]
        out = text[:len(text) - keep]
        return [{"content": out}] if out else []


class _Calls:
    """ToolCallStream, but a call that does not parse comes out as the text it was, and no text around it is lost
    (ToolCallStream raises from the middle of a feed)."""

    def __init__(self) -> None:
        self._stream = ToolCallStream()
        self._fed = ""          # text fed since the last event that consumed all of it
        self._used = 0          # how much of _fed the events so far stand for

    def feed(self, text: str) -> list[str | ToolCall]:
        self._fed += text
        try:
            return self._account(self._stream.feed(text))
        except ToolCallError as e:
            return self._recover(e.raw)

    def close(self) -> list[str | ToolCall]:
        try:
            return self._account(self._stream.close())
        except ToolCallError as e:  # an unfinished call is shown as the text it is
            return self._recover(e.raw)

    def _account(self, events: list[str | ToolCall]) -> list[str | ToolCall]:
        self._used += sum(len(e) if isinstance(e, str) else len(e.raw) for e in events)
        self._fed, self._used = self._fed[self._used:], 0
        return events

    def _recover(self, raw: str) -> list[str | ToolCall]:
        at = self._fed.find(raw, self._used)
        before, rest = self._fed[self._used:at], self._fed[at + len(raw):]
        self._stream, self._fed, self._used = ToolCallStream(), "", 0
        return [t for t in (before, raw) if t] + (self.feed(rest) if rest else [])


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent deltas of the same text field joined, so one token gives at most one chunk per field."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        (key, value), = d.items()
        if out and key != "tool_calls" and list(out[-1]) == [key]:
            out[-1][key] += value
        else:
            out.append(dict(d))
    return out


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "call_" + secrets.token_hex(12), "type": "function",
                           "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
    return out if index is None else {"index": index, **out}


def message(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole assistant message from all of an answer's deltas."""
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls = [{k: v for k, v in c.items() if k != "index"} for d in deltas for c in d.get("tool_calls", [])]
    out: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        out["reasoning_content"] = reasoning.strip()
    if calls:
        out["tool_calls"] = calls
    return out


def finish_reason(answer: Answer, last: GenerationResponse | None) -> str:
    if answer.calls:
        return "tool_calls"
    if answer.stopped or last is None:
        return "stop"
    return {"length": "length", "context": "length"}.get(last.finish_reason or "", "stop")


def usage(last: GenerationResponse | None, cached: int) -> dict[str, Any]:
    prompt = (last.prompt_tokens if last else 0) + cached
    completion = last.generation_tokens if last and last.token != -1 else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def timings(last: GenerationResponse | None, queued_s: float, model_s: float, ahead: int) -> dict[str, Any]:
    """Where the time went (milliseconds): waiting in line, and on the model's thread from taking the request to
    its last token (what the server added is the rest of what a client measures); and how many requests were
    ahead when this one arrived."""
    return {"queued_ms": round(queued_s * 1000, 3), "model_ms": round(model_s * 1000, 3), "requests_ahead": ahead,
            "ttft_ms": round(last.ttft * 1000, 3) if last else None,
            "prompt_tokens_per_second": round(last.prompt_tps, 2) if last else None,
            "generation_tokens_per_second": round(last.generation_tps, 2) if last else None}
