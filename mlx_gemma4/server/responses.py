"""A chat session's streamed responses as OpenAI chat-completion objects.

The session already splits each piece into thinking, answer text and completed tool calls (tool_use.AnswerStream);
``Answer`` turns those into deltas (``reasoning_content``, ``content``, structured ``tool_calls``) and applies the
request's stop strings to the answer text, holding back only what may be the start of one. The same deltas,
joined, make the whole message of a non-streamed request.
"""

from __future__ import annotations

import json
from typing import Any

from ..chat import ChatResponse
from ..generation import GenerationResponse
from ..tools import ToolCall


class Answer:
    """``stop``: strings that end the answer text. ``one_call``: the answer ends with its first tool call (a request
    with ``parallel_tool_calls: false``); the model may have gone on to write more calls. ``callable_tools``: the names
    of the tools the request lets the model call (None: any); a call of any other (none declared, another name, or
    ``tool_choice: "none"``) stays in the answer text as the model wrote it, as a call that does not parse does:
    OpenAI never returns a call the request did not declare."""

    def __init__(self, stop: list[str] | None = None, one_call: bool = False,
                 callable_tools: frozenset[str] | None = None) -> None:
        self.stop = list(stop or [])
        self.one_call = one_call
        self.callable_tools = callable_tools
        self.stopped = False                # a stop string (or the one call allowed) ended the answer
        self.calls: list[ToolCall] = []
        self._held = ""                     # answer text that may be the start of a stop string

    def feed(self, r: ChatResponse) -> list[dict[str, Any]]:
        """Deltas (``{"reasoning_content": ...}``, ``{"content": ...}``, ``{"tool_calls": [...]}``) of one of
        ChatSession.stream's responses; the last one (``finish_reason`` set) also flushes what was held back."""
        if self.stopped:
            return []
        deltas: list[dict[str, Any]] = []
        if r.thinking:
            deltas.append({"reasoning_content": r.thinking})
        deltas += self._stop_filter(r.content)
        for call in [] if self.stopped else r.tool_calls:
            if self.callable_tools is not None and call.name not in self.callable_tools:
                deltas += self._stop_filter(call.raw)
                if self.stopped:
                    break
                continue
            deltas += self._flush()
            deltas.append({"tool_calls": [tool_call_json(call, len(self.calls))]})
            self.calls.append(call)
            if self.one_call:
                self.stopped = True
                break
        if r.finish_reason and not self.stopped:
            deltas += self._flush()
        return _merge(deltas)

    def _flush(self) -> list[dict[str, Any]]:
        held, self._held = self._held, ""
        return [{"content": held}] if held else []

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


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``stop`` (it may be completed next)."""
    return next((n for n in range(min(len(text), len(stop) - 1), 0, -1) if text.endswith(stop[:n])), 0)


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent deltas of the same text field joined, so one response gives at most one chunk per field."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        (key, value), = d.items()
        if out and key != "tool_calls" and list(out[-1]) == [key]:
            out[-1][key] += value
        else:
            out.append(dict(d))
    return out


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call in OpenAI's shape: arguments as a JSON string, the id the chat session gave it."""
    out: dict[str, Any] = {"id": call.id, "type": "function",
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
