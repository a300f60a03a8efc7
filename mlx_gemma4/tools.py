"""Function calling: tool declarations from Python functions, and tool calls out of Gemma 4's answers.

The format is the one the bundled chat template (processing/chat_template.jinja) writes and the model learned:

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:[1,2],opts:{metric:true}}<tool_call|>

Keys are bare, strings sit between two ``<|"|>`` quote tokens (no escaping exists), numbers, ``true`` / ``false``
and nested ``{...}`` / ``[...]`` are written as they are. Declarations keep the JSON-schema shape
(``{"type": "function", "function": {...}}``) that the template renders into ``<|tool>declaration:...<tool|>``.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from mlx_gemma4.errors import InputError, with_article

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORDS = {"true": True, "false": False, "null": None, "None": None}


# ---------------------------------------------------------------------------------------------------------------
# Declarations


def tool_schema(tool: Callable[..., Any] | dict[str, Any]) -> dict[str, Any]:
    """The declaration the chat template expects for ``tool``: a JSON-schema dict is returned as it is (a bare
    ``{"name", "description", "parameters"}`` is wrapped in ``{"type": "function", "function": ...}``); a plain
    function is described from its signature, type hints and Google-style docstring."""
    if isinstance(tool, dict):
        if "function" not in tool and "name" in tool:
            return {"type": "function", "function": tool}
        return tool
    if not callable(tool) or isinstance(tool, type):   # (a class, dict itself: "no signature found")
        raise InputError(f"A tool must be a function or a JSON-schema dict, not "
                         f"{'the class ' + tool.__name__ if isinstance(tool, type) else type(tool).__name__}.")
    name = getattr(tool, "__name__", None)
    if not name or name == "<lambda>":
        raise InputError("A tool function needs a name: define it with `def`, or pass a JSON-schema dict.")
    description, arg_docs = _parse_docstring(inspect.getdoc(tool) or "")
    try:
        hints = typing.get_type_hints(tool)
    except Exception as e:  # unresolvable forward references
        raise InputError(f"Cannot read the type hints of tool {name!r} ({e}); use plain built-in types.") from e
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(tool).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise InputError(f"Tool {name!r} takes *{pname}; give every argument a name and a type hint.")
        if pname not in hints:
            raise InputError(f"Parameter {pname!r} of tool {name!r} has no type hint; add one "
                             "(str, int, float, bool, list, dict, Optional or Literal).")
        prop = _hint_schema(hints[pname], f"parameter {pname!r} of tool {name!r}")
        if pname in arg_docs:
            prop = {"description": arg_docs[pname], **prop}
        properties[pname] = prop
        if param.default is param.empty:
            required.append(pname)
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def tool_schemas(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """``tool_schema`` over a list (None stays None), for callers that take tools in either form."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise InputError(f"tools must be a list of functions or JSON schemas (or None); got "
                         f"{type(tools).__name__}. Wrap a single tool in a list: tools=[get_weather].")
    return [tool_schema(t) for t in tools]


def _hint_schema(hint: Any, where: str) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is list or origin is list:
        return {"type": "array", **({"items": _hint_schema(args[0], where)} if args else {})}
    if hint is dict or origin is dict:
        if args and args[0] is not str:
            raise InputError(f"The {where} is {hint!r}: JSON objects have string keys; use dict[str, ...].")
        return {"type": "object"}
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return {**_hint_schema(rest[0], where), "nullable": True}
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) == 1 and next(iter(kinds)) in _SCALARS:
            return {"type": _SCALARS[next(iter(kinds))], "enum": list(args)}
        raise InputError(f"The {where} is {hint!r}: a Literal must list values of one type (str, int, ...).")
    raise InputError(f"The {where} has the type hint {hint!r}, which has no JSON-schema form here; use str, int, "
                     "float, bool, list[...], dict[str, ...], Optional[...] or Literal[...], or pass a schema dict.")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph on one line, {argument: description}) from a Google-style docstring."""
    paragraphs = doc.strip().split("\n\n")
    first = paragraphs[0] if paragraphs and not _is_section(paragraphs[0]) else ""
    description = " ".join(line.strip() for line in first.splitlines())
    args: dict[str, str] = {}
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:", "Parameters:")), None)
    if start is None:
        return description, args
    indent, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent or (width == 0 and _is_section(line)):
            break
        if width == indent:
            m = re.match(r"\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if not m:
                break
            current = m.group(1)
            args[current] = m.group(2).strip()
        elif current is not None:
            args[current] = (args[current] + " " + line.strip()).strip()
    return description, args


def _is_section(text: str) -> bool:
    first = text.splitlines()[0] if text.strip() else ""   # (a function without a docstring has "")
    return bool(re.match(r"\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?):\s*$", first))


# ---------------------------------------------------------------------------------------------------------------
# Calls


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: ``name`` and ``arguments`` as Python values; ``raw`` is the text it came from;
    ``id`` names it for the tool message that answers it (the model's format has none: a chat session makes one)."""

    name: str
    arguments: dict[str, Any]
    raw: str = field(default="", compare=False)
    id: str = field(default="", compare=False)

    def to_message(self) -> dict[str, Any]:
        """The entry for an assistant message's ``tool_calls``, as the chat template reads it back."""
        entry = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"id": self.id, **entry} if self.id else entry


