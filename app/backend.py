"""The one thread that owns the model: every MLX call (loading, prefill, decoding) runs on it.

MLX streams belong to the thread that made them, so loading and generating share one dedicated thread rather than
a fresh Textual thread worker per turn. The UI talks to the backend with method calls that return at once; the
backend answers with the dataclass Messages below, posted to whatever `post` the caller gave (a Screen's
`post_message`, which is thread-safe). Streaming text is batched to at most `fps` posts a second.

The backend keeps no conversation: each turn it is handed the whole conversation (from the history store) and
the chat session reuses whatever prefix of it is still in its cache. Every event names the conversation and the
turn (the id of the user message being answered) it belongs to, so the screen can drop events of a conversation
it no longer shows. Jobs run one at a time in order, so a message sent while the model loads is answered as soon
as it is ready.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from textual.message import Message

if TYPE_CHECKING:
    from mlx_gemma4.chat import ChatResponse
    from mlx_gemma4.generation import GenerationResponse

from .events import (AssistantChanged, AssistantRefused, ContextCounted, DrafterSkipped, Finished, GenerationFailed,
                     LoadFailed, LoadProgress, ModelLoaded, Stats, Streamed, Working)

log = logging.getLogger(__name__)

# The image token budgets a user can pick (0: the model's own default), processing.image.SUPPORTED_SOFT_TOKENS
# (not imported: this module loads before anything of the model's).
IMAGE_TOKENS = (0, 70, 140, 280, 560, 1120)

NO_MODEL_CHOSEN = "No model was chosen."   # load_error when the first-run dialog was closed without a choice

Post = Callable[[Message], Any]
Progress = Callable[[int, int, str], None]


@dataclass
class Settings:
    """Generation settings the user can change; never part of the model config."""

    system_prompt: str = ""
    enable_thinking: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    max_tokens: int = 1024
    assistant: str = ""             # a converted assistant drafter's folder: answers decode speculatively ("" = off)
    image_tokens: int = 0           # an image's (and a video frame's) token budget (IMAGE_TOKENS); 0: the model's

    def apply(self, session: Any) -> None:
        """What a chat session reads from these settings when it encodes the conversation (on the model thread)."""
        session.enable_thinking = self.enable_thinking
        session.max_soft_tokens = self.image_tokens or None

    def sampling(self) -> dict:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


class Session(Protocol):
    """What mlx_gemma4.ChatSession offers the app."""

    enable_thinking: bool
    context_used: int
    context_limit: int
    last_reused: int

    def stream(self, messages: list[dict], **kwargs: Any) -> Iterator[ChatResponse]: ...
    def count_tokens(self, messages: list[dict]) -> int: ...


LoadFn = Callable[[Progress], tuple[Any, Any]]
SessionFactory = Callable[[Any, Any, Settings], Session]


def chat_session(model: Any, processor: Any, settings: Settings) -> Session:
    from mlx_gemma4.chat import ChatSession

    assistant = None
    if settings.assistant:   # (one that does not fit: Backend loads the model without it and says why)
        from mlx_gemma4.assistant import load_assistant
        from mlx_gemma4.errors import Gemma4Error

        try:
            assistant = load_assistant(settings.assistant, target=model)
        except Gemma4Error as e:  # the drafter is a saved setting: say which one failed and how to drop it
            raise type(e)(f"The assistant drafter {settings.assistant} did not load: {e} To chat without it, clear "
                          "the drafter folder in the settings (F2), or start gemma4-chat with --assistant ''.") from e
    return ChatSession(model, processor, enable_thinking=settings.enable_thinking, assistant=assistant)


def release_mlx_thread() -> None:
    """Free what MLX made on the calling thread (its arrays no longer referenced, then its streams)."""
    import gc

    import mlx.core as mx

    gc.collect()
    if hasattr(mx, "clear_streams"):  # recent MLX
        mx.clear_streams()


# Control characters (a random model writes plenty) would reach the terminal; tabs and newlines stay.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str) -> str:
    """Model text as the terminal shows it: control characters (escape sequences, bells) dropped."""
    return _CONTROL.sub("", text)


def _call_dict(call: Any) -> dict:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}


def process_memory_gb() -> float:
    """The process's resident memory now (Linux: /proc; elsewhere the peak getrusage reports)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


class _ShuttingDown(Exception):
    pass


