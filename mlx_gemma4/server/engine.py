"""The model's own thread: one ChatSession, one request generating at a time, the rest waiting in line.

MLX arrays belong to the thread whose stream made them, so loading and every forward pass run on this one thread;
the web server's event loop only queues jobs and reads their events. One ChatSession answers every request, so a
conversation's next turn (or any request sharing a prefix with the last one) prefills only what is new.

A job's events go to its ``emit`` callback, called on the model thread: ``Piece`` for each streamed response,
then exactly one ``Done`` (with the error, if the answer failed). A job of ``n`` choices answers the same messages
``n`` times in a row (the second and later find the whole prompt in the cache); each piece says which choice it
belongs to. Setting ``job.cancel`` stops the job at the next chunk or token, or before it starts if it is still
waiting; setting ``job.ended[i]`` ends choice ``i`` alone (a stop string found in it).
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from ..chat import ChatResponse
from ..errors import InputError
from .body import RequestError


@dataclass
class Piece:
    response: ChatResponse
    cached_tokens: int                      # prompt tokens found in the cache for this answer
    index: int = 0                          # the choice it belongs to


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
    finished_at: float | None = None
    ahead: int = 0                          # jobs in line before this one when it was queued
    n: int = 1                              # answers to the same messages, one after another
    ended: list[threading.Event] = field(init=False)  # per choice: set, it ends at its next token

    def __post_init__(self) -> None:
        self.ended = [threading.Event() for _ in range(self.n)]


class Engine:
    """Loads the model and runs jobs one after another, all on one dedicated thread.

    ``load`` runs first on that thread and returns the chat session every job is answered with (MLX arrays
    belong to the thread whose stream made them, so the model must be loaded where it runs); ``wait_ready()``
    returns once it has, and raises what it raised. ``max_waiting`` bounds the line behind the running job: a job
    past it is refused at once (the client is told the server is busy) instead of waiting for minutes.
    ``generation`` holds keywords every job's generation gets (e.g. a logits processor a program embedding the
    server installs); they take precedence over a request's settings.
    """

    def __init__(self, load: Callable[[], Any], *, max_waiting: int = 16,
                 generation: dict[str, Any] | None = None) -> None:
        if not callable(load):
            raise InputError(f"Engine takes a function that makes the chat session on the model's thread, e.g. "
                             f"Engine(lambda: ChatSession(*load(DIR))); got {type(load).__name__}.")
        self.max_waiting = max_waiting
        self.generation = dict(generation or {})
        self.session: Any = None
        self.current: Job | None = None     # the job generating now
        self._load = load
        self._load_error: BaseException | None = None
        self._ready = threading.Event()
        self._jobs: queue.Queue[Job | Callable[[], None] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0                   # queued + running
        self._stopping = False              # stop() was called: every job still to answer gets a 503
        self._thread = threading.Thread(target=self._run, name="gemma4-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for the model to load; True once it has (False on timeout). Re-raises a failed load's error."""
        if not self._ready.wait(timeout):
            return False
        if self._load_error is not None:
            raise self._load_error
        return True

    def submit(self, job: Job) -> int:
        """Queue ``job``; return how many jobs are ahead of it. Raises RequestError (503) when the line is full."""
        with self._lock:
            if self._stopping:
                raise _shutting_down()
            if not self.ready:
                raise RequestError("The model is still loading (or failed to load); retry in a moment.",
                                   status=503, kind="server_busy", code="model_loading")
            if self._pending > self.max_waiting:
                raise RequestError(f"The server is busy: {self._pending} requests are ahead and the line is full "
                                   f"({self.max_waiting} waiting at most). Retry in a moment.", status=503,
                                   kind="server_busy", code="server_busy")
            job.ahead = self._pending
            self._pending += 1
        self._jobs.put(job)
        return job.ahead

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(session)`` on the model thread, in line with the jobs, and return its result (for programs
        and benchmarks that use the loaded model directly)."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(self.session)
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()

        self._jobs.put(run)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stop(self) -> None:
        """Refuse new jobs and end the running one at its next step and the waiting ones at once, each with a 503
        (the server is shutting down): a graceful shutdown waits for open responses, which then end in moments,
        not when their answers would have. Takes no lock, so a signal handler may call it."""
        self._stopping = True
        job = self.current
        if job is not None:
            job.cancel.set()

    def close(self, timeout: float | None = None) -> None:
        """Finish the running job's current step, cancel the waiting ones and stop the thread."""
        if self.current is not None:
            self.current.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.session = self._load()
        except BaseException as e:  # wait_ready() raises it in the caller's thread
            self._load_error = e
        finally:
            self._ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                self._drain()
                # The model and MLX's streams of this thread go with it: left to the interpreter's exit, they
                # aborted the process now and then ("terminate called without an active exception",
                # ml-explore/mlx#3126).
                self.session = None
                gc.collect()
                if hasattr(mx, "clear_streams"):  # recent MLX
                    mx.clear_streams()
                return
            if not isinstance(job, Job):
                job()
                continue
            try:
                self.current = job
                done = self._answer(job)
            finally:
                self.current = None
                with self._lock:
                    self._pending -= 1
            job.emit(done)  # after the model is free: a client that has its answer finds the server idle

    def _drain(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                job.emit(Done(_shutting_down()))
            elif job is not None:
                job()

    def _answer(self, job: Job) -> Done:
        error: BaseException | None = None
        if self._stopping:
            return Done(_shutting_down())
        if job.cancel.is_set():  # the client left while waiting
            return Done()
        job.started_at = time.perf_counter()
        session = self.session
        session.enable_thinking = job.enable_thinking  # read when the conversation is encoded, on this thread
        finish = None
        try:
            for i in range(job.n):
                ended = job.ended[i]

                def stop(ended: threading.Event = ended) -> bool:
                    return job.cancel.is_set() or ended.is_set()

                options = dict(job.options)
                if "seed" in options:  # choices of one seeded request differ from each other, and come again
                    options["seed"] = (options["seed"] + i) % 2**64
                kwargs = {**options, **self.generation, "should_stop": stop, "tools": job.tools}
                finish = None
                for r in session.stream(job.messages, **kwargs):
                    job.emit(Piece(r, session.last_reused, i))
                    finish = r.finish_reason
                    if r.finish_reason or stop():
                        break
                if job.cancel.is_set():
                    break
        except Exception as e:  # handed to the request (the app logs what is not the client's fault); the thread
            error = e           # lives on for the next job
        if error is None and self._stopping and finish in (None, "cancelled"):  # cut short: say so, not "stop"
            error = _shutting_down()
        job.finished_at = time.perf_counter()
        return Done(error)


def _shutting_down() -> RequestError:
    return RequestError("The server is shutting down; this answer was not finished. Send the request again once "
                        "it is back.", status=503, kind="server_error", code="server_shutting_down")
