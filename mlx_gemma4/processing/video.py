"""Video loading (PyAV) and Gemma 4 video preprocessing (numpy + Pillow).

Reference: transformers ``models/gemma4/video_processing_gemma4.py`` (``Gemma4VideoProcessor``), the default
frame sampler in ``video_utils.default_sample_indices_fn`` and ``Gemma4Processor.replace_video_token``.
Frames are sampled uniformly (``index = i * total // num_frames``), each frame is preprocessed like an image
with a small budget (70 soft tokens by default), and the prompt gets one ``mm:ss <boi><video>...<eoi>`` group
per frame, stamped ``frame_index / fps`` seconds.

Two deliberate differences from the reference: a video shorter than ``num_frames`` keeps all its frames (the
reference raises), and frames are resized with Pillow's bicubic filter like images (the reference uses
torchvision's antialiased bicubic on tensors; pixel values differ by a few 1/255 steps where they differ).
Frames are also turned upright by the video's display matrix (a phone's portrait video is stored landscape),
as images are by their EXIF orientation.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import InputError, with_article
from .files import host_array, media_path, refuse_item
from .image import ImageProcessor, load_image

logger = logging.getLogger(__name__)

DEFAULT_FPS = 24.0  # what the reference assumes when a video's frame rate is unknown
FrameInput = Union[str, Path, Image.Image, np.ndarray]
VideoInput = Union[str, Path, np.ndarray, Sequence[FrameInput], "Video"]


@dataclass
class Video:
    """Sampled frames of one video and where they came from."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    frame_indices: list[int]  # index of each kept frame in the source
    total_num_frames: int
    fps: float | None = None  # of the source; None for frames given directly
    source: str = "<frames>"

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each kept frame, as the reference stamps them (``index / fps``, fps 24 if unknown)."""
        fps = self.fps or DEFAULT_FPS
        return [i / fps for i in self.frame_indices]


def sample_indices(total_num_frames: int, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None) -> list[int]:
    """Uniform sample of frame indices: ``num_frames`` (or ``fps`` per second of video) of them, at most all."""
    if total_num_frames <= 0:
        return []
    if num_frames is None and fps is not None:
        if not video_fps:
            raise InputError("Sampling by fps needs the video's frame rate; pass num_frames instead.")
        num_frames = max(1, int(total_num_frames / video_fps * fps))
    if num_frames is None or num_frames >= total_num_frames:
        return list(range(total_num_frames))
    return (np.arange(num_frames, dtype=np.int64) * total_num_frames // num_frames).tolist()


# Formats FFmpeg "opens" that are not media (a text file read as ANSI art, a subtitle file, ...).
NOT_MEDIA_FORMATS = {"tty", "txt", "srt", "ass", "webvtt"}


def is_still_image(path: Path) -> bool:
    """True when Pillow reads ``path`` as a still image (an animated GIF or WebP counts as a video)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return not getattr(im, "is_animated", False)
    except Image.DecompressionBombError:
        return True  # an image, too large: load_image says so
    except Exception:  # UnidentifiedImageError and whatever a half-matching plugin raises
        return False


