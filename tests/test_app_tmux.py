"""`gemma4-chat --demo` in a real terminal: tmux runs it, the test types and reads the pane.

Needs tmux (apt install tmux; .ci/run installs it).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable


ROOT = Path(__file__).resolve().parents[1]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_pane(session: str, seen: str | Callable[[str], bool], timeout: float = 60.0) -> str:
    """The pane once it matches `seen` (a regex, or a test of the pane's text)."""
    end = time.monotonic() + timeout
    while True:
        pane = tmux("capture-pane", "-p", "-t", session)
        if seen(pane) if callable(seen) else re.search(seen, pane):
            return pane
        if time.monotonic() > end:
            raise AssertionError(f"{seen!r} never appeared; pane:\n{pane}")
        time.sleep(0.2)


def chat_command() -> list[str]:
    """The installed console script when there is one (pip install -e .), else `python -m app`."""
    script = Path(sys.executable).parent / "gemma4-chat"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app"]


BORDERS = " █▌▎┃"


def answer_lines(pane: str) -> list[str]:
    """The text under the model's "Gemma" label, up to the end of its message (left border stripped)."""
    lines = pane.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip(BORDERS) == "Gemma"), len(lines))
    out = []
    for line in lines[start + 1:]:
        body = line.strip(BORDERS)
        if not body or body.startswith(("╭", "─")):
            break
        out.append(body)
    return out


def wait_gone(session: str) -> None:
    """Until the app has quit and tmux closed the session (a hang guard only; quitting is quick)."""
    end = time.monotonic() + 60
    while time.monotonic() < end and subprocess.run(["tmux", "has-session", "-t", session],
                                                     capture_output=True).returncode == 0:
        time.sleep(0.2)


def status_line(pane: str) -> str:
    """The status bar: the line above the footer (the pane's last line)."""
    lines = [line for line in pane.splitlines() if line.strip()]
    return lines[-2]


def test_demo_chat_in_tmux_at_80x24(tmp_path):
    """A new user's terminal: 80x24. A message typed while the model loads gets its answer once it is ready."""
    data = tmp_path / "data"
    session = f"gemma4-{uuid.uuid4().hex[:8]}"
    cmd = [*chat_command(), "--demo", "--data-dir", str(data), "--max-tokens", "16", "--temperature", "0"]
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", "-c", str(tmp_path),
         "env", "TERM=xterm-256color", f"PYTHONPATH={ROOT}", *cmd)
    try:
        wait_pane(session, "Message Gemma")  # the prompt is up; the model may still be loading
        tmux("send-keys", "-t", session, "-l", "hello world")
        tmux("send-keys", "-t", session, "Enter")
        pane = wait_pane(session, lambda pane: "tok/s" in pane and answer_lines(pane))  # the reply is on screen
        assert "DEMO MODE" in pane and "hello world" in pane
        status = status_line(pane)
        assert "TTFT" in status and "tok/s" in status and re.search(r"ctx \d+/\d+", status), status
        tmux("send-keys", "-t", session, "-l", "two")
        tmux("send-keys", "-t", session, "C-j")
        tmux("send-keys", "-t", session, "-l", "lines")
        pane = wait_pane(session, lambda pane: "│ lines" in pane)  # Ctrl+J made a new line, nothing was sent
        assert "│ two" in pane
        tmux("send-keys", "-t", session, "C-c")  # Ctrl+C inside the app must not corrupt anything
        tmux("send-keys", "-t", session, "C-q")
        wait_gone(session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    db = sqlite3.connect(data / "demo" / "history.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert rows[0] == ("user", "hello world") and rows[1][0] == "assistant" and rows[1][1].strip()
    assert not (tmp_path / "models").exists()  # nothing is written relative to the current folder


def start_demo(tmp_path: Path, size: tuple[int, int] = (80, 24), *args: str) -> tuple[str, Path]:
    """`gemma4-chat --demo` in a fresh tmux session of `size`; (session, data folder) once the prompt is up."""
    data = tmp_path / "data"
    session = f"gemma4-{uuid.uuid4().hex[:8]}"
    cmd = [*chat_command(), "--demo", "--data-dir", str(data), "--max-tokens", "8", "--temperature", "0", *args]
    tmux("new-session", "-d", "-s", session, "-x", str(size[0]), "-y", str(size[1]), "-c", str(tmp_path),
         "env", "TERM=xterm-256color", f"PYTHONPATH={ROOT}", *cmd)
    wait_pane(session, "Message Gemma")
    return session, data


def saved_user_messages(data: Path) -> list[str]:
    db = sqlite3.connect(data / "demo" / "history.db")
    return [row[0] for row in db.execute("SELECT content FROM messages WHERE role = 'user' ORDER BY id")]


def send_then_quit(session: str) -> None:
    """Enter (what the prompt holds is sent), the answer, then Ctrl+Q, until the app has quit."""
    tmux("send-keys", "-t", session, "Enter")
    wait_pane(session, lambda pane: "tok/s" in pane and answer_lines(pane))
    tmux("send-keys", "-t", session, "C-q")
    wait_gone(session)


def test_typed_joiners_and_direction_marks_are_kept(tmp_path):
    """Typed (not pasted) text keeps its format characters: the joiner inside an emoji family, the ZWNJ a Persian
    keyboard types, a right-to-left mark. Textual drops them as unprintable keys, so they vanished from what was
    sent."""
    session, data = start_demo(tmp_path)
    typed = "family 👨\u200d👩\u200d👧 می\u200cخواهم \u200fשלום"
    try:
        tmux("send-keys", "-t", session, "-l", typed)
        send_then_quit(session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert saved_user_messages(data) == [typed]


def test_a_paste_of_bytes_that_are_not_utf8_does_not_end_the_app(tmp_path):
    """Bytes that are not UTF-8 (a binary paste, a cut multi-byte character) raised UnicodeDecodeError in Textual's
    input thread: the app closed, the unsent prompt was lost, and the exit code was 0."""
    session, data = start_demo(tmp_path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"before \xf9\xfe\xff\xc3 after")
    try:
        tmux("load-buffer", "-b", "junk", str(garbage))
        tmux("paste-buffer", "-p", "-b", "junk", "-t", session)
        wait_pane(session, "before .* after")
        send_then_quit(session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    [sent] = saved_user_messages(data)
    assert sent.startswith("before") and sent.endswith("after") and "\ufffd" in sent
