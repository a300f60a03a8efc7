"""A chat session that keeps the KV cache between turns and prefills only what changed.

Each turn renders the whole conversation with the checkpoint's chat template and tokenizes it. The new token ids
are compared with those already in the cache: the common prefix is kept and only the rest is prefilled. The
template drops the model's thoughts from history, so the cached answer can differ from its re-rendering; for that
case the session keeps a snapshot of the cache taken just before the last prompt token of the previous turn and
rewinds to it (a ring buffer cannot be trimmed once it has wrapped).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator

import mlx.core as mx
import numpy as np

from . import cache as kv
from .errors import ContextLengthError
from .generation import GenerationResponse, prefill, stream_tokens

logger = logging.getLogger(__name__)


# Media part type -> the session's list of that media (and the processor keyword it is passed as).
_MEDIA_LISTS = {"image": "images", "audio": "audio", "video": "videos"}


def _media_lists(message: dict[str, Any]) -> list[str]:
    """The media list of each media part of ``message``, in order."""
    content = message["content"]
    parts = content if isinstance(content, list) else []
    return [_MEDIA_LISTS[p["type"]] for p in parts if p.get("type") in _MEDIA_LISTS]


def _runs(ids: np.ndarray, token: int) -> int:
    """How many separate runs of ``token`` there are (one run per image, audio clip or video frame)."""
    hit = ids == token
    return int((hit & ~np.concatenate([[False], hit[:-1]])).sum())


class ChatSession:
    def __init__(self, model, processor, system_prompt: str | None = None, enable_thinking: bool = False,
                 prefill_chunk: int = 2048):
        self.model = model
        self.processor = processor
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.prefill_chunk = prefill_chunk
        self.messages: list[dict[str, Any]] = []
        self._media: dict[str, list] = {"images": [], "audio": [], "videos": []}
        self.reset()

    # -- state ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self._media = {"images": [], "audio": [], "videos": []}
        self._clear_cache()

    def _clear_cache(self) -> None:
        self.cache = self.model.make_cache()
        self._cached_ids: list[int] = []
        self._snap: tuple[int, list] | None = None

    @property
    def context_used(self) -> int:
        return len(self._cached_ids)

    @property
    def context_limit(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def drop_oldest_turns(self, n: int = 1) -> None:
        """Remove the ``n`` oldest user/model exchanges (and their media); the cache is rebuilt next turn."""
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        for _ in range(n):
            if start >= len(self.messages):
                break
            for key in _media_lists(self.messages.pop(start)):
                self._media[key].pop(0)
            if start < len(self.messages) and self.messages[start]["role"] == "assistant":
                self.messages.pop(start)
        self._clear_cache()

    # -- turns ---------------------------------------------------------------------------------------------
    def send(self, text: str, images=None, audio=None, videos=None, **gen_kwargs) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the model's answer; the answer joins the history when it ends."""
        parts: list[dict[str, Any]] = []
        given = {"images": images, "audio": audio, "videos": videos}
        for kind, key in _MEDIA_LISTS.items():
            for item in given[key] or []:
                parts.append({"type": kind})
                self._media[key].append(item)
        parts.append({"type": "text", "text": text})
        self.messages.append({"role": "user", "content": parts if len(parts) > 1 else text})
        return self._answer(new_turn=True, **gen_kwargs)

    def load_messages(self, messages: list[dict[str, Any]]) -> None:
        """Replace the conversation (e.g. resuming a saved chat). Media parts carry their source under their
        kind's key or "path": ``{"type": "image", "image": "cat.png"}``."""
        self.reset()
        self.messages = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind in _MEDIA_LISTS:
                        self._media[_MEDIA_LISTS[kind]].append(part.get(kind, part.get("path")))
                        parts.append({"type": kind})
                    else:
                        parts.append(part)
                content = parts
            self.messages.append({"role": m["role"], "content": content})

    def forget_last_user_turn(self) -> None:
        """Remove the trailing user turn and its media (e.g. after it did not fit in the context)."""
        if not self.messages or self.messages[-1]["role"] != "user":
            return
        for key in _media_lists(self.messages.pop()):
            self._media[key].pop()

    def regenerate(self, **gen_kwargs) -> Iterator[GenerationResponse]:
        """Answer the last user turn again (the previous answer is dropped)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("There is no user turn to answer again.")
        return self._answer(**gen_kwargs)

    def _answer(self, new_turn: bool = False, **gen_kwargs) -> Iterator[GenerationResponse]:
        from .processing.tokenizer import split_thinking

        try:
            prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True,
                                                        enable_thinking=self.enable_thinking)
            inputs = self.processor(text=prompt, **{k: v or None for k, v in self._media.items()})
        except Exception:
            if new_turn:  # a turn that cannot be processed (bad media, ...) does not stay in the history
                self.forget_last_user_turn()
            raise
        ids = np.array(inputs["input_ids"]).reshape(-1)
        L = len(ids)
        if L >= self.context_limit:
            if new_turn:
                self.forget_last_user_turn()
            raise ContextLengthError(
                f"The conversation is {L} tokens but the model's context is {self.context_limit}. "
                "Drop the oldest turns (drop_oldest_turns) or start a new chat."
            )
        chunk = gen_kwargs.pop("prefill_chunk", self.prefill_chunk)
        progress = gen_kwargs.pop("progress", None)  # (done, total) prompt tokens, for a UI
        start = self._rewind(ids)
        t0 = time.perf_counter()
        # Prefill all but the last prompt token, snapshot, then let the generation loop take the last one.
        if start < L - 1:
            prefill(self.model, self._slice(inputs, ids, start, L - 1), self.cache, chunk, start, progress)
        self._cached_ids = ids[: L - 1].tolist()
        self._snap = (L - 1, kv.snapshot(self.cache))
        prefill_s = time.perf_counter() - t0
        tail = {"input_ids": mx.array(ids[None].astype(np.int32))}

        pieces: list[str] = []
        fed: list[int] = []
        try:
            for r in stream_tokens(self.model, self.processor, tail, self.cache, start=L - 1,
                                   on_token=fed.append, **gen_kwargs):
                pieces.append(r.text)
                # Report the whole turn's prefill (what changed since the last turn), not just its last token.
                ttft = r.ttft + prefill_s
                yield dataclasses.replace(r, prompt_tokens=L - start, ttft=ttft, prompt_tps=(L - start) / ttft)
                if r.finish_reason:
                    break
        finally:
            # Runs also when the caller stops iterating early: the partial answer is kept.
            self._cached_ids = ids.tolist() + fed
            _, answer = split_thinking("".join(pieces))
            self.messages.append({"role": "assistant", "content": self._without_placeholders(answer).strip()})

    def _without_placeholders(self, text: str) -> str:
        """A media placeholder the model happened to write must not turn into a media slot next turn."""
        special = getattr(self.processor, "special", None)
        for kind in ("image", "audio", "video"):
            tok = getattr(special, kind, None)
            if tok is not None and tok.text:
                text = text.replace(tok.text, "")
        return text

    def _rewind(self, ids: np.ndarray) -> int:
        """Make the cache hold a prefix of ``ids`` (at most all but the last token); return its length."""
        cached = self._cached_ids
        n = min(len(cached), len(ids))
        same = np.array(cached[:n], dtype=np.int64) == ids[:n]
        common = n if same.all() else int(np.argmin(same))
        target = min(common, len(ids) - 1)
        if target == len(cached):
            return target
        if self._snap is not None and self._snap[0] <= target:
            kv.restore(self.cache, self._snap[1])
            self._cached_ids = cached[: self._snap[0]]
            return self._snap[0]
        self._clear_cache()
        return 0

    def _slice(self, inputs: dict, ids: np.ndarray, start: int, end: int) -> dict:
        """Inputs for ids[start:end], with only the media whose placeholders fall in that range."""
        cfg = self.model.config
        out = {"input_ids": mx.array(ids[None, :end].astype(np.int32))}
        tail = ids[start:end]
        for keys, token in ((("pixel_values", "image_position_ids"), cfg.image_token_id),
                            (("pixel_values_videos", "video_position_ids"), cfg.video_token_id),
                            (("input_features", "input_features_mask"), cfg.audio_token_id)):
            k = _runs(tail, token)
            if k and inputs.get(keys[0]) is not None:
                for key in keys:
                    out[key] = inputs[key][-k:] if inputs.get(key) is not None else None
        return out
