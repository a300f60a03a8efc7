"""Gemma 4 in pure MLX: text, vision and audio, with a converter and a chat app."""

from __future__ import annotations

import importlib

from .errors import ConfigError, ContextLengthError, Gemma4Error, InputError, OutputError, WeightsError

__all__ = [
    "ConfigError", "ContextLengthError", "Gemma4Error", "InputError", "OutputError", "WeightsError",
    "load", "generate", "stream_generate", "ChatSession",
]

# Public name -> the module that defines it. Imported on first use so `import mlx_gemma4` stays cheap for the
# CLI's --help and the app's start-up. No submodule shares a name with a public function.
_LAZY = {
    "load": "weights",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "ChatSession": "chat",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_gemma4' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