def _open_container(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a video PyAV can read ({e}). Use an MP4, MOV, WebM or MKV file.") from e
    if container.format.name in NOT_MEDIA_FORMATS:
        container.close()
        raise InputError(f"{path} is not a video file (it reads as {container.format.name}). Use an MP4, MOV, "
                         "WebM or MKV file.")
    if not container.streams.video:
        kind = "audio only" if container.streams.audio else "no audio either"
        container.close()
        raise InputError(f"{path} has no video stream ({kind}). Pass an audio file as audio instead, or pick a "
                         "video file.")
    return container


def _count_frames(path: Path) -> int:
    """Frames of the first video stream, by decoding (some containers, WebM and MKV, do not record it)."""
    container = _open_container(path)
    try:
        return sum(1 for _ in container.decode(video=0))
    finally:
        container.close()


def _upright(pixels: np.ndarray, frame: Any) -> np.ndarray:
    """A frame as it is meant to be seen: a phone stores a portrait video landscape with a display matrix that
    says to turn it (``frame.rotation``, degrees counterclockwise), as a JPEG carries EXIF orientation."""
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # quarter turns counterclockwise
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def _read_path(path: Path, num_frames: int | None, fps: float | None) -> Video:
    import av

    try:
        container = _open_container(path)
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        video_fps = float(rate) if rate else None
        total = int(stream.frames or 0)
        if total <= 0:  # count by decoding, in a fresh container (seeking back is not possible in every format)
            container.close()
            total = _count_frames(path)
            container = _open_container(path)
        if total <= 0:
            raise InputError(f"{path} has a video stream but no frames. Re-encode or re-record the video.")
        wanted = sample_indices(total, num_frames, fps, video_fps)
        keep = set(wanted)
        frames, kept, size, decoded = [], [], None, 0
        try:
            for i, frame in enumerate(container.decode(video=0)):
                decoded = i + 1
                if i in keep:
                    # A stream may change size part way (clips joined, a WebRTC recording adapting to the
                    # network, a screen recording rotated): every frame is scaled to the first kept one's size.
                    size = size or (frame.width, frame.height)
                    rgb = frame.reformat(width=size[0], height=size[1], format="rgb24")
                    frames.append(_upright(rgb.to_ndarray(), frame))  # (H, W, 3) uint8
                    kept.append(i)
                if i >= wanted[-1]:
                    break
        finally:
            container.close()
    except av.FFmpegError as e:
        raise InputError(f"{path}: the video data is corrupt ({e}). Re-encode or re-download it.") from e
    if not frames:
        raise InputError(f"{path}: no frames could be decoded. Re-encode or re-download it.")
    if len(kept) < len(wanted):
        if total - decoded > max(2, total // 100):  # more than a codec's flush can lose: the data is cut short
            raise InputError(f"{path} is truncated or corrupt: its header promises {total} frames but only "
                             f"{decoded} decode, so the model would see only the start. Re-download or re-encode "
                             "it.")
        logger.warning("%s: header promised %d frames, decoded only %d", path, total, decoded)
    return Video(np.stack(frames), kept, total, video_fps, str(path))  # frames (T, H, W, 3)


def _from_frames(frames: Sequence[FrameInput] | np.ndarray, num_frames: int | None, fps: float | None) -> Video:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] not in (1, 2, 3, 4):
            raise InputError(f"A video array must be (T, H, W, C) with C in 1-4; got shape {frames.shape}.")
        frames = list(frames)
    total = len(frames)
    if total == 0:
        raise InputError("The video has no frames. Pass a video file or a non-empty list of frames.")
    wanted = sample_indices(total, num_frames, fps, None)
    arrays = [np.asarray(load_image(frames[i])) for i in wanted]  # each (H, W, 3) uint8
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise InputError(f"All frames of a video must have the same size; got {sorted(sizes)}. Resize them first.")
    return Video(np.stack(arrays), wanted, total, None)  # (T, H, W, 3)


def _read_animated_image(path: Path, num_frames: int | None, fps: float | None) -> Video:
    """An animated image (WebP, APNG, GIF) through Pillow's frames: FFmpeg decodes no animated WebP at all.
    The frame rate is read off the frames' durations (milliseconds each), when the file gives them."""
    with Image.open(path) as im:
        total = int(getattr(im, "n_frames", 1))
        durations = []
        for i in range(total):
            im.seek(i)
            im.load()  # WebP reads a frame's duration as it decodes it
            durations.append(im.info.get("duration") or 0)
        seconds = sum(durations) / 1000
        video_fps = total / seconds if seconds > 0 else None
        wanted = sample_indices(total, num_frames, fps, video_fps)
        frames = []
        for i in wanted:
            im.seek(i)
            frames.append(np.asarray(load_image(im)))  # (H, W, 3) uint8, transparency on white
    return Video(np.stack(frames), wanted, total, video_fps, str(path))  # frames (T, H, W, 3)


def is_animated_image(path: Path) -> bool:
    """True when Pillow reads ``path`` as an image of several frames."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return bool(getattr(im, "is_animated", False))
    except Exception:
        return False


def load_video(src: VideoInput, num_frames: int | None = 32, fps: float | None = None) -> Video:
    """Decode ``src`` (a file path, a (T, H, W, C) array, or a list of frames / PIL images / image paths) and
    keep at most ``num_frames`` uniformly sampled frames (or ``fps`` frames per second of video).

    A file is read by its content, whatever its name: a still image is a video of one frame, anything else
    goes to PyAV (MP4, MOV, WebM, MKV, AVI, MPEG-TS, Ogg, animated GIF, ...); an animated WebP,
    which FFmpeg cannot decode, is read frame by frame with Pillow. Unusable input raises
    :class:`InputError` naming the file.
    """
    if isinstance(src, Video):
        return src
    src = host_array(src)
    if isinstance(src, (str, Path)):
        path = media_path(src, "video")
        if is_still_image(path):
            return _from_frames([path], num_frames, fps)
        try:
            return _read_path(path, num_frames, fps)
        except InputError:
            if not is_animated_image(path):
                raise
            logger.debug("%s: PyAV cannot decode this animated image; reading its frames with Pillow", path)
            try:
                return _read_animated_image(path, num_frames, fps)
            except InputError:
                raise
            except Exception as e:  # Pillow's decoders raise OSError, EOFError, ValueError, ...
                raise InputError(f"{path}: the animation's data is truncated or corrupt ({e}). Re-save or "
                                 "re-download it.") from e
    if isinstance(src, (np.ndarray, list, tuple)):
        return _from_frames(src, num_frames, fps)
    refuse_item("video", src)


def _is_frame(item: Any) -> bool:
    """One picture: a PIL image, an (H, W) or (H, W, C) array, or a path to a still image."""
    if isinstance(item, Image.Image):
        return True
    if isinstance(item, np.ndarray):
        return item.ndim in (2, 3)
    if isinstance(item, (str, Path)):
        return is_still_image(media_path(item, "video"))
    return False


def group_videos(videos: Any) -> list[Any]:
    """The videos in a ``videos=`` argument, one entry per video (and so per ``<|video|>`` placeholder).

    A path, a (T, H, W, C) array or a :class:`Video` is one video; so is a list of frames (PIL images,
    (H, W[, C]) arrays, paths to still images); a list of videos (paths to video files, 4-D arrays, lists of
    frames) is several. A list mixing frames and videos is refused: it has no single meaning.
    """
    if videos is None:
        return []
    if isinstance(videos, (str, Path, Video, Image.Image, np.ndarray)):
        return [videos]
    if not isinstance(videos, (list, tuple)):
        raise InputError(f"Cannot use {type(videos).__name__} as videos; pass a video file path, a list of "
                         "frames (one video), or a list of those (several videos).")
    items = list(videos)
    frames = [_is_frame(v) for v in items]
    if items and all(frames):
        return [items]
    if any(frames):
        first = frames.index(True)
        raise InputError(f"videos= mixes single frames (item {first}: {_describe(items[first])}) with whole "
                         "videos. Pass one video's frames as a list, or several videos as a list of video paths "
                         "or of frame lists.")
    return items


def _describe(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return f"an array of shape {item.shape}"
    if isinstance(item, (str, Path)):
        return f"the still image {item}"
    return with_article(type(item).__name__)


def video_prompt_text(num_soft_tokens_per_frame: int, timestamps: Sequence[float], boi: str, video_token: str,
                      eoi: str) -> str:
    """The text that replaces one video placeholder, exactly as ``Gemma4Processor.replace_video_token``."""
    groups = []
    for seconds in timestamps:
        stamp = f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
        groups.append(f"{stamp} {boi}{video_token * num_soft_tokens_per_frame}{eoi}")
    return " ".join(groups)


def _video_frame_processor() -> ImageProcessor:
    # Gemma4VideoProcessor's frame settings: a 70-token budget, and a normalisation that is the identity.
    return ImageProcessor(max_soft_tokens=70, do_normalize=True)


@dataclass
class VideoProcessor:
    """Gemma 4 video preprocessing; defaults are ``Gemma4VideoProcessor``'s. Each sampled frame goes through
    ``frames``, an :class:`ImageProcessor` with the video's settings (per-frame budget, resize, rescale)."""

    frames: ImageProcessor = field(default_factory=_video_frame_processor)
    num_frames: int = 32
    fps: float | None = None
    do_sample_frames: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise InputError(f"num_frames must be a whole number >= 1; got {self.num_frames!r}.")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and 0 < self.fps < float("inf")):
            raise InputError(f"fps must be a positive number of frames per second, or None; got {self.fps!r}.")

    @property
    def max_soft_tokens(self) -> int:
        """Soft tokens per frame (the default budget)."""
        return self.frames.max_soft_tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoProcessor:
        """Build from processor_config.json (its "video_processor" section) or a flat video_preprocessor_config."""
        s = d["video_processor"] if isinstance(d.get("video_processor"), dict) else d
        defaults = cls().frames  # a subclass's default frame processor, of its own type
        frames = type(defaults).from_dict({"max_soft_tokens": defaults.max_soft_tokens,
                                           "do_normalize": defaults.do_normalize, **s})
        own = {k: s[k] for k in ("num_frames", "fps", "do_sample_frames") if s.get(k) is not None}
        return cls(frames=frames, **own)

    def load(self, src: VideoInput) -> Video:
        if not self.do_sample_frames:
            return load_video(src, num_frames=None)
        if self.fps is not None:
            return load_video(src, num_frames=None, fps=self.fps)
        return load_video(src, num_frames=self.num_frames)

    def __call__(self, videos: VideoInput | Sequence[VideoInput], max_soft_tokens: int | None = None) -> dict:
        """Preprocess one video or a list of videos (grouped as :func:`group_videos` says). Returns:

        - ``pixel_values_videos``: float32 [total_frames, max_patches, patch_size**2 * 3] (all videos' frames)
        - ``video_position_ids``: int64 [total_frames, max_patches, 2], (x, y), padding (-1, -1)
        - ``num_frames_per_video``: list[int]
        - ``num_soft_tokens_per_video``: list[int], soft tokens of ONE frame (the reference's meaning)
        - ``timestamps``: list[list[float]], seconds of each kept frame
        - ``fps``: list[float | None], of each source
        """
        budget = self.frames.budget(max_soft_tokens)
        videos = group_videos(videos)
        if len(videos) == 0:
            raise InputError("No videos to preprocess: pass a video file path, a list of frames (one video) or a "
                             "list of videos.")
        pixels, positions, frames_per, tokens_per, stamps, rates = [], [], [], [], [], []
        for src in videos:
            video = self.load(src)
            for frame in video.frames:
                p, pos, n = self.frames.preprocess_one(frame, budget)
                pixels.append(p)
                positions.append(pos)
            frames_per.append(len(video.frames))
            tokens_per.append(n)  # every frame of a video has the same size, hence the same count
            stamps.append(video.timestamps)
            rates.append(video.fps)
        return {
            "pixel_values_videos": np.stack(pixels),  # (total_frames, max_patches, p*p*3)
            "video_position_ids": np.stack(positions),  # (total_frames, max_patches, 2)
            "num_frames_per_video": frames_per,
            "num_soft_tokens_per_video": tokens_per,
            "timestamps": stamps,
            "fps": rates,
        }
