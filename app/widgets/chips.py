"""Attachment chips: the files on a message (or waiting to be sent), with image thumbnails."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label

from .thumbnail import Thumbnail

ICONS = {"image": "🖼", "audio": "🎤", "video": "🎞"}


class AttachmentChip(Vertical):
    """One attached file: icon, name and size or duration; a thumbnail above it for images."""

    def __init__(self, kind: str, path: Path, label: str, thumbnails: bool = True) -> None:
        super().__init__(classes=f"chip {kind}")
        self.kind, self.path, self.label = kind, path, label
        self.thumbnails = thumbnails

    def compose(self) -> ComposeResult:
        if self.kind == "image" and self.thumbnails:
            yield Thumbnail(self.path)
        yield Label(f"{ICONS.get(self.kind, '📎')} {self.label}", markup=False)


class AttachmentChips(Horizontal):
    """A row of chips; empty rows take no space."""

    DEFAULT_CSS = """
    AttachmentChips { height: auto; width: 1fr; }
    AttachmentChips.-empty { display: none; }
    AttachmentChips > AttachmentChip { width: auto; height: auto; margin: 0 1 0 0; padding: 0 1;
                                       background: $boost; }
    """

    def __init__(self, chips: list[tuple[str, Path, str]] = (), thumbnails: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self._initial = list(chips)
        self.thumbnails = thumbnails

    def compose(self) -> ComposeResult:
        for kind, path, label in self._initial:
            yield AttachmentChip(kind, path, label, self.thumbnails)

    def on_mount(self) -> None:
        self.set_class(not self._initial, "-empty")

    def show(self, chips: list[tuple[str, Path, str]]) -> None:
        self.remove_children()
        self.mount_all([AttachmentChip(k, p, lbl, self.thumbnails) for k, p, lbl in chips])
        self.set_class(not chips, "-empty")
