"""The Gemma 4 processor: prompt text + images / audio / video -> the model's inputs as mx.arrays.

Reference: transformers ``models/gemma4/processing_gemma4.py`` (``Gemma4Processor``) and ``ProcessorMixin``.
A prompt carries one placeholder per media item, the strings the tokenizer names (``<|image|>``, ``<|audio|>``,
``<|video|>``). Each is expanded in prompt order before tokenizing:

    image  -> boi + image_token * n + eoi                  n = the image's soft tokens
    audio  -> boa + audio_token * n + eoa                  one run per <= 30 s segment of the clip
    video  -> "mm:ss boi video_token*n eoi" per frame, joined by spaces

The image, audio and video preprocessors are imported on first use, so text-only use needs none of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, ContextLengthError, InputError
from ..media import MEDIA
from .tokenizer import SpecialTokens, Tokenizer, read_json_object

logger = logging.getLogger(__name__)

# Bookkeeping the sub-processors return that is not a model input.
_NOT_INPUTS = {"num_soft_tokens_per_image", "num_soft_tokens_per_audio", "num_soft_tokens_per_video",
               "segments_per_audio", "timestamps", "video_metadata", "num_frames_per_video", "fps"}


def media_items(kind: str, given: Any) -> list[Any]:
    """The items of an ``images=`` / ``audio=`` / ``videos=`` argument: [] for None, one item or a list of them (for
    video, ``video.group_videos``: a flat list of frames is one video)."""
    if given is None:
        return []
    if kind == "video":
        from .video import group_videos

        return group_videos(given)
    return list(given) if isinstance(given, (list, tuple)) else [given]


def _context_length(config: dict[str, Any]) -> int | None:
    """max_position_embeddings from a config.json (in text_config, or at the top level); None if absent."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _is_unified(config: dict[str, Any], *processor_files: dict[str, Any] | None) -> bool:
    """Whether a checkpoint is Gemma 4 12B (encoder-free): config.json's model_type says so or, in a directory
    without one, the processor files name the unified processor classes."""
    if config.get("model_type"):
        return str(config["model_type"]).startswith("gemma4_unified")
    sections = [s for d in processor_files if d
                for s in (d, d.get("image_processor"), d.get("feature_extractor"), d.get("video_processor"))]
    keys = ("processor_class", "image_processor_type", "feature_extractor_type", "video_processor_type")
    return any(isinstance(s, dict) and str(s.get(k, "")).startswith("Gemma4Unified") for s in sections for k in keys)


def _duration(samples: int, rate: int) -> str:
    seconds = samples / rate
    return f"{int(seconds // 60)} min {seconds % 60:.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