@dataclass
class Backend:
    """Owns the model, the chat session (a cache) and the thread they live on."""

    name: str
    load_fn: LoadFn
    session_factory: SessionFactory = chat_session
    demo: bool = False
    fps: float = 20.0
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._jobs: list[threading.Event] = []  # stop flags of queued and running generations
        self.model: Any = None
        self.processor: Any = None
        self.session: Session | None = None
        self.load_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self.session is not None

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def refuses(self, kind: str) -> str | None:
        """Why the loaded model cannot take this kind of media ("image", "video", "audio"), or None (it can, or no
        model is loaded yet: sending says so then)."""
        model = self.model
        if model is None or not hasattr(model, "children"):
            return None
        parts = model.children()
        if kind in ("image", "video") and not ({"vision_tower", "vision_embedder"} & parts.keys()):
            return "this model has no vision tower: it takes no images or video"
        if kind == "audio" and not ({"audio_tower", "embed_audio"} & parts.keys()):
            return "this model has no audio tower: it takes no audio"
        return None

    def _submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        if self._closing.is_set():
            future.set_exception(_ShuttingDown())
            return future
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mlx")
            self._thread.start()
        self._queue.put((fn, args, future))
        return future

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            fn, args, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller looks at the future; the thread goes on
                future.set_exception(e)
        # The model and MLX's streams of this thread go with it: left to the interpreter's exit, they aborted the
        # process now and then ("terminate called without an active exception", ml-explore/mlx#3126).
        self.session = self.model = self.processor = None
        release_mlx_thread()

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- loading ---------------------------------------------------------------------------------

    def load(self, post: Post) -> Future:
        self.load_error = None
        return self._submit(self._load, post)

    def _load(self, post: Post) -> None:
        def progress(done: int, total: int, desc: str = "") -> None:
            if self._closing.is_set():
                raise _ShuttingDown
            post(LoadProgress(done, total, desc))

        try:
            self.model, self.processor = self.load_fn(progress)
            self.session = self._session_for_load(post)
        except _ShuttingDown:
            return
        except Exception as e:  # shown in the app, which keeps running
            log.exception("loading failed")
            self.load_error = f"{type(e).__name__}: {e}" if not str(e).startswith(type(e).__name__) else str(e)
            post(LoadFailed(self.load_error))
            return
        post(ModelLoaded(self.name, self.session.context_limit))

    def _session_for_load(self, post: Post) -> Session:
        """The loaded model's session; with a drafter that does not load or fit (one setting serves every model:
        a drafter made for another size failed the load), one without it, and DrafterSkipped says why."""
        from mlx_gemma4.errors import Gemma4Error

        try:
            return self.session_factory(self.model, self.processor, self.settings)
        except Gemma4Error as e:
            if not self.settings.assistant:
                raise
            reason = e.__cause__ if isinstance(e.__cause__, Gemma4Error) else e   # (without the start-up advice)
            path, self.settings = self.settings.assistant, replace(self.settings, assistant="")   # (this run's)
            session = self.session_factory(self.model, self.processor, self.settings)
            post(DrafterSkipped(path, str(reason)))
            return session

    def set_assistant(self, post: Post, path: str) -> Future:
        """Use the drafter in `path` ("" drops it) from the next answer on, once the jobs before it are done; posts
        AssistantChanged, or AssistantRefused when it does not load or does not fit the model. The session (and
        its cache) is made anew. `settings.assistant` is left to the caller, who keeps it on a refusal."""
        return self._submit(self._set_assistant, post, path)

    def _set_assistant(self, post: Post, path: str) -> None:
        from mlx_gemma4.errors import Gemma4Error

        if self.model is not None:  # no model (its load failed): the next load uses the setting
            try:
                session = self.session_factory(self.model, self.processor, replace(self.settings, assistant=path))
            except Gemma4Error as e:
                reason = e.__cause__ if isinstance(e.__cause__, Gemma4Error) else e  # without the start-up advice
                post(AssistantRefused(path, str(reason)))
                return
            loaded, self.session, self.load_error = self.loaded, session, None
            if not loaded:  # the drafter saved before failed the load: the model is there, now with a session
                post(ModelLoaded(self.name, session.context_limit))
        post(AssistantChanged(path))

    # -- generation --------------------------------------------------------------------------------

    def generate(self, post: Post, conversation_id: int, turn_id: int, messages: list[dict]) -> Future:
        """Answer `messages` (the whole conversation, ending with the user turn `turn_id`)."""
        stop = threading.Event()
        self._jobs.append(stop)
        return self._submit(self._generate, post, conversation_id, turn_id, messages, stop)

    def cancel(self) -> None:
        """Stop every queued and running generation (the partial answer is kept); prefill and media encoding
        stop at the next chunk or item."""
        for stop in list(self._jobs):
            stop.set()

    def count(self, post: Post, conversation_id: int, messages: list[dict]) -> Future:
        """Post how much of the context `messages` take (after turns were dropped, say)."""
        return self._submit(self._count, post, conversation_id, messages)

    def _count(self, post: Post, conversation_id: int, messages: list[dict]) -> None:
        if self.session is None:
            return
        try:
            self.settings.apply(self.session)
            used = self.session.count_tokens(messages)
        except Exception:  # the status line is a bonus; a real error shows when the user sends
            log.exception("counting tokens failed")
            return
        post(ContextCounted(conversation_id, used, self.session.context_limit))

    def _generate(self, post: Post, cid: int, turn: int, messages: list[dict], stop: threading.Event) -> None:
        from mlx_gemma4.errors import ContextLengthError, MissingFileError

        try:
            self._run(post, cid, turn, messages, stop)
        except ContextLengthError as e:
            post(GenerationFailed(cid, turn, str(e), context_full=True, drop_turns=e.drop_turns,
                                  too_long=e.too_long))
        except MissingFileError as e:  # an attachment of the conversation was moved or deleted since
            post(GenerationFailed(cid, turn, f"InputError: {e.path}: no such file. Check the path (drag the file in "
                                             "again, or quote spaces)."))
        except Exception as e:
            log.exception("generation failed")
            post(GenerationFailed(cid, turn, f"{type(e).__name__}: {e}"))
        finally:
            self._jobs.remove(stop)

    def _run(self, post: Post, cid: int, turn: int, messages: list[dict], stop: threading.Event) -> None:
        session = self.session
        if session is None:
            raise RuntimeError(f"No model is loaded. {self.load_error or ''}".strip())
        self.settings.apply(session)
        stats, reason, last_post = Stats(), "stop", 0.0
        thinking, answer, calls, final = "", "", [], None
        should_stop = lambda: stop.is_set() or self._closing.is_set()  # noqa: E731
        progress = lambda done, total: post(Working(cid, turn, done, total))  # noqa: E731
        with closing(session.stream(messages, should_stop=should_stop, progress=progress,
                                    **self.settings.sampling())) as stream:
            for r in stream:  # the session splits thinking, answer and complete tool calls as they stream
                thinking, answer = thinking + printable(r.thinking), answer + printable(r.content)
                calls += [_call_dict(c) for c in r.tool_calls]
                stats = self._stats(r, stats)
                if r.finish_reason:
                    reason, final = r.finish_reason, r.answer
                    break
                now = time.monotonic()
                if now - last_post >= 1.0 / self.fps:
                    last_post = now
                    post(Streamed(cid, turn, thinking.strip(), answer.strip(), stats, list(calls)))
        if should_stop() and reason == "stop":
            reason = "cancelled"
        if final is None:  # the stream ended without its last piece (closed early): keep what was shown
            post(Finished(cid, turn, thinking.strip(), answer.strip(), reason, stats, calls))
            return
        # a call the answer did not finish stays in the text, as written
        post(Finished(cid, turn, printable(final.thinking), printable(final.text), reason, stats,
                      [_call_dict(c) for c in final.tool_calls]))

    def _stats(self, r: GenerationResponse, before: Stats) -> Stats:
        """The turn's stats after response `r` (memory: the highest seen this turn)."""
        s = self.session
        peak, kind = r.peak_memory_gb, "peak"
        if peak <= 0:
            peak, kind = process_memory_gb(), "RSS"
        return Stats(
            ttft=r.ttft, prompt_tokens=r.prompt_tokens, prompt_tps=r.prompt_tps,
            generation_tokens=r.generation_tokens, generation_tps=r.generation_tps,
            peak_memory_gb=max(peak, before.peak_memory_gb), memory_kind=kind,
            context_used=s.context_used if s else 0, context_limit=s.context_limit if s else 0,
            cached_tokens=s.last_reused if s else 0,
            drafted_tokens=r.drafted_tokens, accepted_tokens=r.accepted_tokens,
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop what runs, drop what is queued and wait for the model's thread to end (a thread left running
        when the interpreter exits can abort the process)."""
        self._closing.set()
        self.cancel()
        while True:
            try:
                _, _, future = self._queue.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
