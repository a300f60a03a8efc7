"""app/history.py: the SQLite conversation store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from app.attachments import check
from app.history import History
from tests.helpers import foreground_signals


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


def test_a_failed_turn_leaves_no_trace_in_titles_times_or_the_list(tmp_path):
    """A failed first message left an empty conversation titled with text never sent (the next message kept that
    title), and a failed turn moved its conversation to the top of the list."""
    img = tmp_path / "pic.png"
    Image.new("RGB", (4, 4)).save(img)
    h = History(tmp_path / "data")
    older = h.new_conversation()
    h.add_message(older, "user", "older chat")
    time.sleep(0.01)
    cid = h.new_conversation()
    failed = h.add_message(cid, "user", "200 lines pasted\n...", attachments=[check(img)])
    h.delete_message(failed)
    assert not h.exists(cid) and [c.id for c in h.conversations()] == [older]
    assert not (h.attachments_dir / str(cid)).exists()
    cid = h.new_conversation()
    h.add_message(cid, "user", "200 lines pasted")
    kept = h.add_message(cid, "user", "short one")   # (a turn after the failed one, as the app keeps them)
    h.delete_message(h.messages(cid)[0].id)
    assert h.get(cid).title == "short one" and h.messages(cid)[0].id == kept
    before = h.get(older).updated
    time.sleep(0.01)
    h.delete_message(h.add_message(older, "user", "too long"))
    assert h.get(older).updated == before and h.get(older).title == "older chat"
    assert [c.id for c in h.conversations()][0] == cid   # the failed turn did not move it up


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


def test_dropped_turns_take_their_file_copies_and_an_emptied_conversation_with_them(tmp_path):
    """Dropping turns left their attachments' copies on disk, and dropping every turn left an empty conversation
    in the list under its old title."""
    img = tmp_path / "pic.png"
    Image.new("RGB", (4, 4)).save(img)
    h = History(tmp_path / "data")
    cid = h.new_conversation()
    h.add_message(cid, "user", "what is this?", attachments=[check(img)])
    h.add_message(cid, "assistant", "a square")
    h.add_message(cid, "user", "and this?", attachments=[check(img)])
    first, second = (m.attachments[0].path for m in h.messages(cid) if m.attachments)
    h.delete_oldest_turns(cid, 1)
    assert not first.exists() and second.exists() and [m.content for m in h.messages(cid)] == ["and this?"]
    h.delete_oldest_turns(cid, 1)
    assert not h.exists(cid) and not second.exists() and img.exists()   # (the user's own file stays)


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
                            cwd=Path(__file__).resolve().parents[1], preexec_fn=foreground_signals)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    finally:
        proc.kill()   # (a writer still running after a failure must not write on for ever)
    assert sqlite3.connect(tmp_path / "history.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    h = History(tmp_path)
    assert h.notice is None
    msgs = h.messages(h.conversations()[0].id)
    assert len(msgs) >= 5
    assert all(m.content == f"message {i} " + "x" * 2000 for i, m in enumerate(msgs))


_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA locking_mode = EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


def _saved_once(path: Path) -> int:
    h = History(path)
    cid = h.new_conversation()
    h.add_message(cid, "user", "keep me")
    h.close()
    return cid


def test_locked_database_is_not_moved_aside(tmp_path):
    cid = _saved_once(tmp_path)
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(tmp_path / "history.db")], stdout=subprocess.PIPE)
    try:
        assert locker.stdout.readline().strip() == b"locked"
        h = History(tmp_path, busy_timeout=0.2)
        assert h.read_only and "locked by another program" in h.notice and "nothing from this session" in h.notice
        assert not list(tmp_path.glob("history.corrupt-*"))
        new = h.new_conversation()  # the app keeps working, in memory
        h.add_message(new, "user", "not saved")
    finally:
        locker.kill()
        locker.wait()
    h2 = History(tmp_path)
    assert h2.notice is None and [m.content for m in h2.messages(cid)] == ["keep me"]
    assert len(h2.conversations()) == 1


_READ_ONLY = """
import sys
from app.history import History
h = History(sys.argv[1])
print(h.read_only, [m.content for c in h.conversations() for m in h.messages(c.id)], h.notice, sep="|")
"""


def _as_other_user(args: list[str], data: Path) -> subprocess.CompletedProcess:
    """Run as a user that may not write `data` (root writes everywhere, so drop to nobody when root)."""
    data.chmod(0o555)
    for f in data.iterdir():
        f.chmod(0o444)
    cmd = [sys.executable, *args]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HOME=str(data))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=120)


def test_read_only_data_folder_starts_read_only():
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="gemma4-ro-"))  # pytest's own tmp folders are closed to other users
    try:
        top.chmod(0o755)
        data = top / "data"
        _saved_once(data)
        out = _as_other_user(["-c", _READ_ONLY, str(data)], data)
    finally:
        data.chmod(0o755)
        shutil.rmtree(top)
    assert out.returncode == 0, out.stderr
    read_only, contents, notice = out.stdout.strip().split("|")
    assert read_only == "True" and contents == "['keep me']"
    assert "cannot be written" in notice and "--data-dir" in notice
    assert "history.corrupt" not in out.stdout


def test_data_dir_naming_a_file_is_a_clear_error(tmp_path, capsys):
    from app.__main__ import main
    from app.history import HistoryError

    f = tmp_path / "notes.txt"
    f.write_text("mine")
    try:
        History(f)
    except HistoryError as e:
        assert "is a file" in str(e)
    else:
        raise AssertionError("no HistoryError")
    assert main(["--demo", "--data-dir", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "mine"


def test_resume_of_an_unknown_id_names_it(tmp_path):
    """--resume 99 said "There is no saved conversation to resume." although there were some, just not #99."""
    import asyncio

    from app.widgets.messages import Notice
    from tests.app_helpers import make_app, until

    history = History(tmp_path / "data")
    cid = history.new_conversation(model="m", system_prompt="")
    history.add_message(cid, "user", "hi")
    history.close()

    async def go():
        app = make_app(tmp_path, resume=cid + 98)
        async with app.run_test() as pilot:
            await until(pilot, lambda: app.chat_screen.query(Notice))
            said = str(app.chat_screen.query_one(Notice).render())
            assert f"no saved conversation #{cid + 98}" in said and "Ctrl+L" in said

    asyncio.run(go())


