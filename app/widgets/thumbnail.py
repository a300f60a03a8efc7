"""Images drawn in the terminal with half blocks: two pixels a cell, so they work in any true-colour terminal.

`Thumbnail` is the small picture on an attachment chip; `ImagePreview` shows an image as wide as the transcript
(an annotated detection image, whose boxes must be visible) with a button that opens it in the system viewer.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Button, Label


def fit_cells(size: tuple[int, int], width: int, height: int, upscale: bool = False) -> tuple[int, int]:
    """(columns, pixel rows) of an image of `size` fitted into `width` cells by `height` rows, aspect kept."""
    w, h = size
    scale = min(width / w, 2 * height / h)
    if not upscale:
        scale = min(scale, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def half_block_text(path: Path, width: int, height: int, upscale: bool = False) -> Text:
    """At most `height` rows of `width` cells; each cell is an upper and a lower pixel ("▀" fg over bg)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (4 * width, 4 * height))  # a JPEG decodes at a fraction of its size: a photo takes ms, not s
        im = ImageOps.exif_transpose(im).convert("RGB")  # upright, as the model sees it (a phone's portrait photo)
        im = im.resize(fit_cells(im.size, width, height, upscale), Image.Resampling.LANCZOS)
        px = im.load()
        w, h = im.size
    text = Text()
    for y in range(0, h, 2):
        for x in range(w):
            top = px[x, y]
            bottom = px[x, y + 1] if y + 1 < h else None
            style = Style(color=f"rgb{top}", bgcolor=f"rgb{bottom}" if bottom else None)
            text.append("▀", style)
        if y + 2 < h:
            text.append("\n")
    return text


class Thumbnail(Widget):
    """A small picture of an attached image; falls back to nothing if the file cannot be drawn."""

    DEFAULT_CSS = "Thumbnail { width: auto; height: auto; }"

    def __init__(self, path: Path, cells: tuple[int, int] = (16, 8), **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.cells = cells
        self._text: Text | None = None  # drawn once: a refresh, a scroll or a resize does not decode it again

    def render(self) -> Text:
        if self._text is None:
            try:
                self._text = half_block_text(self.path, *self.cells)
            except Exception:  # a thumbnail is decoration; the chip beside it still names the file
                self._text = Text("")
        return self._text


class Picture(Widget):
    """An image as wide as it may be (up to `max_rows` tall), scaled up when it is small."""

    DEFAULT_CSS = "Picture { width: 1fr; height: auto; }"

    def __init__(self, path: Path, max_rows: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path, self.max_rows = path, max_rows
        self._drawn: tuple[int, Text] | None = None  # (width, picture): drawn again only when the width changes
        try:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                # EXIF orientations 5-8 turn the picture a quarter: it is drawn upright, so its shape is turned too
                self.image_size: tuple[int, int] | None = (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
        except Exception:
            self.image_size = None

    def get_content_height(self, container, viewport, width: int) -> int:
        if self.image_size is None:
            return 1
        return math.ceil(fit_cells(self.image_size, width, self.max_rows, upscale=True)[1] / 2)

    def render(self) -> Text:
        width = self.content_size.width
        if self._drawn is None or self._drawn[0] != width:
            try:
                picture = half_block_text(self.path, width, self.max_rows, upscale=True)
            except Exception:
                picture = Text(f"(cannot draw {self.path.name})")
            self._drawn = (width, picture)
        return self._drawn[1]


def open_in_viewer(path: Path) -> None:
    """Open `path` with the system's default application (macOS `open`, `xdg-open` elsewhere)."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]
        return
    tool = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(tool) is None:
        raise OSError(f"{tool} is not installed; the image is at {path}")
    subprocess.Popen([tool, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


class ImagePreview(Vertical):
    """A large picture, its file name, and a button that opens it with the system's image viewer."""

    DEFAULT_CSS = """
    ImagePreview { height: auto; margin: 1 0 0 0; padding: 0 1; }
    ImagePreview > Horizontal { height: 1; }
    ImagePreview Label { width: 1fr; color: $text-muted; }
    """

    def __init__(self, path: Path, opener: Callable[[Path], None] = open_in_viewer) -> None:
        super().__init__(classes="preview")
        self.path, self.opener = path, opener

    def compose(self) -> ComposeResult:
        yield Picture(self.path)
        with Horizontal():
            yield Label(f"🖼 {self.path.name}", markup=False)
            yield Button("Open in viewer", id="open-image", compact=True)

    @on(Button.Pressed, "#open-image")
    def open_image(self, event: Button.Pressed) -> None:
        event.stop()
        try:
            self.opener(self.path)
        except OSError as e:
            self.notify(f"Could not open the image: {e}", severity="warning")
