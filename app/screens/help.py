"""Help: every key of the chat screen, the slash commands and how to attach files, on one screen at 80x24."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

EDITING = [
    ("Enter", "send"),
    ("Ctrl+J", "new line (any terminal)"),
    ("Shift+Enter", "new line, if reported"),
    ("Backspace", "empty prompt: drop file"),
    ("Tab", "scroll the chat"),
]
COMMANDS = [
    ("/image PATH", "attach an image"),
    ("/audio PATH", "attach audio (any length)"),
    ("/video PATH", "attach a video"),
    ("/system TEXT", "system prompt (new chat)"),
    ("/new", "new conversation"),
    ("/help", "this help"),
]
ATTACHING = ("Drag files into the terminal, or paste their paths (quoted, escaped or file:// URIs), to attach "
             "them. Ctrl+P finds any command by name. Esc, q or F1 closes this help.")


def two_columns(rows: list[tuple[str, str]]) -> Table:
    """Key/description pairs side by side: half as many lines."""
    table = Table.grid(padding=(0, 1), expand=True)
    for _ in range(2):
        table.add_column(style="bold", no_wrap=True)
        table.add_column(ratio=1)
    half = (len(rows) + 1) // 2
    for left, right in zip(rows[:half], rows[half:] + [("", "")]):
        table.add_row(*left, *right)
    return table


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="help.close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = bindings

    def compose(self) -> ComposeResult:
        heading = Text.from_markup
        self.body = Group(
            heading("[b u]Keys[/]"), two_columns(EDITING + self.rows), Text(),
            heading("[b u]Commands[/]"), two_columns(COMMANDS), Text(),
            Text(ATTACHING),
        )
        with VerticalScroll(classes="dialog wide", id="help"):
            yield Static(self.body, id="help-text")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
