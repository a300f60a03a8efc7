"""Help: every key binding of the chat screen, the slash commands, and how to attach files."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

COMMANDS = """
| Command | What it does |
|---|---|
| `/image PATH` | attach an image |
| `/audio PATH` | attach an audio clip (up to 30 s are heard) |
| `/video PATH` | attach a video |
| `/system TEXT` | set the system prompt (starts a new conversation) |
| `/new` | start a new conversation |

Drag files into the terminal (or paste their paths, quoted, escaped or as `file://` URIs) to attach them.
"""


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="help.close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = bindings

    def compose(self) -> ComposeResult:
        keys = "\n".join(f"| `{key}` | {desc} |" for key, desc in self.rows)
        text = f"# Keys\n\n| Key | Action |\n|---|---|\n| `Enter` | send |\n| `Shift+Enter` | new line |\n{keys}\n\n# Commands\n{COMMANDS}"
        with VerticalScroll(classes="dialog"):
            yield Markdown(text, id="help-text")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
