"""Tool turns in a conversation: a model answer split into thinking, text and tool calls (whole or streamed), and
tool results put back into the messages the way Gemma 4's chat template renders them.

Message shapes follow OpenAI's chat format where the template reads them:

    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                                                         "function": {"name": "f", "arguments": {"x": 1}}}]}
    {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "sunny"}

A tool's ``content`` may be a string, a JSON value (dict, list, number, ...) or a list of parts with images, audio
or video (``{"type": "image", "image": PIL.Image | path}``). The template renders a string or a list of parts on a
``tool`` message, and any JSON value on the legacy ``tool_responses`` of the assistant message
(``response:f{key:value}``, the form the model learned for structured results); ``prepare_messages`` moves results
there when no media are among them, so both kinds render. ``arguments`` given as a JSON string (as OpenAI clients
send them) are parsed, since the template writes a string verbatim between the call's braces.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import InputError, with_article
from .media import BY_KIND
from .tools import CALL_OPEN, ToolCall, ToolCallError, ToolCallStream, check_answer_text

_THINK_OPEN, _THINK_CLOSE, _THINK_LABEL = "<|channel>", "<channel|>", "thought\n"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------------------------------------
# Answers


@dataclass
class Answer:
    """A finished model answer: ``thinking``, ``text`` (outside thoughts and calls, stripped) and ``tool_calls``.
    ``error`` holds a ``ToolCallError`` when a call did not parse; its raw text is then kept in ``text``."""

    thinking: str = ""
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: ToolCallError | None = None

    def to_message(self) -> dict[str, Any]:
        """The assistant message that records this answer in a conversation. With tool calls, the thinking goes
        in ``reasoning`` (the template keeps it for the turn being answered); the text before the calls is kept
        in ``content`` but not rendered (see ``prepare_messages``)."""
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        message: dict[str, Any] = {"role": "assistant", "content": self.text,
                                   "tool_calls": [c.to_message() for c in self.tool_calls]}
        if self.thinking:
            message["reasoning"] = self.thinking
        return message


class AnswerStream:
    """Feed streamed answer text; get ``(thinking, text, calls)`` for each piece: thought text, answer text outside
    thoughts and calls (held back only while it may be the start of a marker), and the calls completed by it.
    ``close()`` flushes the end and returns the whole ``Answer`` (also kept in ``answer``). Every call gets an
    ``id``. Thoughts are ``<|channel>thought\\n...<channel|>`` blocks, as ``split_thinking`` reads them."""

    def __init__(self) -> None:
        self._calls = ToolCallStream(keep_errors=True)
        self._buf = ""
        self._in_thought = False
        self._label: str | None = None  # the start of a thought block while it may still be the label
        self._blocks: list[str] = []    # thought blocks so far
        self._text: list[str] = []
        self.answer = Answer()
        self.tail: tuple[str, str, list[ToolCall]] = ("", "", [])  # what close() let out

    def feed(self, piece: str) -> tuple[str, str, list[ToolCall]]:
        self._buf += piece
        thinking: list[str] = []
        text: list[str] = []
        calls: list[ToolCall] = []
        while True:
            # Outside a thought a closing marker with no opening one is dropped, as the whole answer drops it.
            markers = (_THINK_CLOSE,) if self._in_thought else (_THINK_OPEN, _THINK_CLOSE)
            at, marker = min(((self._buf.find(m), m) for m in markers if m in self._buf), default=(-1, ""))
            cut = at if at >= 0 else len(self._buf) - max(_partial_suffix(self._buf, m) for m in markers)
            body, self._buf = self._buf[:cut], self._buf[cut:]
            if self._in_thought:
                thinking.append(self._thought(body))
            else:
                t, c = self._outside(body)
                text.append(t)
                calls += c
            if at < 0:
                return "".join(thinking), "".join(text), calls
            self._buf = self._buf[len(marker):]
            if marker == _THINK_CLOSE and not self._in_thought:
                continue
            if self._in_thought and self._label is not None:
                self._blocks[-1] = "" if self._label == _THINK_LABEL.strip() else self._label
                self._label = None
            self._in_thought = not self._in_thought
            if self._in_thought:
                self._label = ""
                self._blocks.append("")
                if any(b.strip() for b in self._blocks[:-1]):
                    thinking.append("\n")

    def _thought(self, body: str) -> str:
        if self._label is not None:
            self._label += body
            if _THINK_LABEL.startswith(self._label) and self._label != _THINK_LABEL:
                return ""  # the label may still be arriving
            body, self._label = self._label.removeprefix(_THINK_LABEL), None
        self._blocks[-1] += body
        return body

    def _outside(self, body: str, closing: bool = False) -> tuple[str, list[ToolCall]]:
        events = self._calls.feed(body) + (self._calls.close() if closing else [])
        text, calls = [], []
        for e in events:
            if isinstance(e, ToolCall):
                calls.append(replace(e, id=new_call_id()))
            elif isinstance(e, ToolCallError):
                self.answer.error = self.answer.error or e
                text.append(e.raw)  # shown as it came, so nothing the model wrote is lost
            else:
                text.append(e)
        self.answer.tool_calls += calls
        self._text += text
        return "".join(text), calls

    def close(self) -> Answer:
        """The whole answer; an unfinished call becomes ``error``, with its raw text kept in ``text``. What was
        still held back comes out as ``tail`` ``(thinking, text, calls)``, for a stream's last piece."""
        rest, self._buf = self._buf, ""
        thinking = ""
        if self._in_thought:
            thinking = self._thought(rest)  # an unfinished thought counts as thinking in full; a half label as nothing
            rest = ""
        text, calls = self._outside(rest, closing=True)
        self.tail = (thinking, text, calls)
        self.answer.thinking = "\n".join(b.strip() for b in self._blocks if b.strip())
        self.answer.text = "".join(self._text).replace(_THINK_CLOSE, "").strip()
        return self.answer


