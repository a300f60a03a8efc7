"""The one check every media path goes through before a decoder sees it (images, audio, video)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, MissingFileError, with_article

# What each kind of file is, for messages that say what to pick instead.
_EXAMPLES = {"image": "a PNG, JPEG, WebP, GIF or BMP file", "audio": "a WAV, FLAC, OGG or MP3 file",
             "video": "an MP4, MOV, WebM or MKV file"}


def media_path(src: str | Path, kind: str) -> Path:
    """``src`` as a Path (``~`` expanded) to an existing, readable, non-empty file.

    Raises :class:`InputError` naming the path and saying what to do: missing, a directory, unreadable or empty.
    """
    path = Path(src).expanduser()
    what = _EXAMPLES.get(kind, "a media file")
    try:
        if not path.exists():
            raise MissingFileError(f"{path}: no such file. Check the path.", path=str(path))
        if path.is_dir():
            raise InputError(f"{path} is a directory, not {with_article(kind)} file. Pick {what} inside it.")
        if not path.is_file():
            raise InputError(f"{path} is not a regular file (a pipe or device?). Pass {what}.")
        with path.open("rb") as f:
            empty = f.read(1) == b""
    except PermissionError as e:
        raise InputError(f"{path}: permission denied. Check the file's permissions, or copy it somewhere "
                         "readable.") from e
    except OSError as e:  # a path too long, a broken network mount, ...
        raise InputError(f"{path}: cannot read the file ({e.strerror or e}). Check the path.") from e
    if empty:
        raise InputError(f"{path} is empty (0 bytes). Re-save or re-download the {kind}.")
    return path
