"""Reading audio for Gemma 4: a file (libsndfile, or PyAV for compressed and video containers) or an array, to
16 kHz mono float32, with the checks that name what is wrong with a clip (sampling rate, channels, a cut file,
integer PCM passed as floats). The features the model reads from it: audio.py.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .files import host_array, media_path, refuse_item

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16_000
MAX_CHANNELS = 32  # a 2-D array's shorter axis is its channels, up to this many
RATE_RANGE = (1_000, 768_000)  # sampling rates accepted for arrays (Hz)
# Float audio lives in [-1, 1]; a little over is clipping headroom, far over is integer PCM passed as floats.
MAX_FLOAT_PEAK = 64.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------

def _int_to_float(x: np.ndarray) -> np.ndarray:
    """Scale integer PCM to [-1, 1) the way libsndfile does (unsigned 8-bit is centred on 128)."""
    info = np.iinfo(x.dtype)
    if info.min == 0:  # unsigned: PCM_U8 and friends
        half = (int(info.max) + 1) // 2
        return ((x.astype(np.float64) - half) / half).astype(np.float32)
    return (x.astype(np.float64) / -float(info.min)).astype(np.float32)


def _to_mono_float(x: np.ndarray, what: str) -> np.ndarray:
    """Any numeric array of samples -> 1-D float32; channels are averaged."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"{what} has dtype {x.dtype}; pass audio samples as a float or integer numpy array.")
    if x.size == 0:
        raise InputError(f"{what} is empty (0 samples). Record or choose a clip with some sound in it.")
    if x.ndim == 2:
        # (samples, channels) as soundfile reads, or (channels, samples) as torchaudio and librosa give: the
        # shorter axis is the channels. Past MAX_CHANNELS neither reading is plausible, so say so.
        if min(x.shape) > MAX_CHANNELS:
            raise InputError(f"{what} has shape {x.shape}: neither axis looks like channels (at most "
                             f"{MAX_CHANNELS}). Pass mono samples (n,), or (samples, channels) / (channels, samples).")
        if x.shape[0] < x.shape[1]:
            x = x.T  # (channels, n) -> (n, channels)
    elif x.ndim != 1:
        raise InputError(f"{what} has shape {x.shape}; expected (samples,), (samples, channels) or "
                         "(channels, samples).")
    if np.issubdtype(x.dtype, np.floating):  # checked in the given dtype: a cast could overflow first
        peak = float(np.abs(x).max())   # NaN or infinite if any sample is: one pass over the clip
        if not math.isfinite(peak):
            bad = int((~np.isfinite(x)).sum())
            raise InputError(f"{what} contains {bad} NaN or infinite samples. Re-export or re-record the clip.")
        if peak > MAX_FLOAT_PEAK:
            raise InputError(f"{what} has float samples up to {peak:g}, but float audio is in [-1, 1]. If these "
                             "are 16-bit PCM values, pass them as np.int16 (or divide them by 32768).")
        x = x.astype(np.float32, copy=False)
    else:
        x = _int_to_float(x)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)  # (n, channels) -> (n,)
    return np.ascontiguousarray(x, dtype=np.float32)


def _resample(x: np.ndarray, rate: int, what: str) -> np.ndarray:
    if rate <= 0:
        raise InputError(f"{what}: sampling rate {rate} Hz is not positive; pass the clip's real rate.")
    if rate == SAMPLING_RATE:
        return x
    import soxr

    logger.debug("%s: resampling %d Hz -> %d Hz", what, rate, SAMPLING_RATE)
    y = soxr.resample(x, rate, SAMPLING_RATE, quality="HQ")
    if y.size == 0:
        raise InputError(f"{what} is too short to resample from {rate} Hz; use a longer clip.")
    return np.ascontiguousarray(y, dtype=np.float32)


def _decode_with_av(path: Path) -> tuple[np.ndarray, int]:
    """Formats libsndfile cannot read (m4a/AAC from Voice Memos, webm, ...) through PyAV, if installed."""
    import av  # an optional dependency; ImportError is handled by the caller

    chunks, rate = [], 0
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        # Planar float in the stream's own channels: the caller averages them to mono, as for every other file
        # (FFmpeg's own stereo -> mono downmix sums the channels at -3 dB: 1.41x louder than their mean).
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate or SAMPLING_RATE)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    rate = out.sample_rate
                    chunks.append(out.to_ndarray())  # (channels, n)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.FFmpegError as e:  # it opened as audio, so the data itself is bad: most often a partial download
            raise InputError(f"Audio file {path}: the audio data is truncated or corrupt ({e}). Re-export, "
                             "re-record or re-download it.") from e
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(chunks, axis=1).T, rate  # (n, channels), as soundfile reads


