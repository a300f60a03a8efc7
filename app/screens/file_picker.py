"""Ctrl+O: pick an image, audio clip or video. Starts in the home folder; Backspace goes up a folder; a path can
be typed (or pasted) into the field below the tree: a folder opens there, a file is attached."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Static

from ..attachments import MEDIA_EXTS, parse_prompt, to_path

HINT = "Enter attach · Backspace up · Tab type a path · Esc cancel"


class MediaTree(DirectoryTree):
    """Directories and media files only; hidden files left out."""

    BINDINGS = [Binding("backspace", "up", "Up a folder", id="picker.up")]

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() in MEDIA_EXTS)]

    def action_up(self) -> None:
        here = Path(self.path)
        if here.parent != here:
            self.path = here.parent


def typed_path(text: str) -> Path:
    """What the user typed or pasted: quoted, escaped, `file://` and `~` forms all name the same path."""
    text = text.strip()
    parsed = parse_prompt(text)
    if parsed.attachments:
        return parsed.attachments[0].path
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return to_path(text.replace("\\ ", " "))  # file:// URIs (of folders too) and ~ as well


class FilePickerScreen(ModalScreen[Path | None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="picker.cancel")]

    def __init__(self, start: Path | None = None) -> None:
        super().__init__()
        self.start = start or Path.home()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="picker"):
            yield Static("", classes="title", id="picker-title", markup=False)
            yield MediaTree(self.start)
            yield Input(placeholder="…or type a path and press Enter", id="path", compact=True)
            yield Static(HINT, classes="hint", id="picker-hint", markup=False)

    def on_mount(self) -> None:
        tree = self.query_one(MediaTree)
        self.watch(tree, "path", lambda path: self.show_folder(Path(path)))
        tree.focus()

    def show_folder(self, folder: Path) -> None:
        self.query_one("#picker-title", Static).update(f"Attach a file from {folder}")

    @on(DirectoryTree.FileSelected)
    def chosen(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(Path(event.path))

    @on(Input.Submitted, "#path")
    def typed(self, event: Input.Submitted) -> None:
        path = typed_path(event.value)
        hint = self.query_one("#picker-hint", Static)
        if path.is_dir():
            tree = self.query_one(MediaTree)
            tree.path = path
            event.input.value = ""
            tree.focus()
        elif path.is_file():
            self.dismiss(path)
        else:
            hint.update(f"{path} does not exist. {HINT}")

    def action_cancel(self) -> None:
        self.dismiss(None)
