"""A chat-completions request's messages as this package's chat messages: roles, text, tool calls and results,
and media. Media arrive as ``image_url`` (a ``data:`` URI or, when the server allows it, a file path or ``file://``
URL; its ``detail`` is the image token budget) and ``input_audio`` (base64 with a ``format``). Decoded bytes are
written once to a content-addressed file (``MediaStore``): the chat session keys media by path, so the same image
sent again in the next turn of a conversation is recognised and the cached prefix reaches past it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .body import Limits, RequestError, TooDeep, load_json

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,(?P<data>.*)", re.S)
_IMAGE_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
              "image/gif": ".gif", "image/bmp": ".bmp"}
_AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg"}
# OpenAI's image 'detail' as the image token budget (processing/image.py SUPPORTED_SOFT_TOKENS): "low" the
# smallest, "high" the largest (small print, documents), "auto" the model's own default. Each image has its own (the
# chat part's max_soft_tokens): one asked in "high" does not encode the others of the conversation again.
DETAIL_BUDGETS = {"low": 70, "auto": None, "high": 1120}


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


def name_saved_media(error: BaseException, req: Any, media: MediaStore) -> BaseException:
    """``error`` with the files ``media`` wrote for this request named as the parts they came from: the processor
    names the file it read (a server temp path the client never saw), the client knows ``messages[i].content[j]``."""
    text = str(error)
    for i, m in enumerate(req.messages):
        parts = m["content"] if isinstance(m["content"], list) else []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            path = Path(str(part.get(kind))) if kind in ("image", "audio") else None
            if path is not None and path.parent == media.folder and str(path) in text:
                where = f"messages[{i}].content[{j}].{'image_url' if kind == 'image' else 'input_audio'}"
                if kind == "audio" and text.startswith("Cannot decode"):
                    # (the processor's advice is about a file the user has: an ffmpeg command line naming it)
                    text = (f"Cannot decode {where}.data as audio: send base64 of a WAV, MP3, FLAC or OGG file "
                            "(with its 'format').")
                    continue
                text = text.replace(str(path), where).replace(path.name, where)
    return error if text == str(error) else RequestError(text, param="messages")


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
                args = load_json(args) if args.strip() else {}
            except (json.JSONDecodeError, TooDeep) as e:
                raise RequestError(f"{where}.tool_calls: the arguments of {fn['name']!r} are not valid JSON ({e}).",
                                   param="messages") from e
        if not isinstance(args, dict):
            raise RequestError(f"{where}.tool_calls: the arguments of {fn['name']!r} must be a JSON object.",
                               param="messages")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def message(m: Any, i: int, limits: Limits, media: MediaStore) -> dict[str, Any]:
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
            return load_json(content)
        except (json.JSONDecodeError, TooDeep):
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
        budget = DETAIL_BUDGETS[detail]   # each image its own (a chat part's max_soft_tokens)
        return {"type": "image", "image": _image_source(url, where, limits, media),
                **({} if budget is None else {"max_soft_tokens": budget})}
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
