"""One small error hierarchy; every message says what to do next."""

from __future__ import annotations


class Gemma4Error(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(Gemma4Error):
    """config.json is missing, unreadable, or not a Gemma 4 config."""


class WeightsError(Gemma4Error):
    """Weights are missing, truncated, or do not match the config."""


class InputError(Gemma4Error):
    """A prompt, image, audio clip or video the user gave cannot be used."""


class ContextLengthError(InputError):
    """The prompt does not fit in the model's context window."""
