"""Helpers for the server tests: the server as a real process or in-process on a thread, and a logits processor
the tests steer (force a token sequence, or hold the model thread until the test lets it go)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Only a guard against a test that would hang for ever: the waits below end when the state is reached.
HANG_GUARD_S = 300.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of a GET (or a POST of ``body``), 4xx/5xx included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=HANG_GUARD_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class ProcessServer:
    """``python -m mlx_gemma4.server`` on a free localhost port; ready once /health answers 200."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma4.server", "--model", str(model_dir),
                                      "--port", str(self.port), "--log-level", "warning", *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        wait_until(self._ready, "the server to answer /health")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
        try:
            return request(self.url + "/health")[0] == 200
        except OSError:  # not listening yet
            return False

    def health(self) -> dict[str, Any]:
        return request(self.url + "/health")[1]

    def output(self) -> str:
        """The end of what the server has logged."""
        self.log.seek(0)
        return self.log.read()[-6000:]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ThreadServer:
    """``create_app(engine)`` served by uvicorn on a thread of the test process (port chosen by the OS);
    ``make_server`` builds the server from its config (default: ``uvicorn.Server``)."""

    def __init__(self, app, make_server: Callable[[Any], Any] | None = None) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = (make_server or uvicorn.Server)(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn to start")
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


class Steer:
    """A logits processor the test drives. ``force`` (token ids): emit them in order, whatever the model says
    (the next one is the one after the longest part of ``force`` the history already ends with). ``hold`` (a
    callable returning an Event): at the ``hold_at``-th call, block until that event is set. ``no_stop`` (ids):
    never emit these, so an answer runs to max_tokens. ``fail``: raise it. ``calls`` counts calls since the last
    ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.force: list[int] | None = None
        self.no_stop: list[int] = []
        self.hold: Callable[[], threading.Event] | None = None
        self.hold_at = 1
        self.held = threading.Event()       # set while a call is blocked
        self.calls = 0
        self.fail: Exception | None = None  # raised from the next call (a model that breaks)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.hold is not None and self.calls == self.hold_at:
            self.held.set()
            assert self.hold().wait(HANG_GUARD_S), "the steered call was never released"
        vocab = logits.shape[-1]
        if self.force:
            tail = np.array(history).reshape(-1).tolist()[-len(self.force):]
            k = next(k for k in range(len(self.force) - 1, -1, -1) if k == 0 or tail[-k:] == self.force[:k])
            return mx.where(mx.arange(vocab)[None] == self.force[k], 0.0, -1e9).astype(logits.dtype)
        if self.no_stop:
            banned = mx.zeros((vocab,), dtype=mx.bool_)
            banned[mx.array(self.no_stop)] = True
            return mx.where(banned[None], -1e9, logits)
        return logits
