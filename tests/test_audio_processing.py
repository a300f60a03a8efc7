"""mlx_gemma4.processing.audio against transformers' Gemma4AudioFeatureExtractor / Gemma4Processor, plus decoding.

Feature tolerance: our extractor runs the same numpy operations in the same dtypes as the reference (float32
framing, window and rFFT; float64 mel matmul and log), so results are bit-identical here. ``atol=1e-5`` on
log-mel values of magnitude ~1-10 only leaves room for a BLAS with another summation order in the mel matmul;
a wrong window (symmetric vs periodic), padding side or frame offset changes values by > 1e-2.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from mlx_gemma4.errors import InputError
from mlx_gemma4.processing.audio import AudioFeatureExtractor, audio_prompt_text
from mlx_gemma4.processing.audio_file import load_audio
from tests.helpers import check_unusable_paths

SR = 16_000
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


@pytest.fixture(scope="module")
def ours():
    return AudioFeatureExtractor()


def signal(kind: str, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    if kind == "silence":
        x = np.zeros_like(t)
    elif kind == "tone":
        x = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    elif kind == "noise":
        x = 0.3 * np.random.default_rng(int(seconds * 10)).standard_normal(t.shape)
    elif kind == "chirp":  # linear sweep 100 Hz -> 7.5 kHz over the clip
        f0, f1 = 100.0, 7500.0
        x = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-9))))
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def ref_num_tokens(ref_fe, wave: np.ndarray) -> int:
    """processing_gemma4's own arithmetic, called on a stand-in for the processor (it needs only these two)."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    stub = SimpleNamespace(feature_extractor=ref_fe, audio_seq_length=750)
    return Gemma4Processor._compute_audio_num_tokens(stub, wave, SR)


def ref_prompt(ref_out, idx: int) -> str:
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    stub = SimpleNamespace(boa_token="<boa>", audio_token="<A>", eoa_token="<eoa>")
    return Gemma4Processor.replace_audio_token(stub, ref_out, idx)


def assert_same_features(ours_out, ref_out, row: int = 0, ref_row: int = 0):
    a = ours_out["input_features"][row]
    b = np.asarray(ref_out["input_features"][ref_row])
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(ours_out["input_features_mask"][row],
                                  np.asarray(ref_out["input_features_mask"][ref_row]))


@pytest.mark.parametrize("seconds", [0.3, 1.5, 7.0, 29.0])
@pytest.mark.parametrize("kind", ["silence", "tone", "noise", "chirp"])
def test_features_match_reference(ours, ref, kind, seconds):
    x = signal(kind, seconds)
    a, b = ours([x]), ref([x], return_tensors="np")
    assert a["input_features"].shape[-1] == 128
    assert_same_features(a, b)
    n = a["num_soft_tokens_per_audio"]
    assert n == [ref_num_tokens(ref, x)]
    assert n[0] == int(round(seconds * 1000 / 40)) or abs(n[0] - seconds * 25) <= 1  # ~40 ms per token
    assert audio_prompt_text(n[0], "<boa>", "<A>", "<eoa>") == ref_prompt(b, 0)


def test_batch_of_different_lengths_matches_reference(ours, ref):
    clips = [signal("chirp", 1.0), signal("noise", 0.3), signal("tone", 2.3)]
    a, b = ours(clips), ref(clips, return_tensors="np")
    assert a["input_features"].shape == b["input_features"].shape  # padded to the longest, then to 128 samples
    for i, clip in enumerate(clips):
        assert_same_features(a, b, i, i)
        assert a["num_soft_tokens_per_audio"][i] == ref_num_tokens(ref, clip)
        assert audio_prompt_text(a["num_soft_tokens_per_audio"][i], "<boa>", "<A>", "<eoa>") == ref_prompt(b, i)
    assert a["segments_per_audio"] == [1, 1, 1]


