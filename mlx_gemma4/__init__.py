"""Gemma 4 in pure MLX: text, vision and audio, with a converter and a chat app."""

from __future__ import annotations

from .errors import ConfigError, ContextLengthError, Gemma4Error, InputError, WeightsError

__all__ = [
    "ConfigError", "ContextLengthError", "Gemma4Error", "InputError", "WeightsError",
    "load", "generate", "stream_generate",
]


def __getattr__(name):
    # Imported lazily so `import mlx_gemma4` stays cheap for the CLI's --help and for the app's start-up.
    if name == "load":
        from .weights import load
        return load
    if name in ("generate", "stream_generate", "ChatSession"):
        from . import generate as g
        return getattr(g, name)
    raise AttributeError(name)
