"""An OpenAI chat-completions request body as this package's chat messages and generation settings.

Everything a client can get wrong is checked here, before the request joins the model's queue, and raised as a
``RequestError`` that the app turns into a 4xx JSON error. Media arrive as ``image_url`` (a ``data:`` URI or, when
the server allows it, a file path or ``file://`` URL) and ``input_audio`` (base64 with a ``format``). Decoded
bytes are written once to a content-addressed file (``MediaStore``): the chat session keys media by path, so the
same image sent again in the next turn of a conversation is recognised and the cached prefix reaches past it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import InputError, with_article

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,(?P<data>.*)", re.S)
_IMAGE_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
              "image/gif": ".gif", "image/bmp": ".bmp"}
_AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg"}
# What a chat-completions body may hold: OpenAI's fields (honoured, refused when they cannot be, or harmless to
# ignore, like 'user') and the sampling extensions other local servers take. Any other name is a typo to report,
# not a setting to drop in silence ('temprature': 0 would otherwise sample at 1.0).
_FIELDS = {"model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
           "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
           "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "moderation",
           "reasoning_effort", "response_format", "safety_identifier",
           "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
           "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
           "top_k", "min_p", "repetition_penalty", "chat_template_kwargs"}


# OpenAI's image 'detail' as the image token budget (processing/image.py SUPPORTED_SOFT_TOKENS): "low" the
# smallest, "high" the largest (small print, documents), "auto" the model's own default. One budget holds for all the
# images of a request (the processor takes one): the most detailed asked.
DETAIL_BUDGETS = {"low": 70, "auto": None, "high": 1120}
DETAIL = "_detail"   # the key a converted image part carries its detail under until parse_chat takes it out


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


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    options: dict[str, Any]                 # ChatSession.stream's keywords (sampling, max_tokens)
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool = True        # False: the answer ends with its first call
    n: int = 1                              # answers (choices) to generate, one after another
    enable_thinking: bool = False
    max_soft_tokens: int | None = None      # the images' token budget (their 'detail'); None: the model's default


class MediaStore:
    """Decoded media bytes as files named by their content, so equal bytes are the same path (and the same cached
    prompt). A long-running server must not fill the disk: past ``keep_bytes`` the files used least recently go
    (saving the same bytes again counts as a use). create_app sizes ``keep_bytes`` above what every request in
    the line can hold at once, so a file is not removed while a request that names it waits."""

    def __init__(self, folder: Path, keep_bytes: int = 2**30) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_bytes = keep_bytes

    def save(self, data: bytes, suffix: str) -> Path:
        path = self.folder / (hashlib.sha256(data).hexdigest()[:32] + suffix)
        if path.exists():
            # Used again: the newest, by its access time. Its modification time stays: the chat session knows a
            # media file by path, size and mtime, so a touched file was a changed one and every request with an
            # image or a clip was computed again from the start (its retry and its conversation's next turn too).
            st = path.stat()
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
            return path
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # a reader never sees half a file
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        files = []
        for f in self.folder.iterdir():
            if f != keep and f.suffix != ".part":
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                files.append((max(st.st_atime_ns, st.st_mtime_ns), st.st_size, f))   # (last used)
        total = sum(size for _, size, _ in files) + keep.stat().st_size
        for _, size, f in sorted(files, key=lambda t: t[0]):
            if total <= self.keep_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size


# Choices one request may ask for ('n'): they are generated one after another, each up to max_tokens long.
MAX_CHOICES = 8

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


class _TooDeep(ValueError):
    """JSON that parses but cannot be used: nested too deep, or text that is not whole characters."""


def _loads(text: str | bytes) -> Any:
    """JSON text as its value; ``_TooDeep`` past MAX_DEPTH levels (json.loads itself overflows the stack at ~1000)
    or with a lone surrogate in a string."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _TooDeep(f"nested deeper than {MAX_DEPTH} levels") from None
    why = _unreadable(value)
    if why is not None:
        raise _TooDeep(why)
    return value