def test_44k_stereo_is_resampled_then_matches_reference(ours, ref):
    sr = 44_100
    left, right = signal("tone", 1.5, sr), signal("chirp", 1.5, sr)
    stereo = np.stack([left, right], axis=1)  # (n, 2)
    mono16 = load_audio(stereo, sampling_rate=sr)
    assert mono16.dtype == np.float32 and mono16.ndim == 1
    assert abs(len(mono16) - 1.5 * SR) <= 1
    # The resampler is accurate: the mixed tone, resampled, equals the tone generated at 16 kHz (away from edges).
    tone16 = load_audio(np.stack([left, left], axis=1), sampling_rate=sr)
    np.testing.assert_allclose(tone16[400:-400], signal("tone", 1.5)[400:len(tone16) - 400], atol=1e-3)
    # Same array into both extractors: identical features (tolerance as for every feature test).
    a, b = ours([mono16]), ref([mono16], return_tensors="np")
    assert_same_features(a, b)
    assert a["num_soft_tokens_per_audio"] == [ref_num_tokens(ref, mono16)]


def test_long_clip_is_split_into_30s_segments(ours, ref):
    x = signal("noise", 65.0)
    a = ours([x, signal("tone", 2.0)])
    assert a["segments_per_audio"] == [3, 1]
    assert a["input_features"].shape[0] == 4
    # The reference truncates a long clip to its first 30 s: that is exactly our first segment.
    assert_same_features(a, ref([x], return_tensors="np"), 0, 0)
    tail = x[2 * 480_000:]
    b = ref([tail], return_tensors="np")
    t = b["input_features"].shape[1]
    np.testing.assert_allclose(a["input_features"][2, :t], b["input_features"][0], rtol=0, atol=ATOL)
    assert not a["input_features_mask"][2, t:].any() and not a["input_features"][2, t:].any()
    assert a["num_soft_tokens_per_audio"][:3] == [750, 750, ref_num_tokens(ref, tail)]
    texts = ours.prompt_texts(a, "<boa>", "<A>", "<eoa>")
    assert len(texts) == 2 and texts[0].count("<boa>") == 3
    assert texts[0].count("<A>") == sum(a["num_soft_tokens_per_audio"][:3])
    assert texts[1] == audio_prompt_text(a["num_soft_tokens_per_audio"][3], "<boa>", "<A>", "<eoa>")


def test_30s_clip_gives_exactly_750_tokens(ours, ref):
    x = signal("tone", 30.0)
    a = ours([x])
    assert a["segments_per_audio"] == [1] and a["num_soft_tokens_per_audio"] == [750] == [ref_num_tokens(ref, x)]


@pytest.mark.parametrize("extra", [1, 100, 160])
def test_a_tail_too_short_for_a_token_adds_no_empty_segment(ours, ref, extra):
    # 30 s and a few ms: the reference gives 750 tokens; a second segment of under 10 ms would give none, only an
    # empty <boa><eoa> run and a whole padded row for the audio tower to encode.
    x = signal("noise", (480_000 + extra) / SR)
    a = ours([x])
    assert a["segments_per_audio"] == [1] and a["input_features"].shape[0] == 1
    assert a["num_soft_tokens_per_audio"] == [750] == [ref_num_tokens(ref, x)]
    assert_same_features(a, ref([x], return_tensors="np"), 0, 0)
    assert ours.prompt_texts(a, "<", "a", ">") == ["<" + "a" * 750 + ">"]
    assert ours.prompt_length(len(x)) == 752


def test_from_processor_config_matches_reference_with_settings(ref):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(0)
    settings = dict(preemphasis=0.97, per_bin_mean=list(rng.standard_normal(128)),
                    per_bin_stddev=list(1 + rng.random(128)), mel_floor=1e-5, input_scale_factor=0.5)
    r = Gemma4AudioFeatureExtractor(**settings)
    saved = r.to_dict()  # what save_pretrained puts under "feature_extractor" in processor_config.json
    saved["mel_floor"] = float(saved["mel_floor"])
    processor_config = {"feature_extractor": saved, "audio_seq_length": 750, "audio_ms_per_token": 40,
                        "image_processor": {"patch_size": 16}}
    for d in (processor_config, saved):  # processor_config.json, or a flat preprocessor_config.json
        ours = AudioFeatureExtractor.from_dict(d)
        assert (ours.frame_length, ours.hop_length, ours.fft_length) == (r.frame_length, r.hop_length, r.fft_length)
        x = signal("chirp", 1.5)
        assert_same_features(ours([x]), r([x], return_tensors="np"))
    htk_off = dict(saved, preemphasis_htk_flavor=False)
    x = signal("noise", 0.7)
    assert_same_features(AudioFeatureExtractor.from_dict(htk_off)([x]),
                         Gemma4AudioFeatureExtractor(**dict(settings, preemphasis_htk_flavor=False))(
                             [x], return_tensors="np"))


