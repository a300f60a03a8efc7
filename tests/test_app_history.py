"""app/history.py: the SQLite conversation store."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from app.attachments import check
from app.history import History


def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_CHAT_HOME", str(tmp_path / "home"))
    h = History()
    assert h.path == tmp_path / "home" / "history.db"
    assert h.path.exists()


def test_save_list_resume_delete(tmp_path):
    img = tmp_path / "pic.png"
    Image.new("RGB", (4, 4)).save(img)
    h = History(tmp_path / "data")
    cid = h.new_conversation(model="demo", system_prompt="be brief")
    h.add_message(cid, "user", "what is this?\nsecond line", attachments=[check(img)])
    h.add_message(cid, "assistant", "A black square.", thinking="it is dark", stats={"ttft": 0.1})
    img.unlink()  # the copy in the data dir must survive the original

    h2 = History(tmp_path / "data")
    [conv] = h2.conversations()
    assert conv.title == "what is this?" and conv.message_count == 2 and conv.model == "demo"
    msgs = h2.messages(cid)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].thinking == "it is dark" and msgs[1].stats == {"ttft": 0.1}
    [a] = msgs[0].attachments
    assert a.kind == "image" and a.name == "pic.png" and a.path.exists()
    assert a.path.parent == tmp_path / "data" / "attachments" / str(cid)
    assert h2.latest().id == cid

    h2.delete(cid)
    assert h2.conversations() == [] and not a.path.exists()


def test_regenerate_and_drop_oldest_turns(tmp_path):
    h = History(tmp_path)
    cid = h.new_conversation()
    for i in range(3):
        h.add_message(cid, "user", f"q{i}")
        h.add_message(cid, "assistant", f"a{i}")
    h.delete_last_message(cid)
    h.add_message(cid, "assistant", "a2 again")
    h.delete_oldest_turns(cid, 2)
    assert [m.content for m in h.messages(cid)] == ["q2", "a2 again"]


def test_export_markdown(tmp_path):
    h = History(tmp_path)
    cid = h.new_conversation(model="demo")
    h.add_message(cid, "user", "hi")
    h.add_message(cid, "assistant", "```py\nprint(1)\n```", thinking="greet")
    md = h.export_markdown(cid).read_text()
    assert md.startswith("# hi\n")
    assert "## You\n\nhi" in md and "## Gemma" in md and "<summary>Thinking</summary>" in md
    assert "```py\nprint(1)\n```" in md


def test_corrupt_database_is_kept_aside(tmp_path):
    (tmp_path / "history.db").write_bytes(b"this is not a database" * 100)
    h = History(tmp_path)
    assert h.notice and "kept as" in h.notice
    [aside] = tmp_path.glob("history.corrupt-*.db")
    assert aside.read_bytes().startswith(b"this is not a database")
    cid = h.new_conversation()
    h.add_message(cid, "user", "fresh start")
    assert [m.content for m in h.messages(cid)] == ["fresh start"]


_WRITER = """
import sys, time
from app.history import History
h = History(sys.argv[1])
cid = h.new_conversation()
i = 0
while True:
    h.add_message(cid, "user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 2000)
    i += 1
    if i == 5:
        print("ready", flush=True)
"""


def test_interrupt_while_writing_leaves_history_intact(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert sqlite3.connect(tmp_path / "history.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    h = History(tmp_path)
    assert h.notice is None
    msgs = h.messages(h.conversations()[0].id)
    assert len(msgs) >= 5
    assert all(m.content == f"message {i} " + "x" * 2000 for i, m in enumerate(msgs))
