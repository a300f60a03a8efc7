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
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

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


_CLOSING = {"[": "]", "{": "}"}
# Detection answers nest two or three brackets deep; deeper spans are never parsed, which keeps the total parsing
# work linear in the answer's length (and json/ast clear of their recursion limits).
_MAX_HEIGHT = 32


class _Spans:
    """Where each ``[`` / ``{`` of ``text`` closes, skipping brackets inside quoted strings.

    ``end(i)`` is the index of the bracket that closes the one at ``i`` (None if it never does), as a scan
    starting at ``i`` finds it. One scan records the answer for every bracket it meets outside quotes and jumps
    over spans already known, which makes ordinary answers (and runs of brackets) linear, not quadratic. Text
    built so that every bracket sits inside a string as seen from the one before could still cost a scan per
    bracket, so all scans together get a step budget linear in the text; past it, unscanned brackets count
    as unclosed (no real answer comes near it: the scan of a JSON answer covers it once)."""

    def __init__(self, text: str):
        self.text = text
        self._end: dict[int, int | None] = {}
        self._height: dict[int, int] = {}  # nesting levels of the span (1: no brackets inside)
        self._steps_left = 16 * len(text) + 4096

    def end(self, start: int) -> int | None:
        if start not in self._end:
            self._scan(start)
        return self._end.get(start)  # absent: the step budget ran out before the scan began

    def height(self, start: int) -> int:
        return self._height.get(start, 0)

    def _is_quote(self, i: int) -> bool:
        ch, text = self.text[i], self.text
        # A single quote between letters is an apostrophe ("person's"), not a string delimiter.
        return ch == '"' or (ch == "'" and not (0 < i < len(text) - 1 and text[i - 1].isalnum()
                                                 and text[i + 1].isalnum()))

    def _scan(self, start: int) -> None:
        text, known = self.text, self._end
        stack: list[list[int]] = []  # [opener index, height of its tallest child so far]
        quote: str | None = None
        i = start
        while i < len(text):
            self._steps_left -= 1
            if self._steps_left < 0:
                break
            ch = text[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                if self._is_quote(i):
                    quote = ch
            elif ch in _CLOSING:
                if i != start and i in known:  # met outside quotes before: same answer from here
                    if known[i] is None:
                        break
                    if stack:
                        stack[-1][1] = max(stack[-1][1], self._height[i])
                    i = known[i] + 1
                    continue
                stack.append([i, 0])
            elif ch in "]}":
                if not stack or _CLOSING[text[stack[-1][0]]] != ch:
                    break
                opener, child = stack.pop()
                known[opener], self._height[opener] = i, child + 1
                if not stack:
                    return
                stack[-1][1] = max(stack[-1][1], child + 1)
            i += 1
        for opener, _ in stack:  # unclosed, or closed by the wrong bracket
            known[opener] = None


def _loads(span: str) -> Any:
    """JSON, then JSON without trailing commas, then a Python literal (single quotes); None if all fail."""
    for candidate in (span, _TRAILING_COMMA.sub(r"\1", span)):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            pass
    py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", span)))
    try:
        return ast.literal_eval(py)
    except Exception:  # ValueError, SyntaxError, TypeError ({[1]}: an unhashable set), RecursionError, ...
        return None


def _values(text: str) -> Iterator[Any]:
    """Every top-level JSON-ish value in ``text`` that parses, left to right."""
    spans = _Spans(text)
    i = 0
    while i < len(text):
        if text[i] in _CLOSING:
            end = spans.end(i)
            if end is not None and spans.height(i) <= _MAX_HEIGHT:
                value = _loads(text[i:end + 1])
                if value is not None and not isinstance(value, (int, float, str)):
                    yield value
                    i = end + 1
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

    Never raises on bad model output: what cannot be parsed is skipped (logged at DEBUG). A size that is not two
    positive numbers (an image's path or None: a TypeError from inside) is an InputError."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in size):
        raise InputError(f"image_size must be the image's (width, height) in pixels, e.g. Image.open(path).size; "
                         f"got {image_size!r:.60}.")
    width, height = size
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


def draw_boxes(image: Image.Image | str | Path, boxes: list[Box]) -> Image.Image:
    """A copy of ``image`` (RGB) with each box outlined, each point marked, and labels written.

    ``image`` is opened as the processor opens it (EXIF orientation applied, high bit depths scaled), so the
    boxes land where the model saw things; map them with ``parse_boxes(text, load_image(image).size)``.
    Unusable images raise :class:`~mlx_gemma4.errors.InputError`."""
    from .processing.image import load_image

    picture = load_image(image)
    out = picture.copy() if picture is image else picture
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
