"""Gemma 4 in pure MLX: text, vision and audio, with a converter and a chat app."""

from __future__ import annotations

import importlib

from .errors import (CacheError, ConfigError, ContextLengthError, Gemma4Error, InputError, MissingFileError,
                     OutputError, WeightsError)

__all__ = [
    "CacheError", "ConfigError", "ContextLengthError", "Gemma4Error", "InputError", "MissingFileError", "OutputError",
    "WeightsError",
    "load", "load_assistant", "generate", "stream_generate", "ChatSession",
    "ToolCall", "ToolCallError", "tool_schema", "parse_tool_calls", "split_answer", "ToolLoop", "run_tools",
]

# Public name -> the module that defines it. Imported on first use so `import mlx_gemma4` stays cheap for the
# CLI's --help and the app's start-up. No submodule shares a name with a public function.
_LAZY = {
    "load": "weights",
    "load_assistant": "assistant",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "ChatSession": "chat",
    "ChatResponse": "chat",
    "ToolCall": "tools",
    "ToolCallError": "tools",
    "tool_schema": "tools",
    "parse_tool_calls": "tools",
    "Answer": "tool_use",
    "split_answer": "tool_use",
    "ToolLoop": "tool_loop",
    "ToolRun": "tool_loop",
    "run_tools": "tool_loop",
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
