"""A chat session: a KV cache over token ids that reuses the longest cached prefix of whatever it is asked.

``stream(messages)`` answers a whole conversation. The conversation is encoded (chat template, text kept as text,
see processing/chat_prompt.py), compared with the token ids already in the cache, the cache is rewound to the
longest common prefix and only the rest is prefilled. Switching conversations, resuming one, answering again and
dropping old turns are all just "a different list of messages": none needs an undo path.

``send`` / ``regenerate`` / ``drop_oldest_turns`` / ``load_messages`` keep a conversation in ``messages`` for
callers that want the session to hold it; they are thin layers over ``stream`` (conversation.py).

Function calling: ``tools`` (on the session, or per call) are declared to the model; each response splits its
piece into ``thinking``, ``content`` and completed ``tool_calls``, and the last one carries the whole ``answer``
(see tool_use.py). A turn that calls tools ends on ``<|tool_response>``; the caller appends
``answer.to_message()`` and one ``role: "tool"`` message per call, and streams again (tool_loop.py does that).

Rewinding: a growing buffer can always be cut back; a sliding ring cannot once it has wrapped, so the session
also keeps a few snapshots to fall back on: where the last few turns start, and at each prompt's end, together
with the logits of its last position. Asked the same prompt again (answer again, a client that retries), the
session restores that snapshot and the generation loop starts from the kept logits: no prompt token is computed.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import closing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np

from . import cache as kv
from .conversation import Conversation, _check_system_prompt
from .errors import ContextLengthError, InputError
from .checks import (CHAT_KWARGS, check_assistant_args, check_generation_kwargs, check_model_and_processor,
                     check_positive_int)
from .generation import GenerationResponse, PromptEnd, cancelled_response, default_stop_ids, prefill, stream_tokens
from .processing.chat_prompt import ChatEncoder, EncodedChat, Stopped, stack_inputs, strip_placeholders
from .processing.tokenizer import split_thinking
from .tool_use import Answer, AnswerStream, forced_call
from .tools import ToolCall, tool_schemas

_MAX_SNAPSHOTS = 6
_SESSION_TOOLS: Any = object()  # stream()'s default: the session's own tools


@dataclass
class ChatResponse(GenerationResponse):
    """A streamed piece of a chat answer: ``text`` as decoded, and the same piece split into ``thinking`` and
    ``content`` (answer text outside thoughts and tool calls), with the ``tool_calls`` it completed. The last
    response of a turn carries the whole ``answer``."""

    thinking: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    answer: Answer | None = None


def chat_responses(responses: Iterable[GenerationResponse], clean: Callable[[str], str] = str
                   ) -> Iterator[ChatResponse]:
    """``responses`` as ChatResponses: each piece split into thinking, content and the tool calls it completed;
    the last piece (the one with a finish reason) also carries what was held back and the whole ``answer``.
    ``clean`` is applied to content and to the answer's text (the session drops media placeholders)."""
    pieces = AnswerStream()
    for r in responses:
        thinking, content, calls = pieces.feed(r.text)
        done = {}
        if r.finish_reason:
            answer = pieces.close()
            answer.text = clean(answer.text).strip()
            done["answer"] = answer
            thinking, content, calls = (a + b for a, b in zip((thinking, content, calls), pieces.tail))
        yield ChatResponse(**{f.name: getattr(r, f.name) for f in fields(GenerationResponse)},
                           thinking=thinking, content=clean(content), tool_calls=calls, **done)


