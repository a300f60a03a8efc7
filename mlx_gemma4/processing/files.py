"""The one check every media path goes through before a decoder sees it (images, audio, video), and the cheap
check of any media item (``check_item``: a path that is there, or an object of a kind the decoders take)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError, MissingFileError, with_article

# What each kind of file is, for messages that say what to pick instead.
_EXAMPLES = {"image": "a PNG, JPEG, WebP, GIF or BMP file", "audio": "a WAV, FLAC, OGG or MP3 file",
             "video": "an MP4, MOV, WebM or MKV file"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def media_path(src: str | Path, kind: str) -> Path:
    """``src`` as a Path (``~`` expanded) to an existing, readable, non-empty file.

    Raises :class:`InputError` naming the path and saying what to do: missing, a directory, unreadable or empty.
    """
    what = _EXAMPLES.get(kind, "a media file")
    takes = _TAKES.get(kind, "a file path")
    if isinstance(src, str) and src[:5].lower() == "data:":   # (it was looked for as a file: "no such file")
        raise InputError(f"{src[:40]}... is a data: URI; media are read from files or objects here. Decode it to a "
                         f"file or an object first; pass {takes}.")
    scheme = _URL.match(str(src)) if isinstance(src, str) else None
    if scheme and scheme.group(1).lower() != "file":
        raise InputError(f"{src} is a URL; media are read from files, never downloaded. Download it and pass "
                         f"{takes}, e.g. {what}.")
    if scheme:   # file:///home/me/cat.png
        from urllib.parse import unquote, urlparse

        src = unquote(urlparse(src).path)
    path = Path(src).expanduser()
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


def host_array(src):
    """An MLX array given as media (pixels, samples or frames made by other MLX code) as a numpy array, which the
    decoders take; anything else as it is."""
    import mlx.core as mx
    import numpy as np

    if isinstance(src, mx.array):
        return np.array(src.astype(mx.float32) if src.dtype == mx.bfloat16 else src)
    return src


# What each kind takes besides a path, for the message that refuses anything else.
_TAKES = {"image": "a file path, a PIL.Image or an HxWxC array", "audio": "a file path or a numpy array",
          "video": "a file path or a list of frames"}
_AS = {"image": "an image", "audio": "audio", "video": "a video"}


def refuse_item(kind: str, src) -> None:
    """Raise the InputError for ``src``, an object no decoder of ``kind`` takes."""
    raise InputError(f"Cannot use {with_article(type(src).__name__)} as {_AS[kind]}; pass {_TAKES[kind]}.")


def check_item(kind: str, src) -> None:
    """The checks of a media item that read nothing: a path names a readable file (``media_path``), anything
    else is of a type the ``kind``'s decoder takes (what it holds is checked when it is decoded)."""
    from collections.abc import Sequence

    import numpy as np

    src = host_array(src)
    if isinstance(src, (str, Path)):
        media_path(src, kind)
        return
    if isinstance(src, np.ndarray):
        return
    if kind == "image":
        from PIL import Image

        if isinstance(src, Image.Image):
            return
    elif isinstance(src, Sequence) and not isinstance(src, (bytes, bytearray)):
        return   # audio samples, or a video's frames
    refuse_item(kind, src)