class ToolCallError(InputError):
    """The model wrote a tool call that does not parse; ``raw`` keeps the call's text as it came."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(f"{message} in the tool call {raw!r}; show the raw text to the user or ask the model again.")
        self.raw = raw


def parse_tool_calls(text: str) -> tuple[list[ToolCall], str]:
    """Split a model answer into its tool calls and the text outside them. A call that does not parse, or is not
    closed by ``<tool_call|>``, raises ``ToolCallError`` (an ``InputError``) with the raw text in ``.raw``."""
    check_answer_text("parse_tool_calls", text)
    stream = ToolCallStream()
    events = stream.feed(text) + stream.close()
    calls = [e for e in events if isinstance(e, ToolCall)]
    return calls, "".join(e for e in events if isinstance(e, str))  # no errors: they were raised


def check_answer_text(what: str, text: Any) -> None:
    if not isinstance(text, str):
        raise InputError(f"{what} takes the model's answer as a string; got "
                         f"{'None' if text is None else with_article(type(text).__name__)}.")


class ToolCallStream:
    """Feed streamed text pieces; get back, in order, text outside calls (``str``) as soon as it cannot be the
    start of a call, and each ``ToolCall`` once its closing token has arrived. ``close()`` flushes the end.
    A call that does not parse raises ``ToolCallError``; with ``keep_errors`` it comes back as that error, in
    its place among the events, and the stream goes on."""

    def __init__(self, keep_errors: bool = False) -> None:
        self._buf = ""
        self._in_call = False
        self._keep_errors = keep_errors

    def feed(self, piece: str) -> list[str | ToolCall | ToolCallError]:
        self._buf += piece
        out: list[str | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    return out
                raw, self._buf = self._buf[:end + len(CALL_CLOSE)], self._buf[end + len(CALL_CLOSE):]
                self._in_call = False
                try:
                    out.append(parse_call(raw))
                except ToolCallError as e:
                    if not self._keep_errors:
                        raise
                    out.append(e)
                continue
            start = self._buf.find(CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self._buf, CALL_OPEN)
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                if text:
                    out.append(text)
                return out
            if start:
                out.append(self._buf[:start])
            self._buf = self._buf[start:]
            self._in_call = True

    def close(self) -> list[str | ToolCall | ToolCallError]:
        """The text still held back; an unfinished call raises ``ToolCallError`` (or is returned as one)."""
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            error = ToolCallError("The answer ended before <tool_call|>", buf)
            if self._keep_errors:
                return [error]
            raise error
        return [buf] if buf else []


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``token`` (it may be completed next)."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0


def parse_call(raw: str) -> ToolCall:
    """One ``<|tool_call>call:NAME{...}<tool_call|>`` (the markers are optional) as a ``ToolCall``."""
    body = raw.removeprefix(CALL_OPEN).removesuffix(CALL_CLOSE).strip()
    m = re.match(r"call:([^\s{}<>:,]+)\s*\{", body)
    if not m:
        raise ToolCallError("Expected 'call:NAME{' at the start", raw)
    parser = _ArgParser(body, m.end() - 1, raw)
    arguments = parser.object()
    parser.skip_space()
    if parser.pos != len(body):
        raise ToolCallError(f"Unexpected text after the arguments at {body[parser.pos:parser.pos + 20]!r}", raw)
    return ToolCall(m.group(1), arguments, raw)


class _ArgParser:
    """Recursive descent over the template's argument syntax (see the module docstring)."""

    def __init__(self, text: str, pos: int, raw: str) -> None:
        self.text, self.pos, self.raw = text, pos, raw

    def fail(self, what: str) -> ToolCallError:
        near = self.text[self.pos:self.pos + 20]
        return ToolCallError(f"{what} at {near!r}" if near else f"{what} at the end", self.raw)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_space()
        if not self.text.startswith(char, self.pos):
            raise self.fail(f"Expected {char!r}")
        self.pos += len(char)

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos:self.pos + 1]

    def object(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            key = self.key()
            self.expect(":")
            out[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return out

    def array(self) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return out

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        m = re.compile(r"[^\s:{}\[\],<>]+").match(self.text, self.pos)
        if not m:
            raise self.fail("Expected a key")
        self.pos = m.end()
        return m.group()

    def string(self) -> str:
        # No escaping exists, so a quote token ends the string only where a delimiter follows it: a string may
        # hold the quote token itself, braces and commas, but not a quote token followed by , } or ].
        start = self.pos + len(QUOTE)
        end = start
        while True:
            end = self.text.find(QUOTE, end)
            if end < 0:
                raise self.fail("Unterminated string")
            after = self.text[end + len(QUOTE):].lstrip()
            if not after or after[0] in ",}]:":
                self.pos = end + len(QUOTE)
                return self.text[start:end]
            end += len(QUOTE)

    def value(self) -> Any:
        char = self.peek()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        m = re.compile(r"[A-Za-z]+").match(self.text, self.pos)
        if m and m.group() in _WORDS:
            self.pos = m.end()
            return _WORDS[m.group()]
        m = _NUMBER.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            number = m.group()
            return int(number) if re.fullmatch(r"-?\d+", number) else float(number)
        raise self.fail("Expected a value (a <|\"|>string<|\"|>, number, true, false, {...} or [...])")
