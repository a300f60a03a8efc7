"""Every conversation, saved as it happens: SQLite in the user data directory.

The store is the one record of every conversation: the chat screen renders from it and hands it to the model.
Each message is written in its own transaction, so quitting at any moment (Ctrl+C included) loses at most the
answer still being streamed. Attached files are copied into the data directory, so a conversation can be
resumed after the originals moved. How the database is opened (and what happens when it cannot be used as it
is): history_db.py.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .attachments import Attachment
from .history_db import ENV_VAR, HistoryError, data_dir, open_history

__all__ = ["ENV_VAR", "History", "HistoryError", "data_dir"]


@dataclass
class SavedAttachment:
    kind: str
    path: Path
    name: str
    label: str = ""  # what its chip shows: name, size, duration

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclass
class SavedMessage:
    id: int
    role: str
    content: str
    thinking: str = ""
    stats: dict = field(default_factory=dict)
    attachments: list[SavedAttachment] = field(default_factory=list)


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    created: float
    updated: float
    message_count: int = 0


class History:
    """The conversation store. `notice` holds a message for the user when the database was set aside or can
    only be read; `read_only` says nothing of this session will be kept."""

    def __init__(self, directory: str | Path | None = None, busy_timeout: float = 5.0) -> None:
        self.dir = data_dir(directory)
        self.path = self.dir / "history.db"
        self.attachments_dir = self.dir / "attachments"
        self.busy_timeout = busy_timeout
        self._conn, self.read_only, self.notice = open_history(self.path, busy_timeout)
        self._seen: dict[int, int] = {}   # conversation -> its revision as this store last saw or left it

    def close(self) -> None:
        self._conn.close()

    # -- writing ---------------------------------------------------------------------------------------

    def new_conversation(self, title: str = "", model: str = "", system_prompt: str = "") -> int:
        now = time.time()
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO conversations (title, model, system_prompt, created, updated) VALUES (?, ?, ?, ?, ?)",
                (title, model, system_prompt, now, now),
            )
        self._seen[int(cur.lastrowid)] = 0
        return int(cur.lastrowid)

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        thinking: str = "",
        stats: dict | None = None,
        attachments: list[Attachment] = (),
    ) -> int | None:
        """Save one message and copies of its attachments, all in one transaction. None when the conversation
        no longer exists (deleted while its answer was still coming)."""
        if not self.exists(conversation_id):
            return None
        copies: list[Path] = []
        try:
            for a in attachments:   # one at a time, so that a failure part way still knows the copies made
                copies.append(self._copy_in(conversation_id, a))
            return self._insert_message(conversation_id, role, content, thinking, stats, attachments, copies)
        except BaseException:  # nothing of a message that was not saved stays behind
            for a, copy in zip(attachments, copies):
                if copy != a.path:  # a copy made just now, never a file of an earlier message
                    copy.unlink(missing_ok=True)
            raise

    def _insert_message(self, conversation_id: int, role: str, content: str, thinking: str, stats: dict | None,
                        attachments: list[Attachment], copies: list[Path]) -> int:
        now = time.time()
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO messages (conversation_id, role, content, thinking, stats, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, thinking, json.dumps(stats or {}), now),
            )
            mid = int(cur.lastrowid)
            c.executemany(
                "INSERT INTO attachments (message_id, kind, path, name, label) VALUES (?, ?, ?, ?, ?)",
                [(mid, a.kind, str(p), a.path.name, a.label) for a, p in zip(attachments, copies)],
            )
            title_row = c.execute("SELECT title FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            title = title_row[0] if title_row else ""
            if not title and role == "user":
                title = _title(content)
            c.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?", (now, title, conversation_id))
            self._bump(c, conversation_id)
        return mid

    def delete_message(self, message_id: int) -> None:
        """Remove one message and the copies of its attachments: a turn that failed leaves nothing behind. Its
        conversation's title and time are what they were without it, and a conversation it leaves empty goes
        (a failed first message left an empty conversation named after text never sent, at the list's top)."""
        rows = self._conn.execute("SELECT path FROM attachments WHERE message_id = ?", (message_id,)).fetchall()
        owner = self._conn.execute("SELECT conversation_id, role, content FROM messages WHERE id = ?",
                                   (message_id,)).fetchone()
        emptied = None
        with self._tx() as c:
            c.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if owner is not None:
                cid, role, content = owner
                left = c.execute("SELECT role, content, created FROM messages WHERE conversation_id = ? ORDER BY id",
                                 (cid,)).fetchall()
                if not left:
                    c.execute("DELETE FROM conversations WHERE id = ?", (cid,))
                    emptied = cid
                    self._seen.pop(cid, None)
                else:
                    title, created = c.execute("SELECT title, created FROM conversations WHERE id = ?",
                                               (cid,)).fetchone()
                    if role == "user" and title == _title(content):
                        title = next((_title(t) for r, t, _ in left if r == "user" and _title(t)), "")
                    c.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?",
                              (max([created] + [t for _, _, t in left]), title, cid))
                    self._bump(c, cid)
        self._drop_copies(rows)
        if emptied is not None:
            shutil.rmtree(self.attachments_dir / str(emptied), ignore_errors=True)

    def delete_last_message(self, conversation_id: int, role: str = "assistant") -> None:
        """Regenerating replaces the last answer."""
        with self._tx() as c:
            c.execute(
                "DELETE FROM messages WHERE id = (SELECT MAX(id) FROM messages WHERE conversation_id = ?) "
                "AND role = ?",
                (conversation_id, role),
            )
            self._bump(c, conversation_id)

    def delete_oldest_turns(self, conversation_id: int, n: int) -> None:
        """Mirror of the session dropping its oldest n user turns (each with its answers)."""
        rows = self._conn.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND role = 'user' ORDER BY id LIMIT ?",
            (conversation_id, n + 1),
        ).fetchall()
        if not rows:
            return
        if len(rows) <= n:   # every turn: the conversation goes too (an empty one stayed under its old title)
            self.delete(conversation_id)
            return
        below = rows[n][0]   # the first message kept
        copies = self._conn.execute(   # the dropped turns' copies of their files (they stayed on disk)
            "SELECT a.path FROM attachments a JOIN messages m ON a.message_id = m.id WHERE m.conversation_id = ? "
            "AND m.id < ?", (conversation_id, below)).fetchall()
        with self._tx() as c:
            c.execute("DELETE FROM messages WHERE conversation_id = ? AND id < ?", (conversation_id, below))
            self._bump(c, conversation_id)
        self._drop_copies(copies)

    def delete(self, conversation_id: int) -> None:
        self._seen.pop(conversation_id, None)
        with self._tx() as c:
            c.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        shutil.rmtree(self.attachments_dir / str(conversation_id), ignore_errors=True)

    def _bump(self, c: sqlite3.Connection, conversation_id: int) -> None:
        """Count a change to the conversation's messages (inside the write's transaction). This store stays in
        step with it only if it was before: a change another window made since stays noticed."""
        before = c.execute("SELECT revision FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if before is None:
            return
        c.execute("UPDATE conversations SET revision = revision + 1 WHERE id = ?", (conversation_id,))
        if self._seen.get(conversation_id) == before[0]:
            self._seen[conversation_id] = before[0] + 1

    def seen(self, conversation_id: int | None) -> None:
        """The conversation as saved now is what the caller shows (it was just drawn from here)."""
        row = None if conversation_id is None else self._conn.execute(
            "SELECT revision FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is not None:
            self._seen[conversation_id] = row[0]

    def changed_elsewhere(self, conversation_id: int | None) -> bool:
        """Whether another window (another connection to this database) changed the conversation's messages since
        this store last saw it (``seen``) or wrote to it in step."""
        if conversation_id not in self._seen:
            return False
        row = self._conn.execute("SELECT revision FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return row is None or row[0] != self._seen[conversation_id]   # (deleted there: changed too)

    def _drop_copies(self, rows: list[tuple[str]]) -> None:
        """Delete the attachment copies at these paths (rows of one ``path``): only the app's, never a user's file."""
        for (path,) in rows:
            p = Path(path)
            if p.parent.parent == self.attachments_dir:
                p.unlink(missing_ok=True)

    def _copy_in(self, conversation_id: int, att: Attachment) -> Path:
        if self.read_only:
            return att.path  # nothing is kept; the message points at the user's file
        dest_dir = self.attachments_dir / str(conversation_id)
        if att.path.resolve().parent == dest_dir.resolve():
            return att.path
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{uuid.uuid4().hex[:8]}-{att.path.name}"
        shutil.copy2(att.path, dest)
        return dest

    def _tx(self) -> _Transaction:
        return _Transaction(self._conn)

    # -- reading ---------------------------------------------------------------------------------------

    def conversations(self) -> list[Conversation]:
        rows = self._conn.execute(
            "SELECT c.id, c.title, c.model, c.system_prompt, c.created, c.updated, COUNT(m.id) "
            "FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id "
            "GROUP BY c.id ORDER BY c.updated DESC, c.id DESC"
        ).fetchall()
        return [Conversation(*r) for r in rows]

    def latest(self) -> Conversation | None:
        convs = [c for c in self.conversations() if c.message_count]
        return convs[0] if convs else None

    def exists(self, conversation_id: int | None) -> bool:
        return conversation_id is not None and self._conn.execute(
            "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is not None

    def get(self, conversation_id: int) -> Conversation | None:
        return next((c for c in self.conversations() if c.id == conversation_id), None)

    def messages(self, conversation_id: int) -> list[SavedMessage]:
        rows = self._conn.execute(
            "SELECT id, role, content, thinking, stats FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        ).fetchall()
        out = [SavedMessage(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}")) for r in rows]
        by_id = {m.id: m for m in out}
        for mid, kind, path, name, label in self._conn.execute(
            "SELECT a.message_id, a.kind, a.path, a.name, a.label FROM attachments a "
            "JOIN messages m ON m.id = a.message_id WHERE m.conversation_id = ? ORDER BY a.id",
            (conversation_id,),
        ):
            by_id[mid].attachments.append(SavedAttachment(kind, Path(path), name, label))
        return out

    def export_markdown(self, conversation_id: int, dest: str | Path | None = None) -> Path:
        """Write the conversation as Markdown; attachments are linked by their saved paths."""
        conv = self.get(conversation_id)
        if conv is None:
            raise KeyError(conversation_id)
        lines = [f"# {conv.title or 'Conversation'}", ""]
        meta = [f"_{time.strftime('%Y-%m-%d %H:%M', time.localtime(conv.created))}_"]
        if conv.model:
            meta.append(f"model `{conv.model}`")
        lines += [" · ".join(meta), ""]
        if conv.system_prompt:
            lines += ["**System:** " + conv.system_prompt, ""]
        for m in self.messages(conversation_id):
            lines += [f"## {'You' if m.role == 'user' else 'Gemma'}", ""]
            for a in m.attachments:
                uri = a.path.as_uri()
                link = f"![{a.name}]({uri})" if a.kind == "image" else f"[{a.kind}: {a.name}]({uri})"
                lines += [link, ""]
            if m.thinking:
                lines += ["<details><summary>Thinking</summary>", "", m.thinking, "", "</details>", ""]
            lines += [m.content, ""]
        dest = Path(dest) if dest else self.dir / "exports" / f"conversation-{conversation_id}.md"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("\n".join(lines), encoding="utf-8")
        return dest


def _title(content: str) -> str:
    """A conversation's title from its first user message: its first line, cut at 60 characters."""
    return content.strip().splitlines()[0][:60] if content.strip() else ""


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on any error (autocommit connection, explicit transactions)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
