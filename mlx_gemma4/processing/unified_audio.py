"""Audio input of Gemma 4 12B (``gemma4_unified``): raw 16 kHz waveform frames, one per soft token.

Reference: transformers ``models/gemma4_unified/feature_extraction_gemma4_unified.py``
(``Gemma4UnifiedAudioFeatureExtractor``) and ``Gemma4UnifiedProcessor.replace_audio_token``. The encoder-free model
has no mel front end and no subsampling: a clip is zero-padded to a multiple of ``audio_samples_per_token`` (640
samples, 40 ms) and cut into frames; each frame is one soft token. Clips of a batch are padded with empty frames
to the longest; ``input_features_mask`` marks the real ones, and a clip's placeholder expands to
``boa + audio_token * frames + eoa``.

Long clips: unlike Gemma 4 (audio.py), the reference neither truncates nor splits them. Every frame becomes a
token, so a clip of any length is one ``<boa>...<eoa>`` run of ``ceil(samples / 640)`` tokens (750 for 30 s);
the processor's context check refuses a clip that cannot fit.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .audio import audio_prompt_text, audio_section
from .audio_file import SAMPLING_RATE, _to_mono_float

logger = logging.getLogger(__name__)


class UnifiedAudioFeatureExtractor:
    """Gemma 4 12B waveform frames; defaults are the reference's."""

    def __init__(self, feature_size: int = 640, sampling_rate: int = SAMPLING_RATE, padding_value: float = 0.0,
                 audio_samples_per_token: int = 640) -> None:
        if isinstance(audio_samples_per_token, bool) or not isinstance(audio_samples_per_token, int) \
                or audio_samples_per_token < 1:
            raise InputError(f"audio_samples_per_token must be a whole number >= 1; got {audio_samples_per_token!r}.")
        if feature_size != audio_samples_per_token:
            logger.warning("feature_size=%s differs from audio_samples_per_token=%s; frames are %s samples wide",
                           feature_size, audio_samples_per_token, audio_samples_per_token)
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = float(padding_value)
        self.audio_samples_per_token = audio_samples_per_token

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnifiedAudioFeatureExtractor:
        """Settings from processor_config.json (its "feature_extractor" section) or a flat preprocessor_config.json.
        Unknown keys are ignored."""
        fe = dict(audio_section(d))
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        logger.debug("UnifiedAudioFeatureExtractor: ignoring keys %s", sorted(set(fe) - names))
        return cls(**{k: v for k, v in fe.items() if k in names and v is not None})

    def num_soft_tokens(self, num_samples: int) -> int:
        """Soft tokens of a clip of ``num_samples`` samples: one per started frame."""
        return math.ceil(int(num_samples) / self.audio_samples_per_token)

    def prompt_length(self, num_samples: int) -> int:
        """Prompt tokens a clip takes: its soft tokens plus <boa> and <eoa>."""
        return self.num_soft_tokens(num_samples) + 2

    def longest_clip(self, max_tokens: int) -> int:
        """Samples of the longest clip whose prompt run fits in ``max_tokens`` tokens (0 if none does)."""
        return max(0, max_tokens - 2) * self.audio_samples_per_token

    def __call__(self, audios: Sequence[np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Frames for a batch of 16 kHz mono clips. Returns ``input_features`` (N, T, n) float32,
        ``input_features_mask`` (N, T) bool and ``num_soft_tokens_per_audio`` (one int per clip)."""
        if isinstance(audios, np.ndarray) and audios.ndim == 1:
            audios = [audios]
        if len(audios) == 0:
            raise InputError("No audio clips were given to the feature extractor.")
        clips = []
        for i, a in enumerate(audios):
            a = np.asarray(a)
            if a.ndim != 1:
                raise InputError(f"Audio clip {i} has shape {a.shape}; load it with load_audio() first.")
            clips.append(_to_mono_float(a, f"Audio clip {i}"))
        n = self.audio_samples_per_token
        counts = [self.num_soft_tokens(len(c)) for c in clips]
        feats = np.full((len(clips), max(counts), n), self.padding_value, np.float32)
        mask = np.zeros((len(clips), max(counts)), np.bool_)  # (N, T)
        for i, (c, t) in enumerate(zip(clips, counts)):
            # Samples straight into their frames (one copy); zeros complete the last frame.
            row = feats[i].reshape(-1)
            row[: len(c)] = c
            row[len(c) : t * n] = 0.0
            mask[i, :t] = True
        return {"input_features": feats, "input_features_mask": mask, "num_soft_tokens_per_audio": counts}

    @staticmethod
    def prompt_texts(features: Mapping[str, Any], boa: str, audio_token: str, eoa: str) -> list[str]:
        """One ``boa + audio_token * n + eoa`` run per clip (n = its real frames, as replace_audio_token counts)."""
        return [audio_prompt_text(int(m.sum()), boa, audio_token, eoa) for m in features["input_features_mask"]]
