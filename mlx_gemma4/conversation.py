"""The conversation a chat session keeps for callers that want it held: ``messages``, the system prompt, and the
turns added to it (``send``, ``regenerate``, ``send_tool_results``) or dropped (``drop_oldest_turns``); each is a thin
layer over ``ChatSession.stream`` (chat.py), which answers whatever list of messages it is given.

An answer is a generator whose first step changes ``messages``: one never read changes nothing, and when one
starts, the session's other answers are closed (one still being read joins the conversation as far as it got).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from .checks import check_positive_int
from .errors import InputError, with_article
from .generation import GenerationResponse
from .media import MEDIA
from .processing.files import check_item
from .processing.processor import media_items
from .tool_use import Answer, forced_call, prepare_messages, tool_result_message
from .tools import ToolCall

if TYPE_CHECKING:
    from .chat import ChatResponse


def _check_system_prompt(text: Any) -> None:
    if text is not None and not isinstance(text, str):
        raise InputError(f"system_prompt must be a string or None; got {with_article(type(text).__name__)}.")


class Conversation:
    """ChatSession's conversation methods. They use the session's ``messages``, ``_system_prompt``, ``_answers``
    (a WeakSet), ``stream``, ``answer_text``, ``_check_stream_kwargs`` and ``_this_thread``."""

    messages: list[dict[str, Any]]

    @property
    def system_prompt(self) -> str | None:
        return self._system_prompt

    @system_prompt.setter
    def system_prompt(self, text: str | None) -> None:
        """The conversation's system message changes with it, from the next turn on (it was read only by reset();
        the turns so far stay; the cached prefix is recomputed)."""
        _check_system_prompt(text)
        self._system_prompt = text
        has = bool(self.messages) and self.messages[0]["role"] == "system"
        if text:
            self.messages[:1 if has else 0] = [{"role": "system", "content": text}]
        elif has:
            del self.messages[0]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays; the cache stays for reuse). An answer still being read
        is closed first (it would join the conversation that follows)."""
        self._close_answers()
        self.messages = [{"role": "system", "content": self._system_prompt}] if self._system_prompt else []

    def load_messages(self, messages: list[dict[str, Any]]) -> None:
        """Replace the conversation (e.g. resuming a saved chat). Media parts carry their source under their
        kind's key or "path": ``{"type": "image", "image": "cat.png"}``. History is treated like live turns."""
        if not isinstance(messages, list):
            raise InputError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts; got a "
                             f"{type(messages).__name__}.")
        prepare_messages(messages)  # roles and tool results checked now, not at the next turn
        self._close_answers()
        self.messages = [dict(m) for m in messages]

    def send(self, text: str, images=None, audio=None, videos=None, sampling_rate: int | None = None,
             **gen_kwargs) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the model's answer; the answer joins ``messages`` when it ends (a turn
        that cannot be processed, does not fit or is stopped before its first token is not kept). ``sampling_rate``
        is the rate of audio arrays (default 16 kHz), kept on their parts (``{"type": "audio", "audio": array,
        "sampling_rate": 44100}``)."""
        if not isinstance(text, str):
            raise InputError(f"text must be the message as a string; got {with_article(type(text).__name__)}.")
        if sampling_rate is not None:
            from .processing.audio_file import check_sampling_rate

            check_sampling_rate(sampling_rate)
        given = {"images": images, "audio": audio, "videos": videos}
        parts: list[dict[str, Any]] = []
        for key, kind in ((m.arg, m.kind) for m in MEDIA):
            for item in media_items(kind, given[key]):
                check_item(kind, item)   # now: a missing file or an unusable object is refused at the call
                rate = {"sampling_rate": sampling_rate} if kind == "audio" and sampling_rate is not None else {}
                parts.append({"type": kind, kind: item, **rate})
        parts.append({"type": "text", "text": text})
        return self._answer([{"role": "user", "content": parts if len(parts) > 1 else text}], **gen_kwargs)

    def regenerate(self, **gen_kwargs) -> Iterator[GenerationResponse]:
        """Answer the last user turn again (the previous answer is dropped)."""
        answered = bool(self.messages) and self.messages[-1]["role"] == "assistant"
        rest = self.messages[:-1] if answered else self.messages
        if not rest or rest[-1]["role"] != "user":
            raise InputError("There is no user turn to answer again; send a message first.")
        return self._answer(again=True, **gen_kwargs)

    def send_tool_results(self, results: list[tuple[ToolCall, Any]], **gen_kwargs) -> Iterator[ChatResponse]:
        """Answer the tool calls of the last assistant message with ``(call, result)`` pairs (a result is a
        string, a JSON value, an image or a list of parts) and stream the model's continuation."""
        last = self.messages[-1] if self.messages else {}
        if last.get("role") != "assistant" or not last.get("tool_calls"):
            raise InputError("The conversation does not end with tool calls to answer; send a message first.")
        return self._answer([tool_result_message(call, result) for call, result in results], **gen_kwargs)

    def forget_last_user_turn(self) -> None:
        """Remove the trailing user turn (e.g. after it did not fit in the context)."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def drop_oldest_turns(self, n: int = 1) -> None:
        """Remove the ``n`` oldest user/model exchanges; the next turn reuses whatever prefix still matches."""
        check_positive_int("n (how many of the oldest exchanges to drop)", n)
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        for _ in range(n):
            if start >= len(self.messages):
                break
            self.messages.pop(start)
            while start < len(self.messages) and self.messages[start]["role"] != "user":
                self.messages.pop(start)

    def _answer(self, new_turns: list[dict[str, Any]] | None = None, again: bool = False,
                **gen_kwargs) -> Iterator[ChatResponse]:
        """The answer to the conversation (with ``new_turns`` added: a user turn or tool results; or its last answer
        dropped: ``again``), as a generator whose first step changes ``messages``: one never read changes nothing,
        and when one starts, the session's other answers are closed (one still being read joins the conversation
        as far as it got, before the new turn; one never read is dropped). The keywords are checked now, not when
        reading starts."""
        self._check_stream_kwargs({k: v for k, v in gen_kwargs.items() if k not in ("tools", "tool_choice")})
        if "tools" in gen_kwargs or "tool_choice" in gen_kwargs:
            forced_call(self.processor.tokenizer, self._schemas(gen_kwargs.get("tools", self.tools)),
                        gen_kwargs.get("tool_choice"))
        answer = self._answering(list(new_turns or []), again, gen_kwargs)
        self._answers.add(answer)
        return answer

    def _close_answers(self) -> None:
        """Close the session's answers but the one running (the answer that calls this as it starts)."""
        for other in [a for a in self._answers if not a.gi_running]:
            other.close()

    def _answering(self, new_turns: list[dict[str, Any]], again: bool, gen_kwargs: dict) -> Iterator[ChatResponse]:
        self._this_thread()   # (another thread's answer is not closed from here)
        self._close_answers()
        dropped = self.messages.pop() if again and self.messages[-1]["role"] == "assistant" else None
        self.messages += new_turns
        pieces: list[str] = []
        started = False   # a token came
        answer: Answer | None = None
        try:
            for r in self.stream(self.messages, **gen_kwargs):
                started = started or r.token != -1   # (-1: stopped before the first token)
                pieces.append(r.text)
                answer = r.answer or answer
                yield r
        finally:
            if not started:
                # A turn that gave no answer (refused, too long, stopped, interrupted or closed before its first
                # token) is not kept, and an answer asked for again stays.
                if new_turns and self.messages[-len(new_turns):] == new_turns:
                    del self.messages[-len(new_turns):]
                if dropped is not None:
                    self.messages.append(dropped)
            elif answer is not None and answer.tool_calls:
                self.messages.append(answer.to_message())  # the caller appends the tool results
            elif started:
                self.messages.append({"role": "assistant", "content": self.answer_text("".join(pieces))})

