"""Video loading (PyAV) and Gemma 4 video preprocessing (numpy + Pillow).

Reference: transformers ``models/gemma4/video_processing_gemma4.py`` (``Gemma4VideoProcessor``), the default
frame sampler in ``video_utils.default_sample_indices_fn`` and ``Gemma4Processor.replace_video_token``.
Frames are sampled uniformly (``index = i * total // num_frames``), each frame is preprocessed like an image
with a small budget (70 soft tokens by default), and the prompt gets one ``mm:ss <boi><video>...<eoi>`` group
per frame, stamped ``frame_index / fps`` seconds.

Two deliberate differences from the reference: a video shorter than ``num_frames`` keeps all its frames (the
reference raises), and frames are resized with Pillow's bicubic filter like images (the reference uses
torchvision's antialiased bicubic on tensors; pixel values differ by a few 1/255 steps where they differ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import InputError
from .image import SUPPORTED_SOFT_TOKENS, ImageProcessor, load_image

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


def _open_container(path: Path):
    import av

    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path (drag the file in again, or quote spaces).")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a video file. Pick a video file inside it.")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes). Re-save or re-download the video.")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a video PyAV can read ({e}). Use an MP4, MOV, WebM or MKV file.") from e
    if not container.streams.video:
        container.close()
        raise InputError(f"{path} has no video stream (is it audio only?). Pass an audio file as audio instead.")
    return container


def _read_path(path: Path, num_frames: int | None, fps: float | None) -> Video:
    import av

    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        video_fps = float(rate) if rate else None
        total = int(stream.frames or 0)
        if total <= 0:  # some containers (WebM, MKV) do not record a frame count: count by decoding
            total = sum(1 for _ in container.decode(video=0))
            container.seek(0)
        wanted = sample_indices(total, num_frames, fps, video_fps)
        keep = set(wanted)
        frames, kept = [], []
        for i, frame in enumerate(container.decode(video=0)):
            if i in keep:
                frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
                kept.append(i)
            if i >= wanted[-1]:
                break
    except av.FFmpegError as e:
        raise InputError(f"{path}: the video data is corrupt ({e}). Re-encode or re-download it.") from e
    except IndexError as e:  # wanted is empty
        raise InputError(f"{path} has no frames to decode. Re-encode or re-download it.") from e
    finally:
        container.close()
    if not frames:
        raise InputError(f"{path}: no frames could be decoded. Re-encode or re-download it.")
    if len(kept) < len(wanted):
        logger.warning("%s: header promised %d frames, decoded only %d", path, total, kept[-1] + 1)
    return Video(np.stack(frames), kept, total, video_fps, str(path))  # frames (T, H, W, 3)


def _from_frames(frames: Sequence[FrameInput] | np.ndarray, num_frames: int | None, fps: float | None) -> Video:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
            raise InputError(f"A video array must be (T, H, W, C) with C in 1, 3, 4; got shape {frames.shape}.")
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


def load_video(src: VideoInput, num_frames: int | None = 32, fps: float | None = None) -> Video:
    """Decode ``src`` (a file path, a (T, H, W, C) array, or a list of frames / PIL images / image paths) and
    keep at most ``num_frames`` uniformly sampled frames (or ``fps`` frames per second of video).

    Unusable input raises :class:`InputError` naming the file.
    """
    if isinstance(src, Video):
        return src
    if isinstance(src, (str, Path)):
        return _read_path(Path(src), num_frames, fps)
    if isinstance(src, (np.ndarray, list, tuple)):
        return _from_frames(src, num_frames, fps)
    raise InputError(f"Cannot use {type(src).__name__} as a video; pass a file path or a list of frames.")


def video_prompt_text(num_soft_tokens_per_frame: int, timestamps: Sequence[float], boi: str, video_token: str,
                      eoi: str) -> str:
    """The text that replaces one video placeholder, exactly as ``Gemma4Processor.replace_video_token``."""
    groups = []
    for seconds in timestamps:
        stamp = f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
        groups.append(f"{stamp} {boi}{video_token * num_soft_tokens_per_frame}{eoi}")
    return " ".join(groups)


@dataclass
class VideoProcessor:
    """Gemma 4 video preprocessing; defaults are ``Gemma4VideoProcessor``'s."""

    max_soft_tokens: int = 70  # per frame
    patch_size: int = 16
    pooling_kernel_size: int = 3
    num_frames: int = 32
    fps: float | None = None
    do_sample_frames: bool = True
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True  # with mean 0 and std 1: the identity, as in the reference
    image_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise InputError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}; got {self.max_soft_tokens}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoProcessor:
        """Build from processor_config.json (its "video_processor" section) or a flat video_preprocessor_config."""
        s = d["video_processor"] if isinstance(d.get("video_processor"), dict) else d
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in s if k not in names)
        if unknown:
            logger.debug("VideoProcessor: ignoring keys %s", unknown)
        return cls(**{k: v for k, v in s.items() if k in names and v is not None})

    def _frame_processor(self) -> ImageProcessor:
        return ImageProcessor(
            max_soft_tokens=self.max_soft_tokens, patch_size=self.patch_size,
            pooling_kernel_size=self.pooling_kernel_size, do_resize=self.do_resize, resample=self.resample,
            do_rescale=self.do_rescale, rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
            image_mean=list(self.image_mean), image_std=list(self.image_std),
        )

    def load(self, src: VideoInput) -> Video:
        if not self.do_sample_frames:
            return load_video(src, num_frames=None)
        if self.fps is not None:
            return load_video(src, num_frames=None, fps=self.fps)
        return load_video(src, num_frames=self.num_frames)

    def __call__(self, videos: VideoInput | Sequence[VideoInput], max_soft_tokens: int | None = None) -> dict:
        """Preprocess one video or a list of videos. Returns:

        - ``pixel_values_videos``: float32 [total_frames, max_patches, patch_size**2 * 3] (all videos' frames)
        - ``video_position_ids``: int64 [total_frames, max_patches, 2], (x, y), padding (-1, -1)
        - ``num_frames_per_video``: list[int]
        - ``num_soft_tokens_per_video``: list[int], soft tokens of ONE frame (the reference's meaning)
        - ``timestamps``: list[list[float]], seconds of each kept frame
        - ``fps``: list[float | None], of each source
        """
        budget = max_soft_tokens or self.max_soft_tokens
        if budget not in SUPPORTED_SOFT_TOKENS:
            raise InputError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}; got {budget}.")
        if isinstance(videos, (str, Path, Video)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
            videos = [videos]
        elif isinstance(videos, (list, tuple)) and videos and not isinstance(videos[0], (list, tuple, Video)) \
                and not (isinstance(videos[0], (str, Path)) and _looks_like_video(videos[0])) \
                and not (isinstance(videos[0], np.ndarray) and videos[0].ndim == 4):
            videos = [videos]  # a single video given as a list of frames
        if len(videos) == 0:
            raise InputError("No videos to preprocess.")
        frame_proc = self._frame_processor()
        pixels, positions, frames_per, tokens_per, stamps, rates = [], [], [], [], [], []
        for src in videos:
            video = self.load(src)
            for frame in video.frames:
                p, pos, n = frame_proc.preprocess_one(frame, budget)
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


_VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}


def _looks_like_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in _VIDEO_SUFFIXES
