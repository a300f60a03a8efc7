"""``python -m mlx_gemma4.server``: the same as ``gemma4-serve``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
