"""Parse and draw Gemma's detection / pointing answers.

Asked to detect or point at things, Gemma answers with JSON in the Gemini spatial-understanding style:
``[{"box_2d": [y0, x0, y1, x1], "label": "cat"}, ...]`` or ``[{"point_2d": [y, x], "label": ...}]`` (also seen
as ``"point"``), with coordinates normalized to 0-1000 over the whole input image, y first. Model output is
often wrapped in a ```json fence, followed by prose, or slightly off JSON (single quotes, trailing commas);
all of that is tolerated, and anything unparseable gives no boxes rather than an error.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

SCALE = 1000.0
_FENCE = re.compile(r"```(?:json|JSON|python)?\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#9a6324", "#800000", "#808000", "#000075"]


@dataclass
class Box:
    """A detection in pixel coordinates of the image it was asked about. A point has x0 == x1 and y0 == y1."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    kind: str = "box"  # "box" or "point"

    @property
    def is_point(self) -> bool:
        return self.kind == "point"


def _balanced(text: str, start: int) -> str | None:
    """The bracketed span opening at ``text[start]``, skipping brackets inside quoted strings."""
    closing = {"[": "]", "{": "}"}
    stack: list[str] = []
    quote: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            # A single quote between letters is an apostrophe ("person's"), not a string delimiter.
            if not (ch == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()):
                quote = ch
        elif ch in closing:
            stack.append(closing[ch])
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return text[start : i + 1]
        i += 1
    return None


def _loads(span: str) -> Any:
    """JSON, then JSON without trailing commas, then a Python literal (single quotes); None if all fail."""
    for candidate in (span, _TRAILING_COMMA.sub(r"\1", span)):
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", span)))
    try:
        return ast.literal_eval(py)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _values(text: str) -> Iterator[Any]:
    """Every top-level JSON-ish value in ``text`` that parses, left to right."""
    i = 0
    while i < len(text):
        if text[i] in "[{":
            span = _balanced(text, i)
            value = _loads(span) if span else None
            if value is not None and not isinstance(value, (int, float, str)):
                yield value
                i += len(span)
                continue
        i += 1


def _entries(value: Any) -> Iterator[dict]:
    if isinstance(value, dict):
        if any(k in value for k in ("box_2d", "point_2d", "point")):
            yield value
        else:  # e.g. {"objects": [...]}
            for v in value.values():
                if isinstance(v, (list, dict)):
                    yield from _entries(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (dict, list, tuple)):
                yield from _entries(v)


def _numbers(v: Any, n: int) -> list[float] | None:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        return None
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        return None


def parse_boxes(text: str, image_size: tuple[int, int]) -> list[Box]:
    """Boxes and points in ``text`` mapped to pixels of an image of ``image_size`` = (width, height).

    Never raises on bad model output: what cannot be parsed is skipped (logged at DEBUG)."""
    width, height = image_size
    fenced = _FENCE.findall(text or "")
    sources = fenced if fenced else [text or ""]

    def px(v: float, size: int) -> float:
        return min(max(v, 0.0), SCALE) / SCALE * size

    boxes: list[Box] = []
    for source in sources:
        for value in _values(source):
            for entry in _entries(value):
                label = str(entry.get("label", entry.get("name", "")))
                box = _numbers(entry.get("box_2d"), 4)
                if box is not None:
                    y0, x0, y1, x1 = box
                    xs = sorted((px(x0, width), px(x1, width)))
                    ys = sorted((px(y0, height), px(y1, height)))
                    boxes.append(Box(label, xs[0], ys[0], xs[1], ys[1]))
                    continue
                point = _numbers(entry.get("point_2d", entry.get("point")), 2)
                if point is not None:
                    x, y = px(point[1], width), px(point[0], height)
                    boxes.append(Box(label, x, y, x, y, kind="point"))
                else:
                    logger.debug("skipping malformed detection %r", entry)
    return boxes


def draw_boxes(image: Image.Image, boxes: list[Box]) -> Image.Image:
    """A copy of ``image`` (RGB, same size) with each box outlined, each point marked, and labels written."""
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(out.size) / 200))
    try:
        font = ImageFont.load_default(size=max(10, min(out.size) // 30))
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    for i, box in enumerate(boxes):
        color = _COLORS[i % len(_COLORS)]
        if box.is_point:
            r = 2 * line + 2
            draw.ellipse([box.x0 - r, box.y0 - r, box.x0 + r, box.y0 + r], fill=color, outline="white")
            anchor = (box.x0 + r + 2, box.y0 - r)
        else:
            draw.rectangle([box.x0, box.y0, box.x1, box.y1], outline=color, width=line)
            anchor = (box.x0 + line, box.y0 + line)
        if box.label:
            left, top, right, bottom = draw.textbbox(anchor, box.label, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
            draw.text(anchor, box.label, fill="white", font=font)
    return out
