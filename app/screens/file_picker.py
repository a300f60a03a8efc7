"""Ctrl+O: pick an image, audio clip or video from a directory tree."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Static

from ..attachments import MEDIA_EXTS


class MediaTree(DirectoryTree):
    """Directories and media files only; hidden files left out."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() in MEDIA_EXTS)]


class FilePickerScreen(ModalScreen[Path | None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="picker.cancel")]

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"Attach a file from {self.start}", classes="title", markup=False)
            yield MediaTree(self.start)
            yield Static("Enter attach · Esc cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one(MediaTree).focus()

    @on(DirectoryTree.FileSelected)
    def chosen(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(Path(event.path))

    def action_cancel(self) -> None:
        self.dismiss(None)
