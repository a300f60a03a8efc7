"""Microphone recording at 16 kHz mono, the rate the audio tower hears, capped at its 30 s limit.

PortAudio calls `_callback` from its own thread with each block of samples; the UI polls `level`, `elapsed`
and `full` on a timer. The stream comes from `stream_factory`, so tests hand in a fake stream that calls
the callback themselves; the default factory opens sounddevice's InputStream.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0

log = logging.getLogger(__name__)


class RecorderError(Exception):
    """No PortAudio, no input device, or the device refused to open; the message says what to do."""


class InputStream(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


StreamFactory = Callable[..., InputStream]


def sounddevice_stream(**kwargs: Any) -> InputStream:
    """The real microphone. Every way it can fail becomes a RecorderError the app can show."""
    try:
        import sounddevice as sd
    except OSError as e:  # sounddevice raises OSError at import when libportaudio is missing
        raise RecorderError(
            "Recording needs the PortAudio library, which was not found "
            "(macOS: brew install portaudio; Debian/Ubuntu: apt install libportaudio2)."
        ) from e
    except ImportError as e:
        raise RecorderError("Recording needs the sounddevice package, which is not installed: pip install "
                            "sounddevice (and PortAudio: brew install portaudio, or apt install libportaudio2).") from e
    try:
        sd.query_devices(kind="input")
        return sd.InputStream(**kwargs)
    except (sd.PortAudioError, ValueError) as e:
        what = "No microphone was found" if "device -1" in str(e) else f"No microphone could be opened ({e})"
        raise RecorderError(f"{what}. Check that an input device is connected and that this terminal may use the "
                            "microphone.") from e


class Recorder:
    """One recording at a time: start(), then stop() -> path of the saved WAV (or None if nothing was heard)."""

    def __init__(
        self,
        out_dir: str | Path,
        stream_factory: StreamFactory = sounddevice_stream,
        samplerate: int = SAMPLE_RATE,
        max_seconds: float = MAX_SECONDS,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.stream_factory = stream_factory
        self.samplerate = samplerate
        self.max_frames = int(max_seconds * samplerate)
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._frames = 0
        self._stream: InputStream | None = None
        self.rms = 0.0
        self.peak = 0.0

    @property
    def recording(self) -> bool:
        return self._stream is not None

    @property
    def elapsed(self) -> float:
        return self._frames / self.samplerate

    @property
    def full(self) -> bool:
        return self._frames >= self.max_frames

    @property
    def level(self) -> float:
        """Loudness for a meter, 0..1: RMS of the last block on a dB scale from -60 dBFS to 0."""
        if self.rms <= 1e-6:
            return 0.0
        return float(min(1.0, max(0.0, 1.0 + 20 * np.log10(self.rms) / 60)))

    def start(self) -> None:
        if self._stream is not None:
            return
        self._chunks, self._frames, self.rms, self.peak = [], 0, 0.0, 0.0
        stream = self.stream_factory(
            samplerate=self.samplerate, channels=1, dtype="float32", callback=self._callback
        )
        try:
            stream.start()
        except Exception as e:
            stream.close()
            raise RecorderError(f"The microphone would not start ({e}).") from e
        self._stream = stream

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            log.debug("microphone stream status: %s", status)  # e.g. input overflow
        block = np.asarray(indata, dtype=np.float32).reshape(-1)  # (frames, 1) -> (frames,)
        with self._lock:
            room = self.max_frames - self._frames
            if room <= 0:
                return
            block = block[:room]
            self._chunks.append(block.copy())
            self._frames += len(block)
        if len(block):
            self.rms = float(np.sqrt(np.mean(block**2)))
            self.peak = max(self.peak, float(np.abs(block).max()))

    def stop(self) -> Path | None:
        """Close the stream and save what was heard as a 16-bit WAV in out_dir."""
        stream, self._stream = self._stream, None
        if stream is None:
            return None
        _close(stream)
        with self._lock:
            audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            self._chunks = []
        if audio.size == 0:
            return None
        # What was said is kept even when the data folder cannot be written: the system's temporary folder next.
        problems = []
        for folder in (self.out_dir, Path(tempfile.gettempdir()) / "gemma4-chat-recordings"):
            try:
                return self._save(audio, folder)
            except Exception as e:  # OSError, soundfile's LibsndfileError, ...
                log.warning("could not save the recording in %s: %s", folder, e)
                problems.append(f"{folder}: {e}")
        raise RecorderError(f"The recording could not be saved ({'; '.join(problems)}). Make {self.out_dir} "
                            "writable, or start with --data-dir pointing at a writable folder.")

    def _save(self, audio: np.ndarray, folder: Path) -> Path:
        import soundfile as sf

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"recording-{time.strftime('%Y%m%d-%H%M%S')}.wav"
        n = 1
        while path.exists():
            n += 1
            path = path.with_name(f"recording-{time.strftime('%Y%m%d-%H%M%S')}-{n}.wav")
        sf.write(path, audio, self.samplerate, subtype="PCM_16")
        return path

    def cancel(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            _close(stream)
        self._chunks = []


def _close(stream: InputStream) -> None:
    """Stop and close a stream; a device that went away while recording fails to stop, which loses nothing."""
    try:
        stream.stop()
    except Exception as e:  # PortAudioError when the microphone was unplugged, ...
        log.warning("the microphone stream did not stop cleanly: %s", e)
    finally:
        try:
            stream.close()
        except Exception as e:
            log.warning("the microphone stream did not close cleanly: %s", e)
