"""The model's own thread: one ChatSession, one request generating at a time, the rest waiting in line.

MLX streams are not safe to share across threads, so every forward pass runs on this one thread; the web server's
event loop only queues jobs and reads their events. One ChatSession answers every request, so a conversation's
next turn (or any request sharing a prefix with the last one) prefills only what is new.

A job's events go to its ``emit`` callback, called on the model thread: ``Piece`` for each streamed response,
then exactly one ``Done`` (with the error, if the answer failed). Setting ``job.cancel`` stops the job at the
next chunk or token, or before it starts if it is still waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError
from ..generation import GenerationResponse
from .requests import RequestError

log = logging.getLogger(__name__)


@dataclass
class Piece:
    response: GenerationResponse
    cached_tokens: int                      # prompt tokens found in the cache for this answer


@dataclass
class Done:
    error: BaseException | None = None


@dataclass
class Job:
    messages: list[dict[str, Any]]
    options: dict[str, Any]                 # ChatSession.stream's keywords
    emit: Callable[[Piece | Done], None]
    enable_thinking: bool = False
    tools: list[dict[str, Any]] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    ahead: int = 0                          # jobs in line before this one when it was queued


class Engine:
    """Runs jobs one after another on a dedicated thread.

    ``max_waiting`` bounds the line behind the running job: a job past it is refused at once (the client is told
    the server is busy) instead of waiting for minutes. ``generation`` holds keywords every job's generation gets
    (e.g. a logits processor or a sampler an embedding program installs); a request's settings override none of
    them.
    """

    def __init__(self, session, *, max_waiting: int = 16, generation: dict[str, Any] | None = None) -> None:
        self.session = session
        self.max_waiting = max_waiting
        self.generation = dict(generation or {})
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0                   # queued + running
        self._thread = threading.Thread(target=self._run, name="gemma4-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, job: Job) -> int:
        """Queue ``job``; return how many jobs are ahead of it. Raises RequestError (503) when the line is full."""
        with self._lock:
            if self._pending > self.max_waiting:
                raise RequestError(f"The server is busy: {self._pending} requests are ahead and the line is full "
                                   f"({self.max_waiting} waiting at most). Retry in a moment.", status=503,
                                   kind="server_busy", code="server_busy")
            job.ahead = self._pending
            self._pending += 1
        self._jobs.put(job)
        return job.ahead

    def close(self, timeout: float | None = None) -> None:
        """Finish the running job's current step, cancel the waiting ones and stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._drain()
                return
            try:
                self._answer(job)
            finally:
                with self._lock:
                    self._pending -= 1

    def _drain(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(Done(RequestError("The server is shutting down.", status=503, kind="server_busy")))

    def _answer(self, job: Job) -> None:
        error: BaseException | None = None
        if job.cancel.is_set():  # the client left while waiting
            job.emit(Done())
            return
        job.started_at = time.perf_counter()
        session = self.session
        session.enable_thinking = job.enable_thinking  # read when the conversation is encoded, on this thread
        kwargs = {**job.options, **self.generation, "should_stop": job.cancel.is_set}
        if job.tools:
            kwargs["tools"] = job.tools
        try:
            for r in session.stream(job.messages, **kwargs):
                job.emit(Piece(r, session.last_reused))
                if r.finish_reason or job.cancel.is_set():
                    break
        except Exception as e:  # reported to the client; the thread lives on for the next job
            if not isinstance(e, InputError):
                log.exception("generation failed")
            error = e
        job.emit(Done(error))

