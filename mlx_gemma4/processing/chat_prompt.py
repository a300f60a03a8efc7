"""Chat messages as token ids, with the messages' text kept as text.

The chat template renders the conversation after every text the messages carry has been swapped for a
sentinel, so the special tokens and media placeholders of the rendered string are the template's own. The string
is then cut at those special tokens: each run of plain text between two of them (template text with the messages'
text put back) is tokenized with special-token parsing off, and each special token is written as its id. For text
without control tokens this gives exactly the ids of ``processor(text=apply_chat_template(messages))``; a
``<turn|>``, ``<eos>`` or ``<|image|>`` typed by a user becomes those characters, never the control token.

Media are preprocessed one item at a time and kept by source, so a conversation encoded again every turn does not
decode its images and videos again, and a caller can stop between items.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError, with_article
from ..tool_use import prepare_messages
from .files import host_array
from .tokenizer import split_thinking

MEDIA_KINDS = ("image", "audio", "video")
_SENTINEL = "\ue000{}\ue001"  # private-use characters: no tokenizer gives them a meaning
_SENTINEL_RE = r"\ue000(?P<text>\d+)\ue001"


class Stopped(Exception):
    """The caller's ``should_stop`` said stop while media were being prepared."""


@dataclass
class MediaItem:
    kind: str
    key: int                          # the same source gets the same key; keys are never reused
    inputs: dict[str, np.ndarray]     # model inputs of this item alone (batch axis first)
    run: str                          # the text its placeholder expands to


@dataclass
class EncodedChat:
    ids: np.ndarray                   # (L,) int32
    keys: np.ndarray                  # (L,) int64: ids, but a media soft token is -(its item's key), so two
                                      # different images of the same size never look like a shared prefix
    items: list[tuple[int, int, MediaItem]] = field(default_factory=list)  # soft-token span of each item


def strip_placeholders(processor, text: str) -> str:
    """``text`` without media placeholders (a model that writes one must not create a media slot)."""
    for kind in MEDIA_KINDS:
        tok = getattr(processor.special, kind)
        if tok is not None:
            text = text.replace(tok.text, "")
    return text


def _source_key(kind: str, source: Any, rate: int | None = None) -> tuple:
    if isinstance(source, (str, Path)):
        path = Path(os.path.expanduser(str(source)))
        try:
            st = path.stat()
            return (kind, str(path.resolve()), st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):   # no such file (or a name the OS refuses): the processor says so
            try:
                return (kind, str(path.resolve()))
            except (OSError, ValueError, RuntimeError):
                return (kind, str(path))
    return (kind, "object", _fingerprint(source), rate)


def _fingerprint(source: Any) -> tuple:
    """What an in-memory image, clip or video holds (its shape, type and a hash of its bytes): an array filled
    again in place, or a PIL image drawn on, is new media to the next turn (keyed by ``id()``, it was the earlier
    turn's encoding). Hashing reads the bytes once per turn (~20 ms for a 12-megapixel photo)."""
    try:
        from PIL import Image

        if isinstance(source, Image.Image):
            return (source.mode, source.size, hashlib.blake2b(source.tobytes(), digest_size=16).digest())
        frames = [source] if isinstance(source, np.ndarray) or not isinstance(source, (list, tuple)) else source
        parts = []
        for f in frames:   # a video may be a list of frames
            if isinstance(f, Image.Image):
                parts.append(_fingerprint(f))
                continue
            a = np.ascontiguousarray(host_array(f))
            if a.dtype == object:
                raise TypeError
            parts.append((a.shape, a.dtype.str, hashlib.blake2b(a.data, digest_size=16).digest()))
        return tuple(parts)
    except (TypeError, ValueError, ImportError):   # not array-like: the processor says what it is
        return ("id", id(source))


