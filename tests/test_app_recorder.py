"""app/recorder.py with a fake input stream at the sounddevice boundary."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf

from app.recorder import MAX_SECONDS, Recorder, RecorderError, sounddevice_stream
from tests.app_helpers import FakeStream, sine


@pytest.fixture
def rec(tmp_path):
    streams = []

    def factory(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    r = Recorder(tmp_path / "rec", stream_factory=factory)
    r.streams = streams
    return r


def test_level_meter_and_elapsed(rec):
    rec.start()
    assert rec.recording and rec.level == 0.0
    rec.streams[0].feed(np.zeros(1600, np.float32))
    assert rec.level == 0.0 and rec.elapsed == pytest.approx(0.1)
    rec.streams[0].feed(sine(0.5, amp=0.5))
    assert rec.rms == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    assert rec.peak == pytest.approx(0.5, rel=0.01)
    assert 0.8 < rec.level < 0.9  # -9 dBFS on a 60 dB scale
    assert rec.elapsed == pytest.approx(0.6)


def test_saved_wav_reads_back_at_16k(rec, tmp_path):
    rec.start()
    audio = sine(1.0, amp=0.25)
    rec.streams[0].feed(audio)
    path = rec.stop()
    assert rec.streams[0].closed and not rec.recording
    assert path.parent == tmp_path / "rec" and path.suffix == ".wav"
    data, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and data.shape == (16000,)
    np.testing.assert_allclose(data, audio, atol=1e-4)


def test_capped_at_the_model_audio_limit(rec):
    rec.start()
    rec.streams[0].feed(sine(MAX_SECONDS + 2.0), block=16000)
    assert rec.full and rec.elapsed == MAX_SECONDS
    data, sr = sf.read(rec.stop())
    assert len(data) == int(MAX_SECONDS * 16000)


def test_nothing_heard_saves_nothing(rec):
    rec.start()
    assert rec.stop() is None
    assert rec.stop() is None  # stopping twice is harmless


def test_stream_that_will_not_start(tmp_path):
    r = Recorder(tmp_path, stream_factory=lambda **kw: FakeStream(**kw, fail_start=True))
    with pytest.raises(RecorderError, match="would not start"):
        r.start()
    assert not r.recording


def test_no_portaudio_or_no_device_is_a_clear_error(tmp_path):
    r = Recorder(tmp_path, stream_factory=sounddevice_stream)
    try:
        r.start()
    except RecorderError as e:
        assert "PortAudio" in str(e) or "microphone" in str(e)
    else:  # a machine with a real microphone
        r.cancel()
        pytest.skip("a microphone is present")


def test_no_sounddevice_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import sounddevice raises ImportError
    with pytest.raises(RecorderError, match="pip install sounddevice"):
        Recorder(tmp_path, stream_factory=sounddevice_stream).start()


def test_unplugged_microphone_or_unwritable_folder_keeps_the_recording(tmp_path, monkeypatch):
    class Unplugged(FakeStream):
        def stop(self):
            raise RuntimeError("Error stopping stream: device unavailable")

    streams = []

    def factory(**kw):
        streams.append(Unplugged(**kw))
        return streams[-1]

    (tmp_path / "data").write_text("a file where the data folder goes")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    rec = Recorder(tmp_path / "data" / "recordings", stream_factory=factory)
    rec.start()
    audio = sine(0.5, amp=0.25)
    streams[0].feed(audio)
    path = rec.stop()  # the stream would not stop and the data folder cannot be written: saved elsewhere
    assert streams[0].closed and not rec.recording
    assert path.parent == tmp_path / "tmp" / "gemma4-chat-recordings"
    np.testing.assert_allclose(sf.read(path, dtype="float32")[0], audio, atol=1e-4)
    rec.start()
    streams[1].feed(audio)
    rec.cancel()  # discarding a clip of an unplugged microphone is no crash either
    assert streams[1].closed and not rec.recording
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "data" / "tmp"))  # nowhere to write at all
    rec.start()
    streams[2].feed(audio)
    with pytest.raises(RecorderError, match="could not be saved.*--data-dir"):
        rec.stop()
