"""Attachment chips: the files on a message (or waiting to be sent), with image thumbnails."""

from __future__ import annotations

from pathlib import Path

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
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


class AttachmentChips(Vertical):
    """Chips in a grid of equal columns that wraps onto more rows as the width shrinks; empty rows take no space."""

    DEFAULT_CSS = """
    AttachmentChips { height: auto; width: 1fr; layout: grid; grid-size: 1; grid-gutter: 0 1; grid-rows: auto; }
    AttachmentChips.-empty { display: none; }
    AttachmentChips > AttachmentChip { width: 1fr; height: auto; padding: 0 1; background: $boost; }
    AttachmentChip > Label { width: 1fr; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, chips: list[tuple[str, Path, str]] = (), thumbnails: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self._initial = list(chips)
        self.thumbnails = thumbnails
        self.column_width = 22 if thumbnails else 30

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.width)

    def _fit(self, width: int) -> None:
        """As many columns as fit, but no more than there are chips: two files share the width between them (in
        three columns their names were cut beside an empty third)."""
        chips = len(self.query_children(AttachmentChip))
        self.styles.grid_size_columns = max(1, min(chips, (width + 1) // (self.column_width + 1)))

    def compose(self) -> ComposeResult:
        for kind, path, label in self._initial:
            yield AttachmentChip(kind, path, label, self.thumbnails)

    def on_mount(self) -> None:
        self.set_class(not self._initial, "-empty")
        self.call_after_refresh(lambda: self._fit(self.size.width))

    def show(self, chips: list[tuple[str, Path, str]]) -> None:
        self.remove_children()
        self.mount_all([AttachmentChip(k, p, lbl, self.thumbnails) for k, p, lbl in chips])
        self.set_class(not chips, "-empty")
        self.call_after_refresh(lambda: self._fit(self.size.width))
