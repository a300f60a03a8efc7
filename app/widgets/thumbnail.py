"""An image drawn in the terminal with half blocks: two pixels a cell, so it works in any true-colour terminal."""

from __future__ import annotations

from pathlib import Path

from rich.style import Style
from rich.text import Text
from textual.widget import Widget


def half_block_text(path: Path, width: int, height: int) -> Text:
    """`height` rows of `width` cells; each cell is an upper and a lower pixel ("▀" fg over bg)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((width, height * 2))
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

    def render(self) -> Text:
        try:
            return half_block_text(self.path, *self.cells)
        except Exception:  # a thumbnail is decoration; the chip beside it still names the file
            return Text("")
