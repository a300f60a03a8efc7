"""Opening the chat history's SQLite database: where it lives, its schema (and the changes older databases need),
and what happens when it cannot be used as it is.

Only a database SQLite says is damaged ("file is not a database", a failed integrity check) is renamed aside,
never deleted. One that is locked by another program or cannot be written (a read-only folder or file) is left
alone: its conversations are read into memory and the app runs read-only, saying so.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from mlx_gemma4.errors import Gemma4Error

ENV_VAR = "GEMMA4_CHAT_HOME"


class HistoryError(Gemma4Error):
    """The data folder cannot be used at all (e.g. it names a file)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    thinking TEXT NOT NULL DEFAULT '',
    stats TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attachments (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def data_dir(override: str | Path | None = None) -> Path:
    """Where history, attachments and recordings live: argument, then $GEMMA4_CHAT_HOME, then platformdirs."""
    if override is not None:
        d = Path(override)
    elif os.environ.get(ENV_VAR):
        d = Path(os.environ[ENV_VAR])
    else:
        from platformdirs import user_data_dir

        d = Path(user_data_dir("gemma4-chat", appauthor=False))
    d = d.expanduser()
    if d.exists() and not d.is_dir():
        raise HistoryError(f"The data folder {d} is a file. Pass --data-dir (or set ${ENV_VAR} to) a folder; "
                           "it is created if missing.")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # History opens read-only and says why
    return d


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file itself is damaged (not locked, not read-only)."""
    text = str(e).lower()
    return "not a database" in text or "malformed" in text or isinstance(e, _Damaged)


class _Damaged(sqlite3.DatabaseError):
    pass


def open_history(path: Path, busy_timeout: float) -> tuple[sqlite3.Connection, bool, str | None]:
    """The database at ``path`` opened for writing (a damaged one set aside for a new one), or an in-memory copy
    of what can be read: (connection, read only, a notice for the user or None)."""
    try:
        return _open(path, busy_timeout), False, None
    except sqlite3.DatabaseError as e:
        if not _damaged(e):
            return _read_only(path, e)
        aside = path.with_name(f"history.corrupt-{time.strftime('%Y%m%d-%H%M%S')}.db")
        try:
            path.rename(aside)
            conn = _open(path, busy_timeout)
        except (OSError, sqlite3.DatabaseError) as e2:
            return _read_only(path, e2)
        return conn, False, (f"The chat history database could not be read ({e}). It was kept as {aside} and a "
                             "new, empty history was started.")


def _open(path: Path, busy_timeout: float) -> sqlite3.Connection:
    if not path.parent.is_dir():
        raise sqlite3.OperationalError(f"unable to open database file (cannot create the folder {path.parent})")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise _Damaged(ok)
        conn.execute("PRAGMA journal_mode = WAL")
        prepare(conn)
        conn.execute("BEGIN IMMEDIATE")  # can we write? (locked or read-only says so here)
        conn.execute("ROLLBACK")
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn

def prepare(conn: sqlite3.Connection) -> None:
    """The schema, and what databases written by earlier versions need."""
    conn.executescript(_SCHEMA)
    _never_reuse_ids(conn)
    if "revision" not in [r[1] for r in conn.execute("PRAGMA table_info(conversations)")]:
        # databases written before another window's changes to a conversation were noticed
        conn.execute("ALTER TABLE conversations ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(attachments)")]
    if "label" not in columns:  # databases written before chips kept their size and duration
        conn.execute("ALTER TABLE attachments ADD COLUMN label TEXT NOT NULL DEFAULT ''")

def _never_reuse_ids(conn: sqlite3.Connection) -> None:
    """Databases written before ids were AUTOINCREMENT gave a deleted newest conversation's id to the next one:
    another app window still showing the deleted one then saved into the new one (and --resume N, an export's
    name, meant another chat). Their tables are rebuilt as AUTOINCREMENT, rows and ids as they were."""
    old = [name for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name IN ('conversations', 'messages')")
        if "AUTOINCREMENT" not in sql.upper()]
    if not old:
        return
    conn.execute("PRAGMA foreign_keys = OFF")   # (the tables are swapped under their references)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name in old:
                sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
                new = sql.replace(f"CREATE TABLE {name}", f"CREATE TABLE {name}_new", 1).replace(
                    "id INTEGER PRIMARY KEY,", "id INTEGER PRIMARY KEY AUTOINCREMENT,", 1)
                conn.execute(new)
                conn.execute(f"INSERT INTO {name}_new SELECT * FROM {name}")
                conn.execute(f"DROP TABLE {name}")
                conn.execute(f"ALTER TABLE {name}_new RENAME TO {name}")
            conn.execute("CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id)")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")

def _read_only(path: Path, why: Exception) -> tuple[sqlite3.Connection, bool, str]:
    """An in-memory copy of what can be read: the app shows earlier conversations and saves nothing."""
    mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    copied = False
    if path.is_file():
        for mode in ("mode=ro", "immutable=1"):
            try:
                src = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=0.2)
                try:
                    src.execute("SELECT count(*) FROM messages").fetchone()  # locked? say so now
                    src.backup(mem)  # (backup itself would wait for a lock for ever)
                    copied = True
                finally:
                    src.close()
                break
            except sqlite3.DatabaseError:
                continue
    mem.execute("PRAGMA foreign_keys = ON")
    prepare(mem)
    locked = "locked" in str(why).lower()
    cause = ("is locked by another program (another gemma4-chat?)" if locked
             else f"cannot be written ({why})")
    fix = ("Close the other program and restart to save again." if locked
           else f"Make {path.parent} writable, or start with --data-dir pointing at a writable folder.")
    shown = "Earlier conversations are shown; " if copied else ""
    return mem, True, f"The chat history at {path} {cause}. {shown}nothing from this session will be saved. {fix}"