def parse_body(raw: bytes, content_type: str | None = None) -> dict[str, Any]:
    """The JSON object of a request body. ``content_type`` (the request's header) is only named when the body is
    no JSON: a form or a file upload sent to a JSON API (its type is not checked otherwise, as curl's ``-d`` sends
    JSON as a form)."""
    if not raw.strip():
        raise RequestError("The request body is empty; send a JSON object with 'model' and 'messages' "
                           "(Content-Type: application/json).")
    try:
        body = _loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, _TooDeep) as e:
        sent = f" It was sent as {content_type.split(';')[0].strip()!r}." if content_type and "json" not in \
            content_type.lower() and not isinstance(e, _TooDeep) else ""
        raise RequestError(f"The request body is not valid JSON ({e}); send a JSON object.{sent}") from e
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object with 'model' and 'messages'.")
    return body


def parse_chat(body: dict[str, Any], *, model_id: str, limits: Limits, media: MediaStore,
               default_thinking: bool = False) -> ChatRequest:
    """Check an OpenAI chat-completions body and turn it into a ``ChatRequest``."""
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(f"The model {model!r} is not served here; this server serves {model_id!r} "
                           "(see GET /v1/models).", status=404, param="model", code="model_not_found")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(f"Unknown field(s) {', '.join(map(repr, unknown))} in the request; check the name (this "
                           "server reads OpenAI's chat-completions fields and top_k, min_p, repetition_penalty, "
                           "chat_template_kwargs).", param=unknown[0])
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects.",
                           param="messages")
    converted = [_message(m, i, limits, media) for i, m in enumerate(messages)]
    details = {p.pop(DETAIL) for m in converted if isinstance(m.get("content"), list) for p in m["content"]
               if isinstance(p, dict) and DETAIL in p}
    # A conversation of instructions alone (a system or developer message last) is answered, as OpenAI does: the
    # model's turn follows it. An assistant message last would be answered by a second assistant turn.
    if converted[-1]["role"] not in ("user", "tool", "system"):
        raise RequestError("The last message must be a user message (or a system message, or a tool result) for the "
                           f"model to answer; it is {with_article(converted[-1]['role'])} message.", param="messages")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object like {'include_usage': true}.",
                           param="stream_options")
    unknown = sorted(set(stream_options) - {"include_usage", "include_obfuscation"})
    if unknown:   # ('include_usgae': true would give no usage, in silence)
        raise RequestError(f"Unknown field(s) {', '.join(map(repr, unknown))} in 'stream_options'; it takes "
                           "'include_usage'.", param="stream_options")
    tools, choice = _tools(body)
    options = _options(body, limits)
    if choice is not None:
        options["tool_choice"] = choice  # ChatSession.stream opens the answer with that call
    return ChatRequest(messages=converted, options=options, stream=_bool(body, "stream", False),
                       include_usage=_bool(stream_options, "include_usage", False), stop=_stop(body),
                       tools=tools, parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
                       enable_thinking=_thinking(body, default_thinking), n=_int(body, "n", 1, MAX_CHOICES, 1),
                       max_soft_tokens=_budget(details))


def _budget(details: set[str]) -> int | None:
    """The token budget for a request's images asked with these details (see DETAIL_BUDGETS)."""
    if "high" in details:
        return DETAIL_BUDGETS["high"]
    return DETAIL_BUDGETS["low"] if details == {"low"} else None


def name_saved_media(error: BaseException, req: ChatRequest, media: MediaStore) -> BaseException:
    """``error`` with the files ``media`` wrote for this request named as the parts they came from: the processor
    names the file it read (a server temp path the client never saw), the client knows ``messages[i].content[j]``."""
    message = str(error)
    for i, m in enumerate(req.messages):
        parts = m["content"] if isinstance(m["content"], list) else []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            path = Path(str(part.get(kind))) if kind in ("image", "audio") else None
            if path is not None and path.parent == media.folder and str(path) in message:
                where = f"messages[{i}].content[{j}].{'image_url' if kind == 'image' else 'input_audio'}"
                if kind == "audio" and message.startswith("Cannot decode"):
                    # (the processor's advice is about a file the user has: an ffmpeg command line naming it)
                    message = (f"Cannot decode {where}.data as audio: send base64 of a WAV, MP3, FLAC or OGG file "
                               "(with its 'format').")
                    continue
                message = message.replace(str(path), where).replace(path.name, where)
    return error if message == str(error) else RequestError(message, param="messages")


