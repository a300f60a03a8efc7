"""Saved conversations, newest first, each with its id, date, model and size: resume (Enter), delete (d, after
a confirmation), export to Markdown (e)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.containers import Vertical
from textual.screen import ModalScreen
from rich.text import Text
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ..history import Conversation, History
from .confirm import ConfirmScreen


LIST_ROWS = 16  # the most rows the list takes (all of them at 80x24)


@dataclass
class Choice:
    """The conversation to resume."""

    conversation_id: int


def describe(c: Conversation) -> Text:
    """Two lines: id, date, model and size (dim), then the title."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
    text = Text(f"#{c.id} · {when} · {c.model or 'unknown model'} · {c.message_count} msgs\n", style="dim")
    text.append(c.title or "(empty)", style="not dim")
    return text


class ConversationsScreen(ModalScreen[Choice | None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [
        Binding("escape", "dismiss_none", "Close", id="conversations.close"),
        Binding("d,delete", "delete", "Delete", id="conversations.delete"),
        Binding("e", "export", "Export", id="conversations.export"),
    ]

    @dataclass
    class Deleted(Message):
        """A conversation is gone; the chat screen must not keep writing to it."""

        conversation_id: int

    def __init__(self, history: History) -> None:
        super().__init__()
        self.history = history

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="conversations-dialog"):
            yield Static("Conversations", classes="title")
            yield OptionList(id="conversations")
            yield Static("Enter resume · d delete · e export to Markdown · Esc close", classes="hint")

    def on_resize(self, event: events.Resize) -> None:
        # The list gives up rows on a short screen so the hint below it stays in view: the dialog's border,
        # padding, title and a hint wrapped onto two lines take 8.
        self.query_one(OptionList).styles.max_height = max(3, min(LIST_ROWS, event.size.height - 8))

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self) -> None:
        """List the conversations again, the highlight where it was (the next one after a delete; it jumped to the
        top)."""
        options = self.query_one(OptionList)
        at = options.highlighted
        options.clear_options()
        for c in self.history.conversations():
            options.add_option(Option(describe(c), id=str(c.id)))
        if options.option_count:
            options.highlighted = min(at or 0, options.option_count - 1)
        options.focus()

    def _selected(self) -> int | None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return None
        return int(options.get_option_at_index(options.highlighted).id)

    @on(OptionList.OptionSelected)
    def resume(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Choice(int(event.option.id)))

    def action_delete(self) -> None:
        cid = self._selected()
        conv = self.history.get(cid) if cid is not None else None
        if conv is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.history.delete(conv.id)
                self.post_message(self.Deleted(conv.id))
                self.notify(f"Conversation #{conv.id} deleted.")
                self.refresh_list()

        self.app.push_screen(ConfirmScreen(f"Delete conversation #{conv.id}, “{conv.title or '(empty)'}”, "
                                           f"and its {conv.message_count} messages? This cannot be undone.",
                                           "Delete", "Keep", safe=True), answered)

    def action_export(self) -> None:
        cid = self._selected()
        if cid is None:
            return
        try:
            path = self.history.export_markdown(cid)
        except OSError as e:  # a read-only or full data folder
            self.notify(f"Could not export conversation #{cid}: {e}. Make {self.history.dir} writable, or start "
                        "with --data-dir pointing at a writable folder.", severity="error", timeout=12)
            return
        self.notify(f"Exported to {path}", timeout=8)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