def test_defaults_equal_reference_defaults(ours, ref):
    assert ours.feature_size == ref.feature_size == 128
    assert (ours.frame_length, ours.hop_length, ours.fft_length) == (ref.frame_length, ref.hop_length, ref.fft_length)
    np.testing.assert_array_equal(ours.window, ref.window)  # periodic Hann
    np.testing.assert_allclose(ours.mel_filters, ref.mel_filters, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Decoding files and arrays
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("subtype, atol", [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                            ("PCM_32", 1e-7), ("FLOAT", 0), ("DOUBLE", 1e-7)])
def test_wav_subtypes_load_to_the_known_signal(tmp_path, subtype, atol):
    x = signal("tone", 0.5)
    path = tmp_path / f"tone_{subtype}.wav"
    sf.write(path, x, SR, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, rtol=0, atol=atol)


def _peak_hz(y: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * SR / len(y))


@pytest.mark.parametrize("fmt, subtype, sr", [("FLAC", "PCM_16", SR), ("FLAC", "PCM_24", 48_000),
                                               ("OGG", "VORBIS", SR), ("MP3", "MPEG_LAYER_III", 44_100)])
def test_compressed_formats_load(tmp_path, fmt, subtype, sr):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    x = signal("tone", 1.0, sr)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, x, sr, format=fmt, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - SR) <= 0.05 * SR  # lossy codecs may add or trim a few ms
    assert abs(_peak_hz(y) - 440.0) < 3.0
    assert 0.4 < np.abs(y).max() < 0.6
    if fmt == "FLAC":  # lossless: the very samples, resampled if needed
        np.testing.assert_allclose(y[200:-200], signal("tone", 1.0)[200:-200], atol=2e-3)


