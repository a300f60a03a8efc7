"""The app in a real terminal: tmux runs it, the test types and reads the pane.

Uses `--demo` when mlx_gemma4 provides the demo model, else `--model` on the tiny MLX checkpoint.
Needs tmux (apt install tmux); skipped without it.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.test_app_real import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_pane(session: str, text: str, timeout: float = 60.0) -> str:
    end = time.monotonic() + timeout
    while True:
        pane = tmux("capture-pane", "-p", "-t", session)
        if text in pane:
            return pane
        if time.monotonic() > end:
            raise AssertionError(f"{text!r} never appeared; pane:\n{pane}")
        time.sleep(0.2)


def model_args(tmp_path: Path) -> list[str]:
    try:
        import mlx_gemma4.demo  # noqa: F401

        return ["--demo"]
    except ImportError:
        return ["--model", str(build_tiny_checkpoint(tmp_path / "tiny"))]


def test_chat_in_tmux(tmp_path):
    data = tmp_path / "data"
    session = f"gemma4-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "app", *model_args(tmp_path), "--data-dir", str(data), "--max-tokens", "16"]
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-c", str(ROOT),
         "env", "TERM=xterm-256color", *cmd)
    try:
        wait_pane(session, "ctx 0/")  # the model is loaded
        tmux("send-keys", "-t", session, "-l", "hello world")
        tmux("send-keys", "-t", session, "Enter")
        pane = wait_pane(session, "TTFT")
        assert "hello world" in pane and "Gemma" in pane
        tmux("send-keys", "-t", session, "C-c")  # Ctrl+C inside the app must not corrupt anything
        tmux("send-keys", "-t", session, "C-q")
        end = time.monotonic() + 15
        while time.monotonic() < end and subprocess.run(["tmux", "has-session", "-t", session],
                                                         capture_output=True).returncode == 0:
            time.sleep(0.2)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    db = sqlite3.connect(data / "history.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert rows[0] == ("user", "hello world") and rows[1][0] == "assistant"