class Processor:
    """Tokenizer + media preprocessors of one Gemma 4 checkpoint.

    ``processor(text=PROMPT, images=[...], audio=[...], videos=[...])`` returns a dict of mx.arrays:
    ``input_ids`` int32 [1, L], ``mm_token_type_ids`` int32 [1, L] (0 text, 1 image, 2 video, 3 audio soft
    token), and the media tensors under the reference's names (``pixel_values``, ``image_position_ids``,
    ``input_features``, ``input_features_mask``, ``pixel_values_videos``, ...).
    """

    def __init__(self, tokenizer: Tokenizer, processor_config: dict[str, Any] | None = None,
                 image_config: dict[str, Any] | None = None, video_config: dict[str, Any] | None = None,
                 context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length  # the model's, when known: media that cannot fit is refused early
        self.processor_config = processor_config or {}
        self._image_config = image_config
        self._video_config = video_config
        self._image_processor: Any = None
        self._audio_extractor: Any = None
        self._video_processor: Any = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Load from a local checkpoint directory (tokenizer files, config.json, processor_config.json).

        Called on ``Processor``, it returns the processor of the checkpoint's family: a
        :class:`~mlx_gemma4.processing.unified.UnifiedProcessor` for Gemma 4 12B (``gemma4_unified``)."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path} is not a directory; pass a converted checkpoint directory.")
        config = read_json_object(path / "config.json") or {}
        processor_config = read_json_object(path / "processor_config.json") or {}
        image_config = read_json_object(path / "preprocessor_config.json") or None
        video_config = read_json_object(path / "video_preprocessor_config.json") or None
        family = cls
        if cls is Processor and _is_unified(config, processor_config, image_config, video_config):
            from .unified import UnifiedProcessor

            family = UnifiedProcessor
        tokenizer = Tokenizer.from_pretrained(path)
        return family(tokenizer, processor_config, image_config, video_config, _context_length(config))

    # -- tokenizer facade ----------------------------------------------------------------------------------------

    @property
    def special(self) -> SpecialTokens:
        return self.tokenizer.special

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a reply: config.json's (and generation_config.json's) EOS ids plus end-of-turn."""
        return self.tokenizer.eos_token_ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, tools: list[Any] | None = None,
                            tokenize: bool = False, **kwargs: Any) -> str | dict[str, mx.array]:
        """The prompt string for `messages` (see Tokenizer.apply_chat_template). With ``tokenize=True`` the
        input dict of the messages, with the media found in their parts (keys "image", "audio", "video", or
        "path" / "url" / "file"): the ids of the prompt string, except that the messages' text stays text (a
        control token or placeholder typed in it is not one; see chat_prompt.py), as in a ChatSession."""
        if not tokenize:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=enable_thinking, tools=tools, **kwargs)
        from .chat_prompt import ChatEncoder, stack_inputs

        enc = ChatEncoder(self).encode(messages, add_generation_prompt=add_generation_prompt,
                                       enable_thinking=enable_thinking, tools=tools, **kwargs)
        inputs = {"input_ids": mx.array(enc.ids[None]),  # (1, L)
                  "mm_token_type_ids": mx.array(self.mm_token_type_ids(enc.ids)[None])}  # (1, L)
        inputs.update(stack_inputs([item for _, _, item in enc.items]))
        return inputs

    # -- media preprocessors (lazy) ------------------------------------------------------------------------------

    def _settings(self, kind: str) -> dict[str, Any]:
        """The settings of one media kind's preprocessor, looked up where transformers looks: its section of
        processor_config.json, else its own file (preprocessor_config.json; for video
        video_preprocessor_config.json, then preprocessor_config.json), else processor_config.json as it is."""
        from .audio import AUDIO_SECTIONS

        sections, files = {"image": (("image_processor",), [self._image_config]),
                           "audio": (AUDIO_SECTIONS, [self._image_config]),
                           "video": (("video_processor",), [self._video_config, self._image_config])}[kind]
        if any(isinstance(self.processor_config.get(k), dict) for k in sections):
            return self.processor_config
        return next((f for f in files if f), self.processor_config)

    def _build(self, kind: str) -> Any:
        """The preprocessor of one media kind ("image", "audio", "video") from the checkpoint's settings."""
        if kind == "image":
            from .image import ImageProcessor

            return ImageProcessor.from_dict(self._settings("image"))
        if kind == "audio":
            from .audio import AudioFeatureExtractor

            return AudioFeatureExtractor.from_dict(self._settings("audio"))
        from .video import VideoProcessor

        return VideoProcessor.from_dict(self._settings("video"))

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            self._image_processor = self._build("image")
        return self._image_processor

    @property
    def audio_extractor(self) -> Any:
        if self._audio_extractor is None:
            self._audio_extractor = self._build("audio")
        return self._audio_extractor

    @property
    def video_processor(self) -> Any:
        if self._video_processor is None:
            self._video_processor = self._build("video")
        return self._video_processor

    # -- the call ------------------------------------------------------------------------------------------------

    def _placeholder(self, kind: str) -> str:
        tok = getattr(self.special, kind)
        if tok is None:
            raise ConfigError(f"This checkpoint's tokenizer has no {kind} placeholder token; it cannot take {kind} "
                              "input. Use a Gemma 4 checkpoint with the multimodal tokenizer files.")
        return tok.text

    def _check_counts(self, text: str, kind: str, items: list[Any] | None, arg: str) -> None:
        tok = getattr(self.special, kind)
        found = text.count(tok.text) if tok is not None else 0
        given = len(items) if items is not None else 0
        if found != given:
            placeholder = tok.text if tok is not None else f"<{kind} placeholder>"
            hint = (" (a flat list of frames is one video; pass a list of video paths or of frame lists for "
                    "several)") if kind == "video" else ""
            raise InputError(
                f"The prompt has {found} {placeholder} placeholder(s) but {given} {kind} input(s) were passed in "
                f"{arg}={hint}; put exactly one {placeholder} in the prompt where each {kind} goes.")

    def _image_runs(self, images: list[Any], max_soft_tokens: int | None) -> tuple[dict[str, Any], list[str]]:
        out = self.image_processor(images, max_soft_tokens=max_soft_tokens)
        boi, image, eoi = self._placeholder("boi"), self._placeholder("image"), self._placeholder("eoi")
        return out, [f"{boi}{image * int(n)}{eoi}" for n in out["num_soft_tokens_per_image"]]

    def _audio_runs(self, audio: list[Any], sampling_rate: int | None = None) -> tuple[dict[str, Any], list[str]]:
        from .audio_file import load_audio

        # (the files' headers were checked against the context first: _check_media_first)
        clips = [load_audio(a, sampling_rate) for a in audio]
        self._check_audio_fits([len(c) for c in clips])
        out = self.audio_extractor(clips)
        boa, token, eoa = self._placeholder("boa"), self._placeholder("audio"), self._placeholder("eoa")
        return out, self.audio_extractor.prompt_texts(out, boa, token, eoa)

    def _check_audio_fits(self, lengths: list[int]) -> None:
        """Refuse clips (of these many 16 kHz samples) whose soft tokens alone overflow the model's context."""
        if self.context_length is None:
            return
        fe = self.audio_extractor
        needed = sum(fe.prompt_length(n) for n in lengths)
        room = self.context_length - 1  # at least <bos> and one more token share the context with the audio
        if needed <= room:
            return
        total = sum(lengths)
        longest = fe.longest_clip(room)
        raise ContextLengthError(
            f"The audio ({_duration(total, fe.sampling_rate)}) needs {needed:,} prompt tokens but this model's "
            f"context holds {self.context_length:,} with <bos> and at least one more token ({room:,} left for "
            f"audio): the longest audio it can take is "
            f"{_duration(longest, fe.sampling_rate)} in one prompt, less the room the rest of the prompt needs. "
            "Trim the recording or send it in parts.")

    def _video_runs(self, videos: list[Any], max_soft_tokens: int | None) -> tuple[dict[str, Any], list[str]]:
        from .video import video_prompt_text

        out = self.video_processor(videos, max_soft_tokens=max_soft_tokens)
        boi, token, eoi = self._placeholder("boi"), self._placeholder("video"), self._placeholder("eoi")
        runs = [video_prompt_text(int(n), stamps, boi, token, eoi)
                for n, stamps in zip(out["num_soft_tokens_per_video"], out["timestamps"])]
        return out, runs

    def media_inputs(self, kind: str, items: list[Any], max_soft_tokens: int | None = None,
                     sampling_rate: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
        """One modality's model inputs (numpy, batched over ``items``) and the text each item's placeholder
        expands to, as ``__call__`` makes them (``sampling_rate``: of audio arrays). Chat sessions call it one item
        at a time to cache the result."""
        run = {"image": self._image_runs, "audio": lambda x, _: self._audio_runs(x, sampling_rate),
               "video": self._video_runs}.get(kind)
        if run is None:
            raise InputError(f"Unknown media kind {kind!r}; use 'image', 'audio' or 'video'.")
        items = list(items)
        self._check_media_first(*(items if k == kind else None for k in ("image", "audio", "video")))
        out, runs = run(items, max_soft_tokens)
        return {k: v for k, v in out.items() if k not in _NOT_INPUTS and v is not None}, runs

    def expand_placeholders(self, text: str, runs: dict[str, list[str]]) -> str:
        """Replace each placeholder, in prompt order, by the next expansion of its modality (one pass, so the
        expansions, which contain the placeholder strings themselves, are never re-scanned)."""
        tokens = {self._placeholder(kind): kind for kind, r in runs.items() if r}
        if not tokens:
            return text
        for placeholder, kind in tokens.items():
            if text.count(placeholder) != len(runs[kind]):
                raise InputError(f"The prompt has {text.count(placeholder)} {placeholder} placeholder(s) for "
                                 f"{len(runs[kind])} {kind} input(s); put exactly one where each {kind} goes.")
        queues = {kind: iter(r) for kind, r in runs.items()}
        pattern = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
        return re.sub(pattern, lambda m: next(queues[tokens[m.group(0)]]), text)

    def __call__(self, text: str, images: Any = None, audio: Any = None, videos: Any = None,
                 max_soft_tokens: int | None = None, sampling_rate: int | None = None,
                 video_max_soft_tokens: int | None = None, **kw: Any) -> dict[str, mx.array]:
        """Tokenize `text`, expanding one placeholder per image / audio clip / video (counts must match).

        images: PIL images or paths; audio: 1-D float32 arrays at 16 kHz or paths to audio files; videos: one
        video or a list of videos, each a file path (read by content: MP4, MOV, WebM, MKV, MPEG-TS, Ogg, ...),
        a (T, H, W, C) uint8 array or a list of frames (PIL images, arrays or paths to still images). A flat
        list of frames is ONE video; a list of paths to video files or of frame lists is several.
        ``max_soft_tokens`` sets the token budget per image and, as in the reference, per video frame (one of
        70, 140, 280, 560, 1120; default: the checkpoint's); ``video_max_soft_tokens=`` overrides it for video
        frames only. ``sampling_rate`` is the rate of audio given as arrays (default 16 kHz; files carry their
        own). BOS is added as the checkpoint's tokenizer adds it, never twice (a prompt that starts with
        ``<bos>`` keeps only that one). Every argument is checked before any media is read; ``return_tensors``
        is accepted for transformers' sake and ignored (the inputs are always mx.arrays), any other keyword is
        refused.
        """
        if not isinstance(text, str):
            raise InputError(f"text must be one prompt string; got {type(text).__name__}.")
        self._check_keywords(kw, max_soft_tokens, video_max_soft_tokens, sampling_rate)
        images, audio, videos = (media_items(k, v) for k, v in (("image", images), ("audio", audio),
                                                                 ("video", videos)))
        self._check_counts(text, "image", images, "images")
        self._check_counts(text, "audio", audio, "audio")
        self._check_counts(text, "video", videos, "videos")
        self.tokenizer.check_text(text)
        self._check_media_first(images, audio, videos)

        features: dict[str, Any] = {}
        runs: dict[str, list[str]] = {}
        if images:
            out, runs["image"] = self._image_runs(images, max_soft_tokens)
            features.update(out)
        if audio:
            out, runs["audio"] = self._audio_runs(audio, sampling_rate)
            features.update(out)
        if videos:
            budget = max_soft_tokens if video_max_soft_tokens is None else video_max_soft_tokens
            out, runs["video"] = self._video_runs(videos, budget)
            features.update(out)

        ids = np.asarray(self.tokenizer.encode(self.expand_placeholders(text, runs)), dtype=np.int32)
        inputs: dict[str, mx.array] = {
            "input_ids": mx.array(ids[None]),  # (1, L)
            "mm_token_type_ids": mx.array(self.mm_token_type_ids(ids)[None]),  # (1, L)
        }
        for key, value in features.items():
            if key in _NOT_INPUTS or value is None:
                continue
            inputs[key] = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
        return inputs

    def _check_media_first(self, images: list[Any] | None, audio: list[Any] | None,
                           videos: list[Any] | None) -> None:
        """The cheap checks of every media input, before any is decoded (a missing audio file must not wait for
        ten photos to be resized): each path names a readable file, and audio files fit the context by their
        headers."""
        from .files import media_path

        for kind, items in (("image", images), ("audio", audio), ("video", videos)):
            for item in items or ():
                if isinstance(item, (str, Path)):
                    media_path(item, kind)
        if audio and self.context_length is not None:
            from .audio_file import probe_length

            self._check_audio_fits([n for n in map(probe_length, audio) if n is not None])

    @staticmethod
    def _check_keywords(kw: dict[str, Any], max_soft_tokens: Any, video_max_soft_tokens: Any,
                        sampling_rate: Any) -> None:
        """The keywords of a call, checked up front, whether or not media of their kind came with it (a misspelt
        or out-of-range setting is an error, not a silent default)."""
        unknown = sorted(set(kw) - {"return_tensors"})
        if unknown:
            raise InputError(f"Unknown argument(s) {unknown}; the processor takes text, images, audio, videos, "
                             "max_soft_tokens, video_max_soft_tokens and sampling_rate.")
        for budget in (max_soft_tokens, video_max_soft_tokens):
            if budget is not None:
                from .image import ImageProcessor

                ImageProcessor.check_budget(budget)
        if sampling_rate is not None:
            from .audio_file import check_sampling_rate

            check_sampling_rate(sampling_rate)

    def mm_token_type_ids(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Per-token modality: 0 text, 1 image, 2 video, 3 audio soft token (int32, same shape as `ids`)."""
        ids = np.asarray(ids)
        types = np.zeros(ids.shape, dtype=np.int32)
        for m in MEDIA:  # the values ProcessorMixin.create_mm_token_type_ids writes
            tok = getattr(self.special, m.kind)
            if tok is not None:
                types[ids == tok.id] = m.type_id
        return types