def test_stereo_file_read_through_pyav_is_the_mean_of_its_channels(tmp_path):
    # A container libsndfile does not read (Matroska; m4a and webm take the same path) goes through PyAV. Its
    # channels are averaged to mono as a WAV's are, not downmixed by FFmpeg (which sums them at -3 dB).
    import av

    left = (signal("tone", 0.5) * 20_000).astype(np.int16)
    pcm = np.stack([left, left // 2])  # (2, n): the right channel at half the level
    with av.open(str(tmp_path / "stereo.mka"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=SR, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.T.reshape(1, -1)), format="s16", layout="stereo")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    sf.write(tmp_path / "stereo.wav", pcm.T, SR, subtype="PCM_16")
    expected = load_audio(tmp_path / "stereo.wav")
    np.testing.assert_allclose(expected, pcm.mean(axis=0) / 32768, rtol=0, atol=1e-6)
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.mka"), expected, rtol=0, atol=1e-6)


def test_stereo_file_and_8khz_int16_array(tmp_path):
    x = signal("tone", 0.5)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([x, np.zeros_like(x)], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), x / 2, atol=1e-7)
    pcm = (signal("tone", 0.5, 8000) * 32767).astype(np.int16)
    y = load_audio(pcm, sampling_rate=8000)
    assert len(y) == 8000 and abs(np.abs(y).max() - 0.5) < 0.01
    y8 = load_audio((pcm // 256).astype(np.int8), sampling_rate=8000)
    np.testing.assert_allclose(y8, y, atol=2 / 128)


def test_bad_inputs_raise_input_error(tmp_path):
    check_unusable_paths(load_audio, tmp_path, ".wav", "as audio")
    cases = {}
    empty = tmp_path / "no_samples.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    cases[empty.name] = empty
    nan_wav = tmp_path / "nan.wav"
    bad = signal("tone", 0.2)
    bad[100] = np.nan
    sf.write(nan_wav, bad, SR, subtype="FLOAT")
    cases[nan_wav.name] = nan_wav
    for what, src in cases.items():
        with pytest.raises(InputError) as e:
            load_audio(src)
        assert str(src) in str(e.value) or what in str(e.value)
    for arr in (np.zeros(0, np.float32), np.array([0.1, np.inf], np.float32), np.zeros((2, 2, 2), np.float32)):
        with pytest.raises(InputError):
            load_audio(arr)
    with pytest.raises(InputError):
        load_audio(12345)


def test_extractor_refuses_unusable_clips(ours):
    with pytest.raises(InputError, match="ms"):
        ours([np.zeros(100, np.float32)])  # too short for a single token
    short = ours.min_samples - 1   # (it said "is 10.0 ms long; it needs at least 10 ms" one sample short)
    with pytest.raises(InputError, match=rf"is {short} samples \(.* ms\) long; it needs at least {short + 1} "):
        ours([np.zeros(short, np.float32)])
    ours([np.zeros(short + 1, np.float32)])
    with pytest.raises(InputError, match="NaN"):
        ours([np.full(4000, np.nan, np.float32)])
    with pytest.raises(InputError):
        ours([])


@pytest.mark.parametrize("fmt, ext", [("WAV", "wav"), ("AIFF", "aiff"), ("AU", "au"), ("W64", "w64")])
def test_truncated_file_is_refused_not_read_in_part(tmp_path, fmt, ext):
    whole = tmp_path / f"whole.{ext}"
    sf.write(whole, signal("tone", 1.0), SR, format=fmt, subtype="PCM_16")
    assert len(load_audio(whole)) == SR
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as e:
        load_audio(cut)
    assert f"cut.{ext}" in str(e.value)


def test_cut_m4a_says_truncated_not_unsupported(tmp_path):
    # An m4a (read through PyAV) cut short part way through its audio: the data is bad, not the format.
    import av

    whole = tmp_path / "memo.m4a"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:  # index first, as on the web
        stream = container.add_stream("aac", rate=SR, layout="mono")
        x = signal("tone", 5.0)[None].astype(np.float32)  # (1, n)
        for i in range(0, x.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + 1024]), format="fltp", layout="mono")
            frame.sample_rate = SR
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert abs(len(load_audio(whole)) - 5 * SR) < SR // 5  # AAC pads its start and its last frame
    data = whole.read_bytes()
    (tmp_path / "cut.m4a").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt.*re-download") as e:
        load_audio(tmp_path / "cut.m4a")
    assert "cut.m4a" in str(e.value) and "Use a WAV" not in str(e.value)


def test_streamed_wav_with_unknown_length_is_read_whole(tmp_path):
    import struct

    path = tmp_path / "stream.wav"
    sf.write(path, signal("tone", 1.0), SR, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)  # a writer that did not know the length yet
    path.write_bytes(bytes(data))
    assert len(load_audio(path)) == SR


def test_channels_first_arrays_are_mixed_to_mono():
    x = signal("tone", 0.5)
    nine = np.stack([x] * 8 + [np.zeros_like(x)])  # (9, n): 9 channels, channels first
    np.testing.assert_allclose(load_audio(nine), x * 8 / 9, atol=1e-6)
    np.testing.assert_allclose(load_audio(nine.T), x * 8 / 9, atol=1e-6)  # (n, 9)
    with pytest.raises(InputError, match="channels"):
        load_audio(np.zeros((100, 200), np.float32))  # neither axis is a plausible channel count


def test_array_sampling_rate_is_checked():
    for rate in (0, -16000, 12.5, float("nan"), 10**9, True, "16k"):
        with pytest.raises(InputError, match="sampling_rate"):
            load_audio(np.zeros(1600, np.float32), sampling_rate=rate)
    with pytest.raises(InputError, match="array"):
        load_audio([[0.0, 0.1], [0.2]])  # ragged


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    sf.write(tmp_path / "memo.wav", signal("tone", 0.5), SR)
    assert len(load_audio("~/memo.wav")) == SR // 2


def test_prompt_length_and_longest_clip(ours, ref):
    segment = ours.segment_samples
    for n in (1600, 16_000, segment, segment + 1, 3 * segment + 12_345):
        run = ours.prompt_texts(ours([signal("noise", n / SR)]), "<", "a", ">")[0]
        assert ours.prompt_length(n) == len(run)
    for budget in (100, 752, 753, 131_071):
        longest = ours.longest_clip(budget)
        assert ours.prompt_length(longest) <= budget < ours.prompt_length(longest + 1)
