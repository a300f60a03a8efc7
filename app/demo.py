"""`--demo`: mlx_gemma4's tiny random-weight Gemma 4, built in memory, so the app can be tried with no download."""

from __future__ import annotations

import tempfile
from typing import Any, Callable

BANNER = "DEMO MODE: a tiny model with random weights. Its output is random text."


def build_demo(progress: Callable[[int, int, str], None] | None = None, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of mlx_gemma4.demo; its tokenizer files only live until the processor has read them."""
    from mlx_gemma4.demo import build_demo as build

    if progress:
        progress(0, 1, "Building a tiny random model…")
    with tempfile.TemporaryDirectory(prefix="gemma4-demo-") as tmp:
        out = build(seed=seed, path=tmp)
    if progress:
        progress(1, 1, "Demo model ready")
    return out