class ChatEncoder:
    """Turns chat messages into token ids and media inputs for one processor; keeps the media of the last call."""

    def __init__(self, processor, max_soft_tokens: int | None = None) -> None:
        """``max_soft_tokens``: the token budget of each image and video frame (None: the processor's)."""
        self.processor = processor
        self.max_soft_tokens = max_soft_tokens
        hf = processor.tokenizer.hf
        specials = sorted({t.content for t in hf.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
        self._special_ids = {s: hf.convert_tokens_to_ids(s) for s in specials}
        self._specials = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        self._split = re.compile(_SENTINEL_RE + ("|" + self._specials.pattern if specials else ""))
        self._placeholders = {tok.text: kind for kind in MEDIA_KINDS
                              if (tok := getattr(processor.special, kind)) is not None}
        self._soft_ids = {tok.id for kind in MEDIA_KINDS if (tok := getattr(processor.special, kind)) is not None}
        self._media: dict[tuple, tuple[Any, MediaItem]] = {}
        self._next_key = 1

    # -- text ------------------------------------------------------------------------------------------------

    def _plain_ids(self, text: str) -> list[int]:
        # split_special_tokens: a control token's text in `text` is tokenized as the characters it is made of.
        return list(self.processor.tokenizer.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def clean(self, role: str, text: str) -> str:
        """What the template would write for a text part: trimmed, and for the model's turns without thoughts
        and media placeholders (history is treated like a live answer); a tool's text as it is."""
        if role == "assistant":
            return strip_placeholders(self.processor, split_thinking(text)[1])
        return text if role == "tool" else text.strip()

    # -- media -----------------------------------------------------------------------------------------------

    def _key(self, kind: str, source: Any, rate: int | None = None, budget: int | None = None) -> tuple:
        """What tells media items apart: the source, and the budget (the part's own ``budget``, else the
        encoder's: another budget gives other tokens). A file gone since an earlier turn read it (a temporary file,
        say) is that turn's item: what the model saw, at the budget it was read with if the budget has changed
        since (it cannot be read again at the new one)."""
        key = (*_source_key(kind, source, rate),
               None if kind == "audio" else self.max_soft_tokens if budget is None else budget)
        if len(key) == 3:   # (kind, path, budget): no such file now
            read = [k for k in self._media if len(k) == 5 and k[:2] == key[:2]]
            return next((k for k in read if k[4] == key[2]), read[-1] if read else key)
        return key

    def _item(self, kind: str, source: Any, rate: int | None = None, key: tuple | None = None) -> MediaItem:
        key = self._key(kind, source, rate) if key is None else key
        if key not in self._media:
            inputs, [run] = self.processor.media_inputs(kind, [source], max_soft_tokens=key[-1], sampling_rate=rate)
            self._media[key] = (source, MediaItem(kind, self._next_key, inputs, run))  # (keeps an id() key valid)
            self._next_key += 1
        return self._media[key][1]

    # -- the call --------------------------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               enable_thinking: bool = False, should_stop: Callable[[], bool] | None = None,
               tools: list[Any] | None = None, check_media: Callable[[list[str]], None] | None = None,
               **template_kwargs: Any) -> EncodedChat:
        """``check_media(kinds)`` (the model's) may refuse the media kinds the messages hold before any is read."""
        texts: list[str] = []
        sources: list[tuple[str, Any, int | None]] = []
        rendered_messages = []

        def escaped(value: Any) -> Any:
            """A JSON value with every string swapped for a sentinel (tool arguments and results are text)."""
            if isinstance(value, str):
                texts.append(value)
                return _SENTINEL.format(len(texts) - 1)
            if isinstance(value, dict):
                return {k: escaped(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [escaped(v) for v in value]
            return value

        for m in prepare_messages(messages):
            role, content = m["role"], m.get("content")
            if content is None or isinstance(content, str):
                parts = [] if not content else [{"type": "text", "text": content}]
            elif isinstance(content, list):
                parts = content
            else:
                raise InputError(f"{with_article(str(role)).capitalize()} message's content is "
                                 f"{with_article(type(content).__name__)}; use a string or a "
                                 "list of parts like {'type': 'text', 'text': ...}.")
            out = []
            for part in parts:
                kind = part.get("type")
                if kind == "text":
                    text = self.clean(role, str(part.get("text") or ""))
                    if text:
                        texts.append(text)
                        text = _SENTINEL.format(len(texts) - 1)
                    out.append({"type": "text", "text": text})  # an empty part renders too (system: a space)
                elif kind in MEDIA_KINDS:
                    src = next((part[k] for k in (kind, "path", "url", "file") if part.get(k) is not None), None)
                    if src is None:
                        raise InputError(f"{with_article(kind).capitalize()} part of the messages has no {kind!r} "
                                         "or 'path' key to load.")
                    # an audio array's rate, when it is not 16 kHz (files carry their own); an image's (or a video
                    # frame's) own token budget, over the session's
                    sources.append((kind, src, part.get("sampling_rate") if kind == "audio" else None,
                                    _part_budget(kind, part)))
                    out.append({"type": kind})
            if isinstance(content, list):
                rendered_messages.append({"role": role, "content": out})
            else:
                rendered_messages.append({"role": role, "content": out[0]["text"] if out else ""})
            rendered_messages[-1].update(self._tool_fields(m, escaped))

        rendered = self.processor.tokenizer.apply_chat_template(
            rendered_messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
            tools=tools, **template_kwargs)
        found = [self._placeholders[m.group(0)] for m in self._specials.finditer(rendered)
                 if m.group(0) in self._placeholders] if self._specials else []
        if found != [s[0] for s in sources]:
            raise InputError("The chat template did not place every image, audio clip or video of the messages "
                             "(media are only read in user turns and tool results); move them into a user "
                             "message.")

        if check_media is not None:
            check_media([s[0] for s in sources])
        used: dict[tuple, tuple[Any, MediaItem]] = {}
        items: list[MediaItem] = []
        for kind, src, rate, budget in sources:
            if should_stop is not None and should_stop():
                raise Stopped
            key = self._key(kind, src, rate, budget)
            items.append(self._item(kind, src, rate, key))
            used[key] = self._media[key]
        self._media = used  # keep only what this conversation uses

        ids: list[int] = []
        keys: list[int] = []
        spans: list[tuple[int, int, MediaItem]] = []
        plain: list[str] = []

        def flush() -> None:
            if plain:
                new = self._plain_ids("".join(plain))
                ids.extend(new)
                keys.extend(new)
                plain.clear()

        def trusted(text: str, item: MediaItem | None = None) -> None:
            """Template text (or a media expansion): its special tokens count."""
            pos = 0
            for m in self._split.finditer(text):
                plain.append(text[pos:m.start()])
                pos = m.end()
                if m.group("text") is not None:
                    plain.append(texts[int(m.group("text"))])
                    continue
                token = m.group(0)
                if item is None and token in self._placeholders:
                    media = items[len(spans)]
                    start = len(ids)
                    trusted(media.run, media)
                    flush()
                    soft = [i for i in range(start, len(ids)) if ids[i] in self._soft_ids]
                    for i in soft:
                        keys[i] = -media.key
                    spans.append((soft[0], soft[-1] + 1, media))
                    continue
                flush()
                ids.append(self._special_ids[token])
                keys.append(self._special_ids[token])
            plain.append(text[pos:])

        tok = self.processor.tokenizer
        if not (tok.bos_token and rendered.startswith(tok.bos_token)):
            ids.extend(tok.encode("", add_special_tokens=True))  # BOS where the tokenizer adds one
            keys.extend(ids)
        trusted(rendered)
        flush()
        return EncodedChat(np.array(ids, dtype=np.int32), np.array(keys, dtype=np.int64), spans)


    @staticmethod
    def _tool_fields(message: dict[str, Any], escaped: Callable[[Any], Any]) -> dict[str, Any]:
        """The tool-use keys of a prepared message (see tool_use.prepare_messages), their text escaped."""
        out: dict[str, Any] = {k: message[k] for k in ("name", "tool_call_id") if message.get(k) is not None}
        if message.get("tool_calls"):
            out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": escaped(c["function"]["arguments"])}}
                                 for c in message["tool_calls"]]
        if message.get("tool_responses"):
            out["tool_responses"] = [{"name": r["name"], "response": escaped(r["response"])}
                                     for r in message["tool_responses"]]
        thinking = message.get("reasoning") or message.get("reasoning_content")
        if thinking:
            out["reasoning"] = escaped(str(thinking))
        return out


def stack_inputs(items: list[MediaItem]) -> dict[str, Any]:
    """The model inputs of several items as one batch (items of a kind padded to the longest along axis 1, as the
    processor pads a batch: zeros, a False mask, -1 positions)."""
    import mlx.core as mx

    out: dict[str, Any] = {}
    keys = {k for it in items for k in it.inputs}
    for key in keys:
        arrays = [np.asarray(it.inputs[key]) for it in items if key in it.inputs]
        if arrays[0].ndim >= 2:
            longest = max(a.shape[1] for a in arrays)
            fill = -1 if "position" in key else 0
            arrays = [np.pad(a, [(0, 0), (0, longest - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
                      for a in arrays]
        out[key] = mx.array(np.concatenate(arrays))
    return out


def _part_budget(kind: str, part: dict[str, Any]) -> int | None:
    """A media part's own ``max_soft_tokens`` (checked), or None."""
    budget = part.get("max_soft_tokens")
    if budget is None:
        return None
    if kind == "audio":
        raise InputError("An audio part has no token budget (its length sets its tokens); max_soft_tokens is for an "
                         "image or a video.")
    from .image import ImageProcessor

    return ImageProcessor.check_budget(budget)