class ChatSession(Conversation):
    def __init__(self, model, processor, system_prompt: str | None = None, enable_thinking: bool = False,
                 prefill_chunk: int = 2048, tools: list[Any] | None = None, assistant=None,
                 draft_tokens: int | None = None, max_soft_tokens: int | None = None):
        """``assistant`` (from ``load_assistant``) makes every answer decode speculatively, ``draft_tokens`` per
        round (None: chosen as it goes); the answers are the same. ``max_soft_tokens`` is the token budget of each
        image and video frame, as for ``generate`` (70, 140, 280, 560 or 1120; None: the processor's default);
        ``session.max_soft_tokens`` changes it for the next turns (images already sent are encoded again)."""
        check_positive_int("prefill_chunk", prefill_chunk)
        _check_system_prompt(system_prompt)
        if not isinstance(enable_thinking, (bool, np.bool_)):
            raise InputError(f"enable_thinking must be True or False; got {enable_thinking!r:.60}.")
        check_assistant_args(model, assistant, draft_tokens)
        check_model_and_processor(model, processor, "ChatSession")
        self.tools = tools  # functions or JSON schemas (see tools.tool_schema), declared in every turn
        tool_schemas(tools)  # checked now, not at the first turn
        self.assistant, self.draft_tokens = assistant, draft_tokens
        self.model = model
        self.processor = processor
        self._system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.prefill_chunk = prefill_chunk
        self.encoder = ChatEncoder(processor)
        self.max_soft_tokens = max_soft_tokens   # checked (the property below)
        self.messages: list[dict[str, Any]] = []
        self._answers: weakref.WeakSet = weakref.WeakSet()   # send()'s answers not yet collected (see _answer)
        self._answering_on: int | None = None   # the thread an answer is streaming on
        self.last_reused = 0  # prompt tokens the last turn found in the cache
        self._max_rewind = kv.MAX_REWIND   # what the sliding rings can take back: a whole round of drafts
        self._room_for(self.assistant, self.draft_tokens)
        self._fresh_cache()
        self.reset()

    # -- the cache -------------------------------------------------------------------------------------------
    def _room_for(self, assistant: Any, draft_tokens: int | None) -> bool:
        """Make the rings' rewind room enough for rounds of ``draft_tokens`` (None: the automatic policy's most)
        with ``assistant``; True when it grew (the cache must then be made again: its rings are too small)."""
        if assistant is None:
            return False
        from .draft_length import DraftLength
        from .speculative import required_max_rewind

        k_max = draft_tokens if draft_tokens is not None else DraftLength().k_max
        need = required_max_rewind(self.model, assistant, k_max)
        grew = need > self._max_rewind
        self._max_rewind = max(self._max_rewind, need)
        return grew

    def _fresh_cache(self) -> None:
        self.cache = self.model.make_cache(max_rewind=self._max_rewind)
        self._cached = np.zeros(0, dtype=np.int64)  # keys (EncodedChat.keys) of the tokens in the cache
        self._snapshots: list[kv.Snapshot] = []  # newest last, at most _MAX_SNAPSHOTS

    @property
    def context_used(self) -> int:
        """Tokens of the last conversation this session ran (what its KV cache holds, also while it streams)."""
        return self.cache[0].offset if self.cache else len(self._cached)

    @property
    def context_limit(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Any = _SESSION_TOOLS) -> EncodedChat:
        """The token ids (and media) of ``messages`` as this session would prefill them."""
        return self.encoder.encode(messages, add_generation_prompt=add_generation_prompt,
                                   enable_thinking=self.enable_thinking, tools=self._schemas(tools))

    def _schemas(self, tools: Any) -> list[dict[str, Any]] | None:
        return tool_schemas(self.tools if tools is _SESSION_TOOLS else tools) or None

    @property
    def max_soft_tokens(self) -> int | None:
        """The token budget of each image and video frame (None: the processor's default)."""
        return self.encoder.max_soft_tokens

    @max_soft_tokens.setter
    def max_soft_tokens(self, value: int | None) -> None:
        from .processing.image import ImageProcessor

        self.encoder.max_soft_tokens = None if value is None else ImageProcessor.check_budget(value)

    def count_tokens(self, messages: list[dict[str, Any]] | None = None) -> int:
        """How many tokens of the context ``messages`` (default: this session's) take; none for no messages (a
        conversation whose every turn was dropped)."""
        messages = self.messages if messages is None else messages
        if not messages:
            return 0
        return len(self.encode(messages, add_generation_prompt=False).ids)

    def _reuse(self, enc: EncodedChat) -> tuple[int, PromptEnd | None]:
        """Rewind the cache to the longest prefix it shares with ``enc`` (never inside a media item); return its
        length, and the PromptEnd that stands in for the prefill when that is all of ``enc``. All of it is only
        reused when the same prompt ran before and its end is still kept (the generation loop starts from those
        logits); otherwise the last prompt token is left for the loop to feed."""
        cached, keys, L = self._cached, enc.keys, len(enc.keys)
        n = min(len(cached), L)
        diff = np.flatnonzero(cached[:n] != keys[:n])
        common = int(diff[0]) if diff.size else n
        end = self._end_at(L) if common == L else None
        want = L if end is not None else min(common, L - 1)
        for start, stop, _ in enc.items:
            if start < want < stop:
                want = start
        kept = kv.rewind_to(self.cache, self._snapshots, len(cached), want)
        if kept == 0 and len(cached):
            self._fresh_cache()
        self._cached = cached[:kept]
        return kept, end if kept == L else None

    def _end_at(self, n: int) -> PromptEnd | None:
        """The kept PromptEnd of the prompt whose first ``n`` tokens are in the cache, if there is one."""
        return next((s.end for s in self._snapshots if s.n == n and s.end is not None), None)

    # -- answering any conversation --------------------------------------------------------------------------
    def stream(self, messages: list[dict[str, Any]], tools: Any = _SESSION_TOOLS, tool_choice: str | None = None,
               **gen_kwargs) -> Iterator[ChatResponse]:
        """Stream the model's answer to ``messages`` (ending with a user turn, or with tool results for the calls
        of the last assistant message). ``messages`` is not changed. ``tools`` replaces the session's tools for
        this call (None: none); with tools, ``<|tool_response>`` (a call waits for its result) also stops, unless
        ``stop_ids`` are given. ``tool_choice``: "required" makes the answer open with a call of some tool, a
        tool's name with a call of that tool, "none" keeps it from calling any (None or "auto": the model decides).

        Takes stream_generate's keywords (``max_tokens``, ``temperature``, ``should_stop``, ...). Responses report
        the prompt tokens computed for this turn (``last_reused`` says how many came from the cache), and the
        peak memory of this turn. ``should_stop`` is also asked between media items and prefill chunks; a turn
        stopped before its first token ends with one response with ``token == -1`` and no text. The keywords are
        checked before any message is encoded.
        """
        self._check_stream_kwargs(gen_kwargs)
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            raise InputError("The last message is the assistant's: there is nothing to answer (a second assistant "
                             "turn would follow it). End with a user message, or with tool results for its calls.")
        schemas = self._schemas(tools)
        force = forced_call(self.processor.tokenizer, schemas, tool_choice)
        if force is not None:
            gen_kwargs["logits_processors"] = [*gen_kwargs.get("logits_processors", ()), force]
        waits = self.processor.tokenizer.convert_tokens_to_ids("<|tool_response>") if schemas else None
        if waits is not None and waits != getattr(self.processor.tokenizer.hf, "unk_token_id", None) \
                and "stop_ids" not in gen_kwargs:
            gen_kwargs["stop_ids"] = sorted(set(default_stop_ids(self.model, self.processor)) | {waits})
        # closing: a caller that stops early closes this generator, and the inner one's bookkeeping of what the
        # cache holds must run then, not whenever it is collected.
        with closing(self._stream(messages, schemas, **gen_kwargs)) as responses:
            yield from chat_responses(responses, lambda text: strip_placeholders(self.processor, text))

    def _check_stream_kwargs(self, gen_kwargs: dict[str, Any]) -> None:
        check_generation_kwargs(gen_kwargs, CHAT_KWARGS, "ChatSession.stream")
        check_assistant_args(self.model, gen_kwargs.get("assistant", self.assistant),
                             gen_kwargs.get("draft_tokens", self.draft_tokens))

    def _stream(self, messages: list[dict[str, Any]], schemas: list[dict[str, Any]] | None,
                **gen_kwargs) -> Iterator[GenerationResponse]:
        chunk = gen_kwargs.pop("prefill_chunk", self.prefill_chunk)
        if self.assistant is not None:
            gen_kwargs.setdefault("assistant", self.assistant)
            gen_kwargs.setdefault("draft_tokens", self.draft_tokens)
        progress = gen_kwargs.pop("progress", None)  # (done, total) prompt tokens, for a UI
        self._answering_on = self._this_thread()
        if self._room_for(gen_kwargs.get("assistant"), gen_kwargs.get("draft_tokens")):
            # A drafter (or longer rounds) this session's rings cannot rewind: rings with room, the prompt read
            # again (the error asked for a cache a session's user never makes).
            self._fresh_cache()
        try:
            yield from self._stream_here(messages, schemas, chunk, progress, **gen_kwargs)
        finally:
            self._answering_on = None

    def _this_thread(self) -> int:
        """This thread, which must be the one answering if any is."""
        me = threading.get_ident()
        if self._answering_on not in (None, me):
            raise InputError("This chat session is answering on another thread. A session holds one conversation's "
                             "cache and answers one turn at a time: use a session per thread, or read that answer "
                             "to its end (or close it) first.")
        return me

    def _stream_here(self, messages: list[dict[str, Any]], schemas: list[dict[str, Any]] | None, chunk: int,
                     progress: Any, **gen_kwargs) -> Iterator[GenerationResponse]:
        should_stop = gen_kwargs.get("should_stop")
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        try:
            enc = self.encoder.encode(messages, enable_thinking=self.enable_thinking, should_stop=should_stop,
                                      tools=schemas, check_media=self.model.check_media)
        except Stopped:
            yield cancelled_response(0, time.perf_counter() - t0)
            return
        L = len(enc.ids)
        if L > self.model.context_left(None):  # the model's own bound, checked before any media work
            error = self._too_long(messages, L, schemas, should_stop)
            if error is None:
                yield cancelled_response(0, time.perf_counter() - t0)
                return
            raise error
        start, end = self._reuse(enc)
        self.last_reused = start
        # The last user turn is where an answer-again or an edited message parts from this conversation: the cache
        # is snapshotted there (pass 1); the generation loop prefills the rest and answers (pass 2), with a
        # snapshot at the prompt's end, where the next turn parts from this one when the answer is re-rendered
        # differently (thoughts are dropped from history).
        split = max(start, self._last_user_turn(enc, L))
        if not self._prefill(enc, start, split, chunk, should_stop, progress):
            yield cancelled_response(self.context_used - start, time.perf_counter() - t0)
            return
        fed: list[int] = []
        tail = {"input_ids": mx.array(enc.ids[None])}
        tail.update(stack_inputs([it for s, e, it in enc.items if s >= split]))
        report = None if progress is None else (lambda d, t: progress(split - start + d, L - start))
        try:
            for r in stream_tokens(self.model, self.processor, tail, self.cache, start=split, on_token=fed.append,
                                   prefill_chunk=chunk, progress=report, prefilled=end,
                                   on_prefilled=lambda e: self._snapshot(L, e), started=t0, prompt_tokens=L - start,
                                   **gen_kwargs):
                if r.token == -1:  # stopped during the tail's prefill: the cache holds whole chunks of it
                    self._cached = enc.keys[: self.cache[0].offset]
                    yield r
                    return
                yield r
                if r.finish_reason:
                    break
        except GeneratorExit:   # the caller stopped reading: closed between tokens, the cache is whole
            raise
        except BaseException:
            # A forward that failed half way, or was interrupted (Ctrl+C) there, may have written some layers and
            # not others.
            self._fresh_cache()
            raise
        finally:
            # Also when the caller stops iterating early: what went through the model is in the cache.
            if len(self._cached) or self.cache[0].offset:
                done = self.cache[0].offset
                self._cached = (np.concatenate([enc.keys, np.array(fed, dtype=np.int64)]) if done >= L
                                else enc.keys[:done])

    def generate(self, messages: list[dict[str, Any]], **gen_kwargs) -> str:
        """The whole answer to ``messages`` (see ``stream``), without thoughts and media placeholders."""
        return self.answer_text("".join(r.text for r in self.stream(messages, **gen_kwargs)))

    def answer_text(self, streamed: str) -> str:
        """The answer part of streamed text as it is kept in a conversation: no thoughts, no media placeholders."""
        return strip_placeholders(self.processor, split_thinking(streamed)[1]).strip()

    def _snapshot(self, n: int, end: PromptEnd | None = None) -> None:
        """Keep the cache's state at ``n`` tokens (and, at a prompt's end, what its prefill left: one vocab-sized
        array per snapshot at most)."""
        self._snapshots = [s for s in self._snapshots if s.n != n] + [kv.Snapshot(n, kv.snapshot(self.cache), end)]
        del self._snapshots[:-_MAX_SNAPSHOTS]

    def _last_user_turn(self, enc: EncodedChat, L: int) -> int:
        """Where the last turn before the generation prompt starts (0 if there is none), never inside a media
        item; L - 1 at most (the generation loop needs at least one token)."""
        tok = self.processor.special.turn_open
        starts = np.flatnonzero(enc.ids[: L - 1] == tok.id) if tok is not None else np.zeros(0, dtype=np.int64)
        at = int(starts[-2]) if len(starts) >= 2 else 0
        for s, e, _ in enc.items:
            if s < at < e:
                at = s
        return min(at, L - 1)

    def _turn_starts(self, enc: EncodedChat) -> set[int]:
        """Where the last few turns start: where conversations usually part (an edited or answered-again turn,
        another chat with the same system prompt), so a snapshot is kept there."""
        tok = self.processor.special.turn_open
        return set(np.flatnonzero(enc.ids == tok.id)[-3:].tolist()) if tok is not None else set()

    def _prefill(self, enc: EncodedChat, start: int, end: int, chunk: int, should_stop, progress=None) -> bool:
        """Prefill ids[start:end], one media item at a time so a stop request lands between items; False when
        stopped (the cache keeps what was done)."""
        marks = {m for m in self._turn_starts(enc) if start < m <= end}
        cuts = sorted({e for s, e, _ in enc.items if start < e < end} | marks | {end})
        first = start
        # the total is the whole prompt's, as the generation loop reports it for the rest: one bar, not two
        report = None if progress is None else (lambda base: lambda d, t: progress(base - first + d,
                                                                                    len(enc.ids) - first))
        try:
            for cut in cuts:
                if start >= cut:
                    continue
                if should_stop is not None and should_stop():
                    return False
                inputs = {"input_ids": mx.array(enc.ids[None, :cut])}
                inputs.update(stack_inputs([it for s, e, it in enc.items if start <= s < cut]))
                if prefill(self.model, inputs, self.cache, chunk, start, report and report(start),
                           should_stop) is None:
                    self._cached = enc.keys[: self.cache[0].offset]
                    return False
                self._cached = enc.keys[:cut]
                start = cut
                if cut in marks:
                    self._snapshot(cut)
        except BaseException:
            self._fresh_cache()  # a chunk that failed half way may have written some layers and not others
            raise
        return True

    def _too_long(self, messages: list[dict[str, Any]], tokens: int, schemas=None,
                  should_stop: Callable[[], bool] | None = None) -> ContextLengthError | None:
        """The error for ``messages`` (``tokens`` long) over the context: how many of the oldest turns to drop
        (the fewest that make it fit: a binary search, as the length only falls as more go; it tried one count
        after another, each a whole encode, which took minutes on a long conversation), or that the last message
        (or the system prompt) alone does not fit. None when ``should_stop`` turned true meanwhile."""
        limit = self.context_limit
        head = 1 if messages and messages[0]["role"] == "system" else 0
        users = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= head]

        def fits(k: int) -> bool | None:
            if should_stop is not None and should_stop():
                return None
            rest = messages[:head] + messages[users[k]:]
            return len(self.encoder.encode(rest, enable_thinking=self.enable_thinking, tools=schemas).ids) <= limit

        lo, hi = 1, len(users) - 1
        last = fits(hi) if hi >= 1 else False
        if last is None:
            return None
        if last:
            while lo < hi:
                mid = (lo + hi) // 2
                ok = fits(mid)
                if ok is None:
                    return None
                lo, hi = (lo, mid) if ok else (mid + 1, hi)
            oldest = "oldest turn" if lo == 1 else f"{lo} oldest turns"
            return ContextLengthError(
                f"The conversation is {tokens} tokens but the model's context is {limit}. Drop the {oldest} or "
                "start a new chat.", tokens=tokens, limit=limit, drop_turns=lo)
        if head:
            alone = len(self.encoder.encode(messages[:head], enable_thinking=self.enable_thinking,
                                            tools=schemas).ids)
            if alone > limit:   # (it blamed the message)
                return ContextLengthError(
                    f"The system prompt alone is {alone} tokens (with the tools declared, if any), but the model's "
                    f"context is {limit}. Shorten the system prompt.", tokens=tokens, limit=limit,
                    too_long="system prompt")
        return ContextLengthError(
            f"This message needs {tokens} tokens with the conversation's start, but the model's context is "
            f"{limit}. Shorten it or send fewer or shorter attachments.", tokens=tokens, limit=limit)
