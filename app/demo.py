"""`--demo`: a tiny random-weight Gemma 4 built in memory, so the app can be tried with no download."""

from __future__ import annotations

from typing import Any, Callable


def build_demo(progress: Callable[[int, int, str], None] | None = None) -> tuple[Any, Any]:
    """(model, processor) with random weights and a tiny tokenizer, from mlx_gemma4.demo."""
    try:
        from mlx_gemma4.demo import build_demo as build
    except ImportError as e:
        raise RuntimeError("This version of mlx_gemma4 has no demo model (mlx_gemma4.demo.build_demo).") from e
    if progress:
        progress(0, 1, "Building a tiny random model…")
    out = build()
    if progress:
        progress(1, 1, "Demo model ready")
    return out