# libsndfile's header log: "data : 32000 (should be 15978)" when a chunk claims more bytes than the file holds.
_SIZE_LINE = re.compile(r"^\s*(data|SSND|Data Size|RIFF|riff|FORM)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_UNKNOWN_SIZE = 0xFFFFFFFF  # what streaming writers put in a header before they know the length


def _check_complete(path: Path, sf: Any) -> None:
    """Refuse a WAV / AIFF / AU / W64 file whose header promises more audio than the file holds (libsndfile
    reads such a file without complaint, up to where it was cut)."""
    try:
        log = sf.info(str(path), verbose=True).extra_info
    except Exception:  # the data was read; a header we cannot re-read is not proof of truncation
        return
    for label, declared, actual in _SIZE_LINE.findall(log):
        if int(declared) > int(actual) and int(declared) != _UNKNOWN_SIZE:
            raise InputError(f"Audio file {path} is truncated: its header promises {int(declared):,} bytes of "
                             f"{label.strip()} but the file holds {int(actual):,}. Re-export, re-record or "
                             "re-download it.")


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels), scaled to [-1, 1)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        sf_error = e
    else:
        _check_complete(path, sf)
        return data, int(rate)
    try:
        return _decode_with_av(path)
    except ImportError:
        pass
    except InputError:
        raise
    except Exception as e:  # PyAV raises many error types for files that are not media
        logger.debug("PyAV could not decode %s: %s", path, e)
    raise InputError(
        f"Cannot decode {path} as audio ({sf_error}). Use a WAV, FLAC, OGG or MP3 file, or convert it first "
        f"(e.g. `ffmpeg -i '{path.name}' out.wav`)."
    )


def check_sampling_rate(sampling_rate: Any) -> int:
    lo, hi = RATE_RANGE
    ok = isinstance(sampling_rate, (int, float, np.integer, np.floating)) and not isinstance(sampling_rate, bool)
    if not ok or not lo <= sampling_rate <= hi or int(sampling_rate) != sampling_rate:
        raise InputError(f"sampling_rate must be a whole number of Hz from {lo} to {hi}; got {sampling_rate!r}. "
                         "Pass the rate the samples were recorded at (16000 if unsure).")
    return int(sampling_rate)


def probe_length(src: Any) -> int | None:
    """Samples ``src`` will have at 16 kHz, read from a file's header without decoding it (None if unknown)."""
    if not isinstance(src, (str, Path)):
        return None
    path = media_path(src, "audio")
    try:
        import soundfile as sf

        info = sf.info(str(path))
        if info.samplerate > 0 and info.frames > 0:
            return int(info.frames * SAMPLING_RATE // info.samplerate)
    except Exception:  # not a format libsndfile reads: try the container's duration
        pass
    try:
        import av

        with av.open(str(path)) as container:
            if container.duration and container.streams.audio:
                return int(container.duration * SAMPLING_RATE // 1_000_000)  # duration is in microseconds
    except Exception:
        pass
    return None


def load_audio(src: str | Path | np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
    """A clip as 1-D float32 mono samples at 16 kHz.

    ``src`` is a path (anything libsndfile reads: WAV of any PCM or float subtype, FLAC, OGG, MP3; other
    containers through PyAV when it is installed) or a numpy array of samples at ``sampling_rate`` Hz
    (default 16000; 1 kHz to 768 kHz), shaped (n,), (n, channels) or (channels, n): the shorter axis of a 2-D
    array is its channels (at most 32), averaged to mono. Integer arrays are scaled to [-1, 1); float samples
    must be in [-1, 1] (up to 64 is taken as headroom; more is integer PCM passed as floats, refused). Raises
    ``InputError`` saying what to do for a missing file, a directory, a non-audio file, a truncated WAV / AIFF /
    AU file, an empty clip or NaN/inf samples.
    """
    src = host_array(src)
    if isinstance(src, (str, Path)):
        path = media_path(src, "audio")
        data, rate = _read_file(path)
        what = f"Audio file {path}"
        if sampling_rate is not None and sampling_rate != rate:
            logger.warning("%s is %d Hz; ignoring sampling_rate=%d", path, rate, sampling_rate)
    elif isinstance(src, np.ndarray) or (isinstance(src, Sequence) and not isinstance(src, (bytes, str))):
        rate, what = SAMPLING_RATE if sampling_rate is None else check_sampling_rate(sampling_rate), "Audio"
        try:
            data = np.asarray(src)
        except (ValueError, TypeError) as e:  # a ragged list
            raise InputError(f"Cannot read these audio samples as an array ({e}). Pass a 1-D numpy array.") from e
    else:
        refuse_item("audio", src)
    return _resample(_to_mono_float(data, what), rate, what)
