"""Audio features for Gemma 4: log-mel features of 16 kHz mono clips (read by audio_file.py), soft-token counts.

Reference: transformers ``models/gemma4/feature_extraction_gemma4.py`` (``Gemma4AudioFeatureExtractor``) and
``processing_gemma4.py`` (``replace_audio_token``, ``_compute_audio_num_tokens``). Facts the features depend on:

- 20 ms frames (320 samples), 10 ms hop, 512-point real FFT, *periodic* Hann window, magnitude (not power)
  spectrum, 128 HTK mel bins over 0-8 kHz without normalisation, ``log(mel + 1e-3)``.
- "Semicausal" padding: 160 zeros are prepended before framing, and each frame is cut 321 samples wide (the
  extra sample only matters with pre-emphasis, off by default).
- Every clip is right-padded with zeros to the longest clip of the batch, then to a multiple of 128 samples.
  A frame is valid only when its whole analysis window lies in real audio; invalid frames are zeroed.
- Soft tokens: the audio tower halves the frame count twice (two stride-2 convs), so one token covers 40 ms;
  the count is the number of valid frames after two ``mask[::2]`` steps, at most 750 per clip.

Clips longer than 30 s: the reference feature extractor silently truncates to 480,000 samples (30 s) and the
processor caps a clip at 750 tokens. Dropping the end of a user's recording without a word is the worst choice,
and refusing long recordings makes a chat app useless for meetings or voice notes. So a long clip is split into
consecutive 30 s segments; each segment is encoded as its own clip and gets its own ``<boa>...<eoa>`` run in the
prompt, one after another. Every segment is then exactly what the model saw in training (a clip of at most
750 tokens), and the whole recording reaches the model. The cost: a word spoken across a 30 s boundary is cut
in two. ``AudioFeatureExtractor.prompt_texts`` builds the runs for each input clip.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .audio_file import SAMPLING_RATE, _to_mono_float

logger = logging.getLogger(__name__)

# Where processor_config.json keeps the audio preprocessor's settings (transformers' name, then an older one).
AUDIO_SECTIONS = ("feature_extractor", "audio_processor")


def audio_section(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """The audio settings in ``d``: its audio section, or ``d`` itself when flat (preprocessor_config.json)."""
    return next((d[k] for k in AUDIO_SECTIONS if d.get(k)), d)


# ----------------------------------------------------------------------------------------------------------------
# Log-mel features
# ----------------------------------------------------------------------------------------------------------------

def _htk_mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sampling_rate: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, unnormalised: (n_freqs, n_mels) float64."""
    to_mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)  # noqa: E731
    edges_mel = np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    edges_hz = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)  # (n_mels + 2,)
    bin_hz = np.linspace(0, sampling_rate // 2, n_freqs)  # (n_freqs,)
    dist = edges_hz[None, :] - bin_hz[:, None]  # (n_freqs, n_mels + 2)
    width = np.diff(edges_hz)  # (n_mels + 1,)
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def _tokens_from_mask(mask: np.ndarray) -> int:
    """Valid soft tokens left after the tower's two stride-2 convs (kernel 3, padding 1) subsample the mask."""
    for _ in range(2):
        out_len = (len(mask) - 1) // 2 + 1
        mask = mask[::2][:out_len]
    return int(mask.sum())


class AudioFeatureExtractor:
    """Gemma 4 log-mel features; defaults are the reference's (and the published checkpoints')."""

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = SAMPLING_RATE,
        padding_value: float = 0.0,
        frame_length_ms: float = 20.0,
        hop_length_ms: float = 10.0,
        min_frequency: float = 0.0,
        max_frequency: float = 8000.0,
        preemphasis: float = 0.0,
        preemphasis_htk_flavor: bool = True,
        fft_overdrive: bool = False,
        dither: float = 0.0,
        input_scale_factor: float = 1.0,
        mel_floor: float = 1e-3,
        per_bin_mean: Sequence[float] | None = None,
        per_bin_stddev: Sequence[float] | None = None,
        max_length: int = 480_000,
        pad_to_multiple_of: int = 128,
        audio_seq_length: int = 750,
    ) -> None:
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = padding_value
        self.preemphasis = preemphasis
        self.preemphasis_htk_flavor = preemphasis_htk_flavor
        self.dither = dither
        self.input_scale_factor = input_scale_factor
        self.mel_floor = float(mel_floor)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.audio_seq_length = audio_seq_length
        self.frame_length = int(round(sampling_rate * frame_length_ms / 1000.0))
        self.hop_length = int(round(sampling_rate * hop_length_ms / 1000.0))
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if fft_overdrive else 1)
        n = np.arange(self.frame_length)
        # Periodic Hann (period = frame length, as in a spectral-analysis STFT), not the symmetric one.
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / self.frame_length)).astype(np.float32)
        self.mel_filters = _htk_mel_filters(self.fft_length // 2 + 1, feature_size, min_frequency, max_frequency,
                                            sampling_rate)
        self.per_bin_mean = None if per_bin_mean is None else np.asarray(per_bin_mean).reshape(1, feature_size)
        self.per_bin_stddev = None if per_bin_stddev is None else np.asarray(per_bin_stddev).reshape(1, feature_size)
        # A segment is as long as the reference lets one clip be: max_length samples, and no more than
        # audio_seq_length tokens (F valid frames give ceil(ceil(F/2)/2) tokens).
        pad_left, span = self.frame_length // 2, self.frame_length + 1
        max_by_tokens = (4 * audio_seq_length - 1) * self.hop_length + span - pad_left + self.hop_length - 1
        self.segment_samples = min(max_length, max_by_tokens)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AudioFeatureExtractor:
        """Settings from a checkpoint's processor_config.json (a "feature_extractor" section plus top-level
        ``audio_seq_length``) or a flat preprocessor_config.json. Unknown keys are ignored."""
        fe = dict(audio_section(d))
        for key in ("audio_seq_length",):
            if key in d and key not in fe:
                fe[key] = d[key]
        if fe.get("padding_side", "right") != "right":
            logger.warning("padding_side=%r ignored: Gemma 4 audio is padded on the right", fe["padding_side"])
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        logger.debug("AudioFeatureExtractor: ignoring keys %s", sorted(set(fe) - names))
        out = cls(**{k: v for k, v in fe.items() if k in names})
        # Serialized extractors also carry frame_length / hop_length / fft_length in samples; the reference
        # recomputes them from the *_ms settings, and so do we. Say so if a file disagrees.
        for key in ("frame_length", "hop_length", "fft_length"):
            if key in fe and fe[key] != getattr(out, key):
                logger.warning("processor config has %s=%s but the reference derives %s; using %s",
                               key, fe[key], getattr(out, key), getattr(out, key))
        return out

    @property
    def min_samples(self) -> int:
        """Samples of the shortest clip that gives one soft token (one whole analysis window)."""
        return self.frame_length + 1 - self.frame_length // 2

    def num_soft_tokens(self, num_samples: int) -> int:
        """Soft tokens for a clip of ``num_samples`` samples at 16 kHz (processing_gemma4's arithmetic)."""
        frames = (num_samples + self.frame_length // 2 - (self.frame_length + 1)) // self.hop_length + 1
        if frames <= 0:
            return 0
        t = frames
        for _ in range(2):
            t = (t - 1) // 2 + 1
        return min(t, self.audio_seq_length)

    def prompt_length(self, num_samples: int) -> int:
        """Prompt tokens a clip of ``num_samples`` takes: each 30 s segment's soft tokens plus its <boa>/<eoa>."""
        n = self.segment_samples
        full, rest = divmod(int(num_samples), n)
        tail = self.num_soft_tokens(rest)  # 0 for a tail shorter than one token, which split() drops
        return full * (self.num_soft_tokens(n) + 2) + (tail + 2 if tail else 0)

    def longest_clip(self, max_tokens: int) -> int:
        """Samples of the longest clip whose prompt run fits in ``max_tokens`` tokens (0 if none does)."""
        lo, hi = 0, (max(max_tokens, 0) + 1) * self.segment_samples  # prompt_length(hi) > max_tokens
        while hi - lo > 1:  # prompt_length never decreases with the length, so bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.prompt_length(mid) <= max_tokens else (lo, mid)
        return lo

    def split(self, audio: np.ndarray) -> list[np.ndarray]:
        """Consecutive segments no longer than one clip the model accepts (see the module docstring)."""
        n = self.segment_samples
        if len(audio) <= n:
            return [audio]
        logger.info("Audio clip of %.1f s split into %d segments of at most %.0f s", len(audio) / self.sampling_rate,
                    math.ceil(len(audio) / n), n / self.sampling_rate)
        parts = [audio[i:i + n] for i in range(0, len(audio), n)]
        if len(parts[-1]) < self.min_samples:  # a tail too short for one token: an empty <boa><eoa> run otherwise
            logger.debug("dropping the last %d samples of a long clip: too short to give an audio token",
                         len(parts[-1]))
            parts.pop()
        return parts

    def _log_mel(self, wave: np.ndarray) -> np.ndarray:
        """(samples,) float32, already padded -> (frames, feature_size) float32."""
        if self.dither > 0.0:
            wave = wave + self.dither * np.random.default_rng().standard_normal(wave.shape).astype(wave.dtype)
        if self.input_scale_factor != 1.0:
            wave = wave * self.input_scale_factor
        wave = np.pad(wave, (self.frame_length // 2, 0))  # semicausal: first frame centred on t = 0
        span = self.frame_length + 1
        n_frames = (len(wave) - span) // self.hop_length + 1
        frames = np.lib.stride_tricks.as_strided(  # (n_frames, span) view, hop apart
            wave, shape=(n_frames, span), strides=(wave.strides[0] * self.hop_length, wave.strides[0]))
        if self.preemphasis > 0.0 and self.preemphasis_htk_flavor:
            frames = np.concatenate([frames[:, :1] * (1.0 - self.preemphasis),
                                     frames[:, 1:-1] - self.preemphasis * frames[:, :-2]], axis=-1)
        elif self.preemphasis > 0.0:
            frames = frames[:, 1:] - self.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]  # (n_frames, frame_length)
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))  # (n_frames, fft/2+1)
        log_mel = np.log(spectrum @ self.mel_filters + self.mel_floor)  # (n_frames, feature_size) float64
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        return log_mel.astype(np.float32)

    def __call__(self, audios: Sequence[np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Features for a batch of 16 kHz mono clips (long clips split into segments, one row each).

        Returns ``input_features`` (N, T, feature_size) float32, ``input_features_mask`` (N, T) bool,
        ``num_soft_tokens_per_audio``: list of N ints (per row, i.e. per segment; equal to per clip for clips up
        to 30 s) and ``segments_per_audio``: list with one int per input clip (how many consecutive rows it has).
        """
        if isinstance(audios, np.ndarray) and audios.ndim == 1:
            audios = [audios]
        if len(audios) == 0:
            raise InputError("No audio clips were given to the feature extractor.")
        rows, segments_per_audio = [], []
        for i, a in enumerate(audios):
            a = np.asarray(a)
            if a.ndim != 1:
                raise InputError(f"Audio clip {i} has shape {a.shape}; load it with load_audio() first.")
            a = _to_mono_float(a, f"Audio clip {i}")
            min_samples = self.min_samples
            if len(a) < min_samples:
                raise InputError(f"Audio clip {i} is {len(a)} samples ({1000 * len(a) / self.sampling_rate:.2f} ms) "
                                 f"long; it needs at least {min_samples} ({1000 * min_samples / self.sampling_rate:.2f}"
                                 " ms) to give one audio token.")
            parts = self.split(a)
            segments_per_audio.append(len(parts))
            rows.extend(parts)

        longest = max(len(r) for r in rows)
        padded_len = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        waves = np.full((len(rows), padded_len), self.padding_value, np.float32)  # (N, samples)
        sample_mask = np.zeros((len(rows), padded_len + self.frame_length // 2), np.bool_)  # after left pad
        for i, r in enumerate(rows):
            waves[i, :len(r)] = r
            sample_mask[i, self.frame_length // 2:self.frame_length // 2 + len(r)] = True

        feats = np.stack([self._log_mel(w) for w in waves])  # (N, T, feature_size)
        # A frame is valid when its last sample is real audio.
        ends = np.arange(feats.shape[1]) * self.hop_length + self.frame_length  # (T,)
        mask = sample_mask[:, ends]  # (N, T)
        feats = feats * mask[..., None]
        return {
            "input_features": feats,
            "input_features_mask": mask,
            "num_soft_tokens_per_audio": [_tokens_from_mask(m) for m in mask],
            "segments_per_audio": segments_per_audio,
        }

    @staticmethod
    def prompt_texts(features: Mapping[str, Any], boa: str, audio_token: str, eoa: str) -> list[str]:
        """One prompt string per input clip: a ``<boa>...<eoa>`` run for each of its segments."""
        counts, out, row = features["num_soft_tokens_per_audio"], [], 0
        for n in features["segments_per_audio"]:
            out.append(audio_prompt_text(counts[row:row + n], boa, audio_token, eoa))
            row += n
        return out


def audio_prompt_text(num_soft_tokens: int | Sequence[int], boa: str, audio_token: str, eoa: str) -> str:
    """The placeholder text replace_audio_token builds: ``boa + audio_token * n + eoa``; a list of counts (the
    segments of one long clip) gives one such run per segment, back to back."""
    counts = [num_soft_tokens] if isinstance(num_soft_tokens, int) else list(num_soft_tokens)
    return "".join(f"{boa}{audio_token * int(n)}{eoa}" for n in counts)
