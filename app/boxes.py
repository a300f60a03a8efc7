"""Answers with box_2d / point_2d JSON about an attached image: draw them and save the picture."""

from __future__ import annotations

import time
from pathlib import Path


def annotate(answer: str, image: Path, out_dir: Path) -> Path | None:
    """Save `image` with the answer's boxes drawn on it; None when the answer has no boxes."""
    from PIL import Image

    from mlx_gemma4.boxes import draw_boxes, parse_boxes

    with Image.open(image) as im:
        boxes = parse_boxes(answer, im.size)
        if not boxes:
            return None
        drawn = draw_boxes(im, boxes)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{image.stem}-boxes-{time.strftime('%Y%m%d-%H%M%S')}.png"
    drawn.save(path)
    return path
