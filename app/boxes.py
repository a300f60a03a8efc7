"""Answers with box_2d / point_2d JSON about an attached image: draw them and save the picture."""

from __future__ import annotations

import time
from pathlib import Path


def annotate(answer: str, image: Path, out_dir: Path) -> Path | None:
    """Save `image` with the answer's boxes drawn on it; None when the answer has no boxes.

    The picture is opened exactly as the processor opens it for the model (EXIF orientation applied), so a
    portrait phone photo gets its boxes where the model saw the things. Unusable images raise InputError."""
    from mlx_gemma4.boxes import draw_boxes, parse_boxes
    from mlx_gemma4.processing.image import load_image

    if not parse_boxes(answer, (1, 1)):  # most answers have none: do not decode the image for them
        return None
    picture = load_image(image)
    drawn = draw_boxes(picture, parse_boxes(answer, picture.size))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{image.stem}-boxes-{time.strftime('%Y%m%d-%H%M%S')}.png"
    drawn.save(path)
    return path