def split_answer(text: str) -> Answer:
    """A whole answer (decoded with special tokens kept) as thinking, text and tool calls."""
    check_answer_text("split_answer", text)
    stream = AnswerStream()
    stream.feed(text)
    return stream.close()


def _partial_suffix(text: str, token: str) -> int:
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Tool results


def tool_result_message(call: ToolCall, result: Any) -> dict[str, Any]:
    """The ``tool`` message answering ``call`` with what the tool returned: a string, a JSON value, a PIL image,
    or a list of parts (``{"type": "text" | "image" | "audio" | "video", ...}``)."""
    if _is_image(result):
        result = [{"type": "image", "image": result}]
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}


def _is_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "mode")


def is_parts(content: Any) -> bool:
    """Whether ``content`` is a list of message parts (as opposed to a JSON array returned by a tool)."""
    return (isinstance(content, list) and bool(content)
            and all(isinstance(p, dict) and (p.get("type") == "text" or p.get("type") in BY_KIND) for p in content))


# What the chat template renders: a system (or, as OpenAI spells it, developer) prompt, then user turns, the model's
# turns and tool results. "developer" is the system prompt only as the first message; later the template would
# write it as a turn of a role the model does not know.
ROLES = ("system", "developer", "user", "assistant", "tool")


def check_role(role: Any, i: int) -> None:
    """Raise InputError unless message ``i`` may have ``role``."""
    if role not in ROLES:
        raise InputError(f"Message {i} has the role {role!r}; use one of " + ", ".join(map(repr, ROLES)) + ".")
    if role == "developer" and i > 0:
        raise InputError(f"Message {i} has the role 'developer', which the chat template reads only as the first "
                         "message (the system prompt); move it first or make it a 'system' or 'user' message.")


def prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` in the form the chat template renders (the list and its messages are not changed):
    arguments given as JSON strings are parsed, tool results without media move onto their assistant message's
    ``tool_responses`` (where JSON values render natively), keyed by the name of the call they answer, and the
    text of an assistant message with tool calls is left out (the template would write it after the results and
    close the model's turn before the answer it writes from them)."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts; got "
                         f"{with_article(type(messages).__name__)}. Wrap a single message in a list.")
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        if not isinstance(m, dict) or "role" not in m:
            raise InputError(f"Message {i} is {m!r}; each message is a dict with a 'role' and a 'content'.")
        check_role(m["role"], i)
        if m["role"] != "tool":   # a tool's list may be a JSON result; anyone else's is parts
            _check_parts(m.get("content"), i)
        if m["role"] == "assistant" and m.get("tool_calls"):
            # The model writes its text before its calls, but the template writes an assistant message's text
            # after the calls and their results and closes the turn there, cutting off the answer the model
            # goes on to write from the results: the text is left out of the prompt.
            m = {**m, "content": "", "tool_calls": [_call_entry(c, i) for c in m["tool_calls"]]}
            results = []
            j = i + 1
            while j < len(messages) and isinstance(messages[j], dict) and messages[j].get("role") == "tool":
                results.append(messages[j])
                j += 1
            names = {c.get("id"): c["function"]["name"] for c in m["tool_calls"]}
            for n, r in enumerate(results, i + 1):
                rid = r.get("tool_call_id")
                if rid is not None and rid not in names and any(names):
                    # (shown to the model as a result of a tool named "unknown", in silence)
                    raise InputError(f"Message {n} answers tool_call_id {rid!r:.60}, which no call of message {i} "
                                     f"has (its calls: {', '.join(repr(c) for c in names if c)}); give the id of "
                                     "the call it answers.")
            if results and not m.get("tool_responses") and not any(is_parts(r.get("content")) for r in results):
                m["tool_responses"] = [
                    {"name": names.get(r.get("tool_call_id")) or r.get("name") or "unknown",
                     "response": "" if r.get("content") is None else r["content"]} for r in results]
                out.append(m)
                i = j
                continue
            out.append(m)
            i += 1
            continue
        if m["role"] == "tool" and not (out and (out[-1].get("tool_calls") or out[-1]["role"] == "tool")):
            raise InputError(f"Message {i} is a tool result that follows no tool call; a role 'tool' message "
                             "answers a call of the assistant message just before it (after that message's other "
                             "results).")
        if m["role"] == "tool" and not (isinstance(m.get("content"), str) or is_parts(m.get("content"))):
            # Beside media, a JSON result can only be written as text; no result is empty, as in tool_responses
            # (the template would write None).
            m = {**m, "content": "" if m.get("content") is None else json.dumps(m["content"], ensure_ascii=False)}
        out.append(m)
        i += 1
    return out


def _check_parts(content: Any, index: int) -> None:
    """A list content must be parts the template renders: a part of another type (OpenAI's ``image_url``, a
    typo) would be dropped without a word, and the model would answer without it."""
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" and kind not in BY_KIND:
            raise InputError(f"Part {j} of message {index} is {part!r:.80}; a part is {{'type': 'text', 'text': "
                             "...} or {'type': 'image', 'image': path_or_picture} (likewise 'audio', 'video').")


def _call_entry(call: Any, index: int) -> dict[str, Any]:
    where = f"A tool call of message {index}"
    if isinstance(call, ToolCall):
        return call.to_message()
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InputError(f"{where} is {call!r}; write it as "
                         "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}.")
    args = fn.get("arguments")
    if args is None or args == "":
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise InputError(f"{where} ({fn['name']}) has arguments that are not JSON ({e}); pass a dict or a "
                             "JSON object string.") from e
    if not isinstance(args, dict):
        raise InputError(f"{where} ({fn['name']}) has arguments {args!r}; they must be a JSON object (a dict).")
    return {**call, "function": {**fn, "arguments": args}}


# ---------------------------------------------------------------------------------------------------------------
# Making the model call a tool


def forced_call(tokenizer: Any, schemas: list[dict[str, Any]] | None, choice: str | dict | None) -> Any:
    """A logits processor that opens the answer with a tool call, or None for ``choice`` None / "auto".

    ``choice`` is "required" (some tool: ``<|tool_call>call:`` and then one of the declared names and its ``{``;
    the model picks which: a free name was often none of them) or a tool's name (``<|tool_call>call:NAME{`` is
    forced; also in OpenAI's ``{"type": "function", "function": {"name": NAME}}``); the model writes the rest
    (``_opening``). "none": the tools stay declared but ``<|tool_call>`` is never sampled, so the answer calls
    nothing.
    """
    if isinstance(choice, dict):   # OpenAI's form of a tool's name: {"type": "function", "function": {"name": ...}}
        named = choice.get("function") if choice.get("type", "function") == "function" else None
        if not isinstance(named, dict) or not isinstance(named.get("name"), str):
            raise InputError(f"tool_choice={choice!r}: give a tool's name, or {{'type': 'function', 'function': "
                             "{'name': NAME}}, 'required', 'auto' or 'none'.")
        choice = named["name"]
    if choice in (None, "auto"):
        return None
    import mlx.core as mx

    if choice == "none":
        ids = tokenizer.encode(CALL_OPEN, add_special_tokens=False)
        if len(ids) != 1:  # no token opens a call in this vocabulary: nothing to keep from being sampled
            return None
        opens = ids[0]

        def no_call(history: mx.array, logits: mx.array) -> mx.array:
            return mx.where(mx.arange(logits.shape[-1]) == opens, mx.array(-mx.inf, dtype=logits.dtype), logits)

        return no_call
    names = [s["function"]["name"] for s in schemas or []]
    if not names:
        raise InputError(f"tool_choice={choice!r} needs tools; declare them (tools=[...]) or leave tool_choice out.")
    if choice != "required" and choice not in names:
        raise InputError(f"tool_choice={choice!r} is not a declared tool ({', '.join(names)}); name one of them, "
                         "or use 'required' or 'auto'.")
    return _opening(tokenizer, names if choice == "required" else [choice])


def _opening(tokenizer: Any, names: list[str]) -> Any:
    """A logits processor that opens the answer with ``<|tool_call>call:NAME{`` for one of ``names``: at each of
    those tokens, only the next token of the openings that agree with what came so far. What came is read (a few
    tokens' wait for the device, once per answer) only where the names part ways: for one name, only the
    history's length (the first call sees the prompt)."""
    import mlx.core as mx
    import numpy as np

    openings = [tokenizer.encode(CALL_OPEN + f"call:{n}{{", add_special_tokens=False) for n in names]
    longest = max(map(len, openings))
    start: list[int] = []

    def force(history: mx.array, logits: mx.array) -> mx.array:
        if not start:
            start.append(history.shape[-1])
        k = history.shape[-1] - start[0]
        if k >= longest:
            return logits
        live = openings
        if any(o[:k] != openings[0][:k] for o in openings):   # the names parted ways: what came decides
            so_far = history[start[0]:].tolist()
            live = [o for o in openings if o[:k] == so_far]
        allowed = {o[k] for o in live if len(o) > k}
        if not allowed:   # past the opening (a name that is a prefix of another's was written whole)
            return logits
        keep = np.zeros(logits.shape[-1], dtype=bool)
        keep[sorted(allowed)] = True
        return mx.where(mx.array(keep), logits, mx.array(-mx.inf, dtype=logits.dtype))

    return force
