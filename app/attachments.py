"""Find the files a user pasted or dragged into the prompt and check they are what they claim.

Dragging a file into a terminal pastes its path, spelled the way the terminal likes: quoted ('/a b.png'),
backslash-escaped (/a\\ b.png) or as a file:// URI (file:///a%20b.png), several at once separated by spaces.
`parse_prompt` finds those paths, sniffs the files' contents (the extension alone proves nothing), takes the
media files out of the text and says in plain words why any other path-looking word was left alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

Kind = Literal["image", "audio", "video"]  # the kinds of mlx_gemma4.media.MEDIA

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic"}
AUDIO_EXTS = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif"}
VIDEO_EXTS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"}
MEDIA_EXTS = IMAGE_EXTS | AUDIO_EXTS | VIDEO_EXTS

# One word of a pasted line: a quoted string, or a run of non-space characters where "\x" escapes x. Inside single
# quotes, '\'' is an apostrophe: GNOME Terminal and kitty drop "Bob's pic.png" as 'Bob'\''s pic.png'.
_WORD = re.compile(r"""'(?P<sq>(?:[^']|'\\'')*)'|"(?P<dq>(?:\\.|[^"\\])*)"|(?P<bare>(?:\\.|[^\s'"\\])+)""")
_NOT_MEDIA_FORMATS = {"tty", "txt", "srt", "ass", "webvtt", "image2", "png_pipe", "jpeg_pipe"}
_PATH_START = re.compile(r"^(?:file://|~|/|\.{1,2}/)")


class AttachmentError(Exception):
    """A file the user named cannot be attached; the message says why."""


@dataclass(frozen=True)
class Attachment:
    """A checked media file: its kind and what the chips on a message show."""

    path: Path
    kind: Kind
    size: tuple[int, int] | None = None  # (width, height) for images and videos
    duration: float | None = None  # seconds, for audio and video

    @property
    def label(self) -> str:
        parts = [self.path.name]
        if self.size:
            parts.append(f"{self.size[0]}x{self.size[1]}")
        if self.duration is not None:
            parts.append(f"{self.duration:.1f}s")
        return " · ".join(parts)


@dataclass
class ParsedPrompt:
    text: str
    attachments: list[Attachment] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def to_path(word: str) -> Path:
    """A pasted word (quotes and escapes already removed, or a file:// URI) as an absolute-ish Path."""
    if word.startswith("file://"):
        word = unquote(urlparse(word).path)
    return Path(os.path.expanduser(word))


def sniff(path: Path) -> Attachment:
    """Open the file and decide from its contents whether it is an image, audio or video.

    Raises `AttachmentError` with a message fit to show the user.
    """
    state = _state(path)
    if state == "missing":
        raise AttachmentError(f"{path}: no such file; check the path (quote it, or escape its spaces with \\)")
    if state == "dir":
        raise AttachmentError(f"{path}: is a folder; name an image, audio or video file in it")
    if state != "file":
        raise AttachmentError(f"{path}: not a file; name an image, audio or video file")
    try:
        with path.open("rb") as f:
            first = f.read(1)
    except OSError as e:
        raise AttachmentError(f"{path}: cannot be read ({e.strerror or e})") from e
    if not first:
        raise AttachmentError(f"{path.name}: the file is empty (0 bytes)")
    found = _sniff_image(path) or _sniff_audio(path) or _sniff_av(path)
    if found is None:
        raise AttachmentError(f"{path.name}: not an image, audio or video file")
    return found


def _state(path: Path) -> str:
    """"file", "dir", "other" or "missing"; a name the OS refuses (too long, a NUL byte) counts as missing."""
    try:
        if path.is_file():
            return "file"
        if path.is_dir():
            return "dir"
        return "other" if path.exists() else "missing"
    except (OSError, ValueError):
        return "missing"


def _sniff_image(path: Path) -> Attachment | None:
    from mlx_gemma4.errors import InputError
    from mlx_gemma4.processing.image import probe_image

    from mlx_gemma4.processing.image import load_image

    try:
        size = probe_image(path)  # the processor's own test of an image, so the two never disagree
    except InputError as e:  # over Pillow's decompression-bomb limit
        raise AttachmentError(f"{path.name}: the image is too large to open safely; downscale it first") from e
    if size is None:
        return None
    try:   # decoded whole now, as the model will read it: a cut or corrupt file failed only once sent
        load_image(path)
    except InputError as e:
        raise AttachmentError(str(e).replace(str(path), path.name)) from e
    return Attachment(path, "image", size=size)


def _sniff_audio(path: Path) -> Attachment | None:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # LibsndfileError, RuntimeError, TypeError, ...: not a format libsndfile reads
        return None
    if info.frames <= 0:
        raise AttachmentError(f"{path.name}: the audio file holds no sound (0 samples); record or choose another clip")
    from mlx_gemma4.processing.audio_file import SAMPLING_RATE

    shortest = _shortest_clip()
    if info.frames * SAMPLING_RATE / info.samplerate < shortest:   # failed only once sent
        raise AttachmentError(f"{path.name}: the clip is {1000 * info.frames / info.samplerate:.2g} ms long, too "
                              f"short to hear anything in (at least {1000 * shortest / SAMPLING_RATE:.3g} ms)")
    return Attachment(path, "audio", duration=info.frames / info.samplerate)


def _shortest_clip() -> int:
    """Samples (16 kHz) of the shortest clip the audio tower reads: one analysis window (the reference's)."""
    from mlx_gemma4.processing.audio import AudioFeatureExtractor

    return AudioFeatureExtractor().min_samples


def _sniff_av(path: Path) -> Attachment | None:
    """Containers soundfile cannot read (mp4, mov, m4a, ...): a video stream makes it a video."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as box:
            duration = box.duration / 1_000_000 if box.duration else None
            if box.format.name in _NOT_MEDIA_FORMATS:
                return None
            # FFmpeg will "open" almost anything; decoding a first frame is the proof.
            if box.streams.video and box.streams.video[0].width > 0:
                v = box.streams.video[0]
                first = next(box.decode(video=0))
                size = (v.width, v.height)
                if round((getattr(first, "rotation", 0) or 0) / 90) % 2:  # a phone's portrait video, stored turned
                    size = (v.height, v.width)
                return Attachment(path, "video", size=size, duration=duration)
            if box.streams.audio:
                next(box.decode(audio=0))
                return Attachment(path, "audio", duration=duration)
    except Exception:  # FFmpegError, OSError, ValueError, UnicodeDecodeError, StopIteration, ...
        return None
    return None


def check(path: str | Path, expect: Kind | None = None) -> Attachment:
    """Check one file named explicitly (/image PATH, the file picker); `expect` is the kind it must be."""
    p = to_path(str(path).strip()) if isinstance(path, str) else path
    att = sniff(p)
    if expect == "video" and att.kind == "image":
        from mlx_gemma4.processing.video import is_animated_image

        if is_animated_image(p):   # /video anim.gif: its frames are a video (pasted, it is an image)
            return Attachment(p, "video", size=att.size)
    if expect is not None and att.kind != expect:
        raise AttachmentError(f"{p.name}: is {_a(att.kind)}, not {_a(expect)}; attach it with /{att.kind} PATH, "
                              "or paste its path into the message")
    return att


def _a(kind: str) -> str:
    from mlx_gemma4.errors import with_article

    return "audio" if kind == "audio" else with_article(kind)   # (audio takes no article)


def once_each(attachments: list[Attachment]) -> tuple[list[Attachment], list[Attachment]]:
    """``attachments`` with each file once, in order, and the repeats left out: the same file however its path was
    written (relative, file://, through a link)."""
    seen: set = set()
    kept: list[Attachment] = []
    repeats: list[Attachment] = []
    for a in attachments:
        try:
            st = a.path.stat()
            key: object = (st.st_dev, st.st_ino)
        except OSError:
            key = a.path.resolve()
        (repeats if key in seen else kept).append(a)
        seen.add(key)
    return kept, repeats


def repeat_notice(a: Attachment) -> str:
    return f"{a.path.name} is already attached; it goes with the message once."


def _claimed_kind(path: Path) -> Kind | None:
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def parse_prompt(text: str) -> ParsedPrompt:
    """Split a prompt into the words to send and the media files pasted into it.

    A word is a candidate when it looks like a path (starts with /, ~, ./, ../ or file://). A bare one that names
    no file is read with the punctuation that ends a sentence taken off (``what is in ~/dog.jpg?``) and, failing
    that, with the words after it on its line joined by spaces, as a path copied unquoted ("Copy as Pathname":
    ``/Users/me/voice memo.wav``) arrives. Media files are attached and removed from the text (punctuation after
    them stays); a candidate that names a missing file with a media extension, a file that is not media, or media
    that does not open gets a notice and stays in the text.
    """
    out = ParsedPrompt(text="")
    cuts: list[tuple[int, int]] = []  # spans of the text taken out: attached paths and the blanks beside them
    words = list(_WORD.finditer(text))
    i = 0
    while i < len(words):
        m = words[i]
        i += 1
        word = _unescape(m)
        if not _PATH_START.match(word):
            continue
        path, end = to_path(word), m.end()
        state = _state(path)
        if state == "missing" and m.group("bare") is not None:
            found = _unquoted(text, words, i - 1)
            if found is not None:
                word, end, i = found
                path, state = to_path(word), "file"
        claimed = _claimed_kind(to_path(word.rstrip(_SENTENCE_END)))
        if state == "missing":
            if claimed or m.group("sq") is not None or m.group("dq") is not None or word.startswith("file://"):
                out.notices.append(f"{word.rstrip(_SENTENCE_END)}: no such file, left in the message")
            continue
        if state == "dir":
            continue
        try:
            att = sniff(path)
        except AttachmentError as e:
            out.notices.append(f"{e}; left in the message")
            continue
        if claimed and claimed != att.kind:
            out.notices.append(f"{path.name}: named like {_a(claimed)} but is {_a(att.kind)}; attached as {att.kind}")
        out.attachments.append(att)
        cuts.append(_with_blank_beside(text, m.start(), end, cuts[-1][1] if cuts else 0))
    out.text = _cut(text, cuts)
    return out


_SENTENCE_END = "?!.,;:)]}'\""
_MAX_JOINED = 8   # words of an unquoted path with spaces, at most


def _unquoted(text: str, words: list[re.Match], i: int) -> tuple[str, int, int] | None:
    """The file a bare path-like word that names none stands for: itself without the punctuation ending it, or it
    with the next words of its line (as typed, spaces kept), with or without such punctuation; the shortest that
    names a media file (by its extension: these are guesses, and a guess at another file is no attachment). (the
    path, the end of its span in ``text``, the index of the first word after it) or None."""
    for j in range(i, min(i + _MAX_JOINED, len(words))):
        if j > i and (words[j].group("bare") is None or "\n" in text[words[j - 1].end():words[j].start()]):
            return None
        word = re.sub(r"\\(.)", r"\1", text[words[i].start():words[j].end()])
        stripped = word.rstrip(_SENTENCE_END)
        for candidate in dict.fromkeys([stripped] if j == i else [word, stripped]):   # (the word alone: checked)
            path = to_path(candidate)
            if candidate and _claimed_kind(path) and _state(path) == "file":
                return candidate, words[j].end() - (len(word) - len(candidate)), j + 1   # (punctuation stays)
    return None


def _with_blank_beside(text: str, start: int, end: int, floor: int) -> tuple[int, int]:
    """The span of a path to take out, with the spaces after it (or, at the end of a line, those before it), so
    "look at /a.png please" reads "look at please" and nothing else in the text moves."""
    after = end
    while after < len(text) and text[after] in " \t":
        after += 1
    if after > end:
        return start, after
    while start > floor and text[start - 1] in " \t":
        start -= 1
    return start, end


def _cut(text: str, cuts: list[tuple[int, int]]) -> str:
    """`text` without the `cuts`; the user's spacing, indentation and line breaks stay as typed, except lines
    that held only paths, which go."""
    if not cuts:
        return text.strip()
    kept, pos = [], 0
    for a, b in cuts:
        kept.append(text[pos:a])
        pos = b
    kept.append(text[pos:])
    before, after = text.split("\n"), "".join(kept).split("\n")
    if len(before) == len(after):  # (a quoted path may span lines; then no line is dropped)
        after = [new for old, new in zip(before, after) if new.strip() or not old.strip()]
    return "\n".join(after).strip()


def _unescape(m: re.Match) -> str:
    if m.group("sq") is not None:
        return m.group("sq").replace("'\\''", "'")
    if m.group("dq") is not None:
        return re.sub(r"\\(.)", r"\1", m.group("dq"))
    return re.sub(r"\\(.)", r"\1", m.group("bare"))