def test_a_message_whose_second_file_is_gone_leaves_no_copy_of_the_first(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for p in (first, second):
        Image.new("RGB", (4, 4)).save(p)
    h = History(tmp_path / "data")
    cid = h.new_conversation()
    attachments = [check(first), check(second)]
    second.unlink()   # gone between attaching and sending
    try:
        h.add_message(cid, "user", "two pictures", attachments=attachments)
    except OSError:
        pass
    else:
        raise AssertionError("a message with a missing file was saved")
    assert h.messages(cid) == []
    assert not [p for p in (tmp_path / "data").rglob("*.png")]   # the first file's copy went too


def test_a_deleted_conversations_id_is_never_given_again(tmp_path):
    """Another window still showing a deleted conversation saved into the next new one, which had its id."""
    a, b = History(tmp_path), History(tmp_path)
    old = a.new_conversation()
    a.add_message(old, "user", "old chat")
    b.delete(old)
    new = b.new_conversation()
    b.add_message(new, "user", "new chat")
    assert new != old and not a.exists(old)
    last = max(m.id for m in b.messages(new))
    b.delete(new)
    again = b.new_conversation()
    assert again > new and b.add_message(again, "user", "x") > last


def test_a_database_from_before_keeps_its_rows_and_ids_and_stops_reusing_them(tmp_path):
    import sqlite3

    conn = sqlite3.connect(tmp_path / "history.db")
    conn.executescript("""
        CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '', model TEXT NOT NULL
            DEFAULT '', system_prompt TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL REFERENCES
            conversations(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL, thinking TEXT NOT NULL
            DEFAULT '', stats TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
        CREATE TABLE attachments (id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL REFERENCES messages(id) ON
            DELETE CASCADE, kind TEXT NOT NULL, path TEXT NOT NULL, name TEXT NOT NULL);
        INSERT INTO conversations VALUES (3, 'kept', '', '', 1, 1), (5, 'newest', '', '', 2, 2);
        INSERT INTO messages VALUES (7, 3, 'user', 'hello', '', '{}', 1), (9, 5, 'user', 'bye', '', '{}', 2);
        INSERT INTO attachments VALUES (1, 7, 'image', '/x.png', 'x.png');
    """)
    conn.close()
    h = History(tmp_path)
    assert [(c.id, c.title) for c in h.conversations()] == [(5, "newest"), (3, "kept")]
    [m] = h.messages(3)
    assert (m.id, m.content, [a.path.name for a in m.attachments]) == (7, "hello", ["x.png"])
    h.delete(5)
    assert h.new_conversation() == 6
    h.delete(3)   # cascades still hold
    assert h.messages(3) == []


def test_a_change_another_window_made_to_a_conversation_is_noticed(tmp_path):
    """Two windows on one conversation: each saw only its own turns, and the other's went into the conversation
    unseen (Ctrl+G in one then replaced the other's answer). A store notices another store's changes to a
    conversation since it last drew it, and not its own."""
    a, b = History(tmp_path), History(tmp_path)
    cid = a.new_conversation()
    a.add_message(cid, "user", "from A")
    a.add_message(cid, "assistant", "answer A")
    assert not a.changed_elsewhere(cid) and not b.changed_elsewhere(cid)   # (b never drew it)
    b.seen(cid)
    b.add_message(cid, "user", "from B")
    assert a.changed_elsewhere(cid) and not b.changed_elsewhere(cid)
    a.add_message(cid, "assistant", "A writes on")   # its own change does not hide the other's
    assert a.changed_elsewhere(cid) and b.changed_elsewhere(cid)
    a.seen(cid)
    b.seen(cid)
    b.delete_last_message(cid)
    b.delete_oldest_turns(cid, 1)
    assert a.changed_elsewhere(cid) and not b.changed_elsewhere(cid)
    assert [m.content for m in a.messages(cid)] == ["from B"]