# -- sampling ------------------------------------------------------------------------------------------------------
def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a number in [{lo:g}, {hi:g}]; got {value!r}.", param=name)
    return value


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a whole number in [{lo}, {hi}]; got {value!r}.", param=name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false; got {value!r}.", param=name)
    return value


def _options(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is not None and isinstance(max_tokens, int) and not isinstance(max_tokens, bool) \
            and max_tokens > limits.max_tokens:
        raise RequestError(f"'{name}' is {max_tokens}, over this server's limit of {limits.max_tokens} tokens per "
                           "answer; ask for fewer (or start the server with a higher --max-tokens).", param=name)
    temperature, top_p = _number(body, "temperature", 0.0, 2.0, 1.0), _number(body, "top_p", 0.0, 1.0, 1.0)
    options = {"max_tokens": _int(body, name, 1, limits.max_tokens, limits.max_tokens),
               # top_p 0 keeps only the most likely token, which is greedy decoding (the sampler takes (0, 1]; 0
               # was read as 1, no cut at all).
               "temperature": 0.0 if top_p == 0 else temperature,
               "top_p": top_p or 1.0,
               "top_k": _int(body, "top_k", 0, 2**31 - 1, 0),
               "min_p": _number(body, "min_p", 0.0, 0.999, 0.0)}
    # OpenAI's seed is any 64-bit integer, and clients send -1 (llama.cpp's "any seed"): a negative seed is the
    # same 64 bits read unsigned, as MLX takes them (-1 was a 400).
    seed = _int(body, "seed", -2**63, 2**64 - 1, None)
    if seed is not None:
        options["seed"] = seed % 2**64
    penalty = _number(body, "repetition_penalty", 0.01, 10.0, None)
    if penalty is not None:
        options["repetition_penalty"] = penalty
    return options


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Settings this server cannot honour are refused rather than silently ignored."""
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"'{name}' is not supported; use 'repetition_penalty' (e.g. 1.1) instead.",
                               param=name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("Log-probabilities are not returned by this server; drop 'logprobs'.", param="logprobs")
    if body.get("functions") or body.get("function_call") is not None:
        raise RequestError("The legacy 'functions' / 'function_call' fields are not supported; send the functions "
                           "as 'tools': [{'type': 'function', 'function': {...}}] (and 'tool_choice').",
                           param="functions" if body.get("functions") else "function_call")
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported (token ids are this model's own, not OpenAI's); drop it.",
                           param="logit_bias")
    modalities = body.get("modalities")
    if (modalities is not None and modalities != ["text"]) or body.get("audio") is not None:
        raise RequestError("This server answers in text only: 'modalities' may only be [\"text\"], and 'audio' "
                           "(spoken answers) is not supported. Audio input goes in a message as an 'input_audio' "
                           "part.", param="modalities" if body.get("audio") is None else "audio")
    if body.get("moderation") is not None:
        raise RequestError("This server does not run moderation on requests or answers; drop 'moderation'.",
                           param="moderation")
    if body.get("web_search_options") is not None:
        raise RequestError("This server does not search the web; drop 'web_search_options'.",
                           param="web_search_options")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("Only 'response_format': {'type': 'text'} is supported (no JSON mode or schemas); "
                           "ask for JSON in the prompt instead.", param="response_format")


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 non-empty strings.",
                           param="stop")
    return stop


def _thinking(body: dict[str, Any], default: bool) -> bool:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RequestError(f"'chat_template_kwargs' must be an object like {{\"enable_thinking\": true}}; got "
                           f"{_json_type(kwargs)}.", param="chat_template_kwargs")
    if isinstance(kwargs, dict) and "enable_thinking" in kwargs:
        return _bool(kwargs, "enable_thinking", default)
    effort = body.get("reasoning_effort")
    if effort is None:
        return default
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise RequestError(f"'reasoning_effort' must be none, minimal, low, medium or high; got {effort!r}.",
                           param="reasoning_effort")
    return effort not in ("none", "minimal")  # Gemma 4 thinks or does not; there are no levels


def _json_type(value: Any) -> str:
    """What a JSON value is, as a client would say it: "a string", "an array", ..."""
    for kind, name in ((bool, "a boolean"), (str, "a string"), (list, "an array"), (dict, "an object"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else with_article(type(value).__name__)


# -- tools -----------------------------------------------------------------------------------------------------------
def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools to declare, and what the answer must open with: None (the model decides), "required" (a call of
    some tool), a tool's name (a call of that tool) or "none" (no call)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' asks for a tool call but no 'tools' were given.", param="tool_choice")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {'name': ..., "
                           "'description': ..., 'parameters': {...}}} objects.", param="tools")
    for i, t in enumerate(tools):
        params = t["function"].get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"'tools[{i}].function.parameters' must be a JSON Schema object like {{\"type\": "
                               f"\"object\", \"properties\": {{...}}}}; got {_json_type(params)}.", param="tools")
    if choice in (None, "auto") or (choice == "none" and not tools):
        return tools or None, None
    if choice == "none":  # declared, as OpenAI does (a conversation with calls in it reads the same), not callable
        return tools, "none"
    if not tools:
        raise RequestError("'tool_choice' asks for a tool call but 'tools' is empty.", param="tool_choice")
    if choice == "required":
        return tools, "required"
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(f"'tool_choice' names {name!r}, which is not among 'tools'.", param="tool_choice")
        return chosen, name
    raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}.", param="tool_choice")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list.", param="messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"Each of {where}.tool_calls needs a 'function' with a 'name'.", param="messages")
        args = fn.get("arguments") or {}
        if isinstance(args, str):  # OpenAI sends the arguments as a JSON string; the template wants the object
            try:
                args = _loads(args) if args.strip() else {}
            except (json.JSONDecodeError, _TooDeep) as e:
                raise RequestError(f"{where}.tool_calls: the arguments of {fn['name']!r} are not valid JSON ({e}).",
                                   param="messages") from e
        if not isinstance(args, dict):
            raise RequestError(f"{where}.tool_calls: the arguments of {fn['name']!r} must be a JSON object.",
                               param="messages")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


# -- messages and media --------------------------------------------------------------------------------------------
def _message(m: Any, i: int, limits: Limits, media: MediaStore) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise RequestError(f"{where} must be an object with a 'role' of {', '.join(ROLES)}.", param="messages")
    role = ROLES[m["role"]]
    content = m.get("content")
    out: dict[str, Any] = {"role": role}
    if content is None and role != "assistant":  # only an assistant's turn may be calls alone
        raise RequestError(f"{where} ({m['role']}) has no 'content'; give it a string or a list of parts"
                           f"{'' if 'content' in m else ' (keys sent: ' + ', '.join(map(repr, m)) + ')'}.",
                           param="messages")
    if content is None or isinstance(content, str):
        out["content"] = content or ""
    elif isinstance(content, list):
        out["content"] = [_part(p, f"{where}.content[{j}]", role, limits, media) for j, p in enumerate(content)]
    else:
        raise RequestError(f"{where}.content must be a string or a list of parts.", param="messages")
    if role == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = _tool_calls(m["tool_calls"], where)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                out[key] = m[key]
        out["content"] = _tool_result(out["content"])
    return out


def _tool_result(content: Any) -> Any:
    """A tool result that is a JSON object or array in a string (all OpenAI clients can send) as that value: the
    template writes structured results in the form the model learned for them."""
    if isinstance(content, str) and content.strip()[:1] in ("{", "["):
        try:
            return _loads(content)
        except (json.JSONDecodeError, _TooDeep):
            pass  # text that only looks like JSON (or too deep to read as such) stays text
    return content


def _part(p: Any, where: str, role: str, limits: Limits, media: MediaStore) -> dict[str, Any]:
    kind = p.get("type") if isinstance(p, dict) else None
    if kind == "text":
        if not isinstance(p.get("text"), str):
            raise RequestError(f"{where}.text must be a string; got {type(p.get('text')).__name__}.",
                               param="messages")
        return {"type": "text", "text": p["text"]}
    if kind == "refusal" and role == "assistant" and isinstance(p.get("refusal"), str):
        return {"type": "text", "text": p["refusal"]}  # OpenAI's part for an answer that declined: what it said
    if kind == "image_url":
        url = p.get("image_url")
        detail = url.get("detail", "auto") if isinstance(url, dict) else "auto"
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}.image_url needs a 'url': a data: URI or a file path.", param="messages")
        if detail not in DETAIL_BUDGETS:
            raise RequestError(f"{where}.image_url.detail must be 'low', 'high' or 'auto'; got {detail!r}.",
                               param="messages")
        return {"type": "image", "image": _image_source(url, where, limits, media), DETAIL: detail}
    if kind == "input_audio":
        audio = p.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise RequestError(f"{where}.input_audio needs 'data' (base64) and 'format' (wav, mp3, flac or ogg).",
                               param="messages")
        fmt = str(audio.get("format", "wav")).lower()
        if fmt not in _AUDIO_FORMATS:
            raise RequestError(f"{where}.input_audio.format is {fmt!r}; send wav, mp3, flac or ogg.",
                               param="messages")
        data = audio["data"]
        if data.startswith("data:"):  # some clients send the clip as a data: URI, as they send images
            m = _DATA_URI.fullmatch(data)
            if not m:
                raise RequestError(f"{where}.input_audio.data is a data: URI that is not base64 (send the base64 "
                                   "alone, or data:audio/wav;base64,...).", param="messages")
            data = m.group("data")
        return {"type": "audio", "audio": str(media.save(_b64(data, where), "." + fmt))}
    raise RequestError(f"{where} must be a part of type 'text' (with 'text'), 'image_url' or 'input_audio'"
                       f"{'' if kind is None else f'; got type {kind!r}'}.", param="messages")


def _image_source(url: str, where: str, limits: Limits, media: MediaStore) -> str:
    if url.startswith("data:"):
        m = _DATA_URI.fullmatch(url)
        if not m:
            raise RequestError(f"{where}.image_url is a data: URI that is not base64 "
                               "(use data:image/png;base64,...).", param="messages")
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise RequestError(f"{where}.image_url carries {mime!r}, not an image.", param="messages")
        return str(media.save(_b64(m.group("data"), where), _IMAGE_EXT.get(mime, ".img")))
    if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I) and not url.startswith("file://"):
        raise RequestError(f"{where}.image_url is a {url.split(':', 1)[0]} URL; this server does not download. "
                           "Send the image as a data: URI (data:image/png;base64,...).", param="messages")
    if not limits.allow_paths:
        raise RequestError(f"{where}.image_url is a file path, which this server does not accept (it was started "
                           "without --allow-paths); send a data: URI.", param="messages")
    path = unquote(urlparse(url).path) if url.startswith("file://") else url   # (file:///a%20b.png: "a b.png")
    if not Path(path).expanduser().is_file():
        raise RequestError(f"{where}.image_url names {path}, which is no file on the server's machine (paths are "
                           "read there). Check the path, or send a data: URI.", param="messages")
    return path


def _b64(data: str, where: str) -> bytes:
    """Base64 as clients write it: wrapped in lines (``base64`` on Linux and MIME wrap at 76 columns), with or
    without its ``=`` padding, in the standard or the URL-safe alphabet. Anything else is refused, not skipped."""
    data = re.sub(r"\s+", "", data)
    alt = b"-_" if ("-" in data or "_" in data) and not ("+" in data or "/" in data) else None
    data += "=" * (-len(data) % 4) if not data.endswith("=") else ""
    try:
        return base64.b64decode(data, altchars=alt, validate=True)
    except (binascii.Error, ValueError) as e:
        bad = next((c for c in data if not (c.isascii() and (c.isalnum() or c in "+/-_="))), None)
        why = f"{bad!r} is no base64 character" if bad is not None else str(e)
        raise RequestError(f"{where}: the base64 data does not decode ({why}); send the file's bytes in base64 "
                           "(data:image/png;base64,... for an image).", param="messages") from e
