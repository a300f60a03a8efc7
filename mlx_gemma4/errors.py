"""One small error hierarchy; every message says what to do next."""

from __future__ import annotations


class Gemma4Error(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(Gemma4Error):
    """config.json is missing, unreadable, or not a Gemma 4 config; or an argument is out of range."""


class WeightsError(Gemma4Error):
    """Weights are missing, truncated, in a format we do not read, or do not match the config."""


class OutputError(Gemma4Error):
    """The converter may not replace its destination, or cannot write it (disk full, permissions)."""


class InputError(Gemma4Error):
    """A prompt, image, audio clip or video the user gave cannot be used."""


class MissingFileError(InputError):
    """A media file a prompt or message names is not there; ``path`` is where it was looked for (a caller can
    add its own advice: the app asks for the file to be dragged in again)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ContextLengthError(InputError):
    """The prompt does not fit in the model's context window.

    ``tokens`` and ``limit`` say by how much; in a chat, ``drop_turns`` > 0 is how many of the oldest turns must
    go for it to fit, and 0 means ``too_long`` alone is too long: "message" (the newest) or "system prompt".
    """

    def __init__(self, message: str, *, tokens: int = 0, limit: int = 0, drop_turns: int = 0,
                 too_long: str = "message") -> None:
        super().__init__(message)
        self.tokens, self.limit, self.drop_turns, self.too_long = tokens, limit, drop_turns, too_long


class CacheError(Gemma4Error):
    """A KV cache was asked for something it does not keep (e.g. to rewind further than it can)."""


def preview(items: list[str], n: int = 8) -> str:
    """The first ``n`` names and how many more: for messages that list what is missing or in the way."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


_SAYS_YOU = ("uni", "use", "usa", "usu", "uint")   # "a user", "a uint8 array": a vowel letter, a consonant sound


def with_article(word: str) -> str:
    """``word`` with its article, for messages: "an image", "a video", "an assistant", "a user"."""
    vowel = word[:1].lower() in "aeiou" and not word.lower().startswith(_SAYS_YOU)
    return f"{'an' if vowel else 'a'} {word}"
