"""A request body as a JSON object, checked: what every endpoint of gemma4-serve reads first, and the error it
answers a bad request with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InputError


class RequestError(InputError):
    """A request the server refuses: ``status`` (4xx/5xx), OpenAI's error ``type``, and the ``param`` at fault."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for."""

    max_request_bytes: int = 32 * 2**20     # the whole JSON body, media included
    max_tokens: int = 4096                  # the most a request may ask to generate (also the default)
    allow_paths: bool = True                # media given as file paths on the server's machine


# Deeper JSON than any request needs (a tool's parameters schema is the deepest part) overflowed Python's stack
# while parsing or rendering the prompt: a 500 instead of the client's 400.
MAX_DEPTH = 64


def _unreadable(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why a parsed JSON value cannot become a prompt, or None: nested past ``limit``, or a string holding a lone
    UTF-16 surrogate (JSON's "\\ud83d" escape without its pair, as a client that cut an emoji in half sends), which
    no tokenizer takes (the request failed with a 500 TypeError)."""
    todo = [(value, 1, "")]
    while todo:
        v, depth, where = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"{where.lstrip('.') or 'a string'} holds a lone UTF-16 surrogate "
                        f"({ascii(v[e.start])[1:-1]}), half of a character: send whole characters")
        elif isinstance(v, (dict, list)):
            if depth > limit:
                return f"nested deeper than {limit} levels"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for key, x in items:
                todo.append((key, depth, where))  # a key is text too
                todo.append((x, depth + 1, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"))
    return None


class TooDeep(ValueError):
    """JSON that parses but cannot be used: nested too deep, or text that is not whole characters."""


def load_json(text: str | bytes) -> Any:
    """JSON text as its value; ``TooDeep`` past MAX_DEPTH levels (json.loads itself overflows the stack at ~1000)
    or with a lone surrogate in a string."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise TooDeep(f"nested deeper than {MAX_DEPTH} levels") from None
    why = _unreadable(value)
    if why is not None:
        raise TooDeep(why)
    return value


def parse_body(raw: bytes, content_type: str | None = None) -> dict[str, Any]:
    """The JSON object of a request body. ``content_type`` (the request's header) is only named when the body is
    no JSON: a form or a file upload sent to a JSON API (its type is not checked otherwise, as curl's ``-d`` sends
    JSON as a form)."""
    if not raw.strip():
        raise RequestError("The request body is empty; send a JSON object with 'model' and 'messages' "
                           "(Content-Type: application/json).")
    try:
        body = load_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, TooDeep) as e:
        sent = f" It was sent as {content_type.split(';')[0].strip()!r}." if content_type and "json" not in \
            content_type.lower() and not isinstance(e, TooDeep) else ""
        raise RequestError(f"The request body is not valid JSON ({e}); send a JSON object.{sent}") from e
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object with 'model' and 'messages'.")
    return body
