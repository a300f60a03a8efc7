"""Property-based checks over the image, audio and video processors, Gemma 4's and the 12B's: whatever the input,
the result is either well-formed output or a Gemma4Error whose message says what to do; never another exception
type, a hang or a silent wrong value. Sizes are kept small so the whole file runs in seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.processing.audio import AudioFeatureExtractor
from mlx_gemma4.processing.audio_file import load_audio
from mlx_gemma4.processing.image import SUPPORTED_SOFT_TOKENS, ImageProcessor
from mlx_gemma4.processing.unified_audio import UnifiedAudioFeatureExtractor
from mlx_gemma4.processing.unified_vision import (
    UnifiedImageProcessor,
    UnifiedVideoProcessor,
)
from mlx_gemma4.processing.video import VideoProcessor

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
                          np.float64, np.bool_, np.complex64])
BUDGETS = st.one_of(st.none(), st.sampled_from([*SUPPORTED_SOFT_TOKENS, 0, -70, 69, 71, 2240, 70.0, True, "70"]))
IMAGE_PROCS = [ImageProcessor(), UnifiedImageProcessor()]
AUDIO_FES = [AudioFeatureExtractor(), UnifiedAudioFeatureExtractor()]
VIDEO_PROCS = [VideoProcessor, UnifiedVideoProcessor]
FAMILIES = pytest.mark.parametrize("family", [0, 1], ids=["gemma4", "unified"])


def helpful(error: Gemma4Error) -> None:
    """A message a user can act on: a sentence or more, not a bare repr."""
    message = str(error)
    assert len(message) > 25 and " " in message, message


def outcome(fn, *args, **kwargs):
    """fn's result, or None when it raised a Gemma4Error with a helpful message; anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except Gemma4Error as e:
        helpful(e)
        return None


def arrays(max_dims: int = 3, max_side: int = 48):
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side)
    return DTYPES.flatmap(lambda dt: hnp.arrays(dt, shapes, elements=_elements(dt)))


def _elements(dtype):
    if np.issubdtype(dtype, np.complexfloating):
        return st.complex_numbers(max_magnitude=10, allow_nan=False, width=64)
    if np.issubdtype(dtype, np.floating):
        width = np.finfo(dtype).bits
        return st.floats(allow_nan=True, allow_infinity=True, width=width)
    return None


def check_image_output(out: dict, n_images: int, budget: int, proc: ImageProcessor) -> None:
    # Gemma 4: one 16-pixel patch per row, 9 rows per soft token; the 12B: one 48-pixel patch per soft token.
    rows_per_token, side = (1, 48) if isinstance(proc, UnifiedImageProcessor) else (9, 16)
    pixels, positions, counts = out["pixel_values"], out["image_position_ids"], out["num_soft_tokens_per_image"]
    assert pixels.shape == (n_images, budget * rows_per_token, side * side * 3) and pixels.dtype == np.float32
    assert positions.shape == (n_images, budget * rows_per_token, 2)
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    for i, n in enumerate(counts):
        assert 1 <= n <= budget
        real = positions[i, : n * rows_per_token]
        assert (real >= 0).all() and (positions[i, n * rows_per_token:] == -1).all()


@FAMILIES
@SETTINGS
@given(image=arrays(), budget=BUDGETS)
def test_image_arrays(family, image, budget):
    proc = IMAGE_PROCS[family]
    out = outcome(proc, image, max_soft_tokens=budget)
    if out is not None:
        check_image_output(out, 1, budget or proc.max_soft_tokens, proc)
        assert image.size > 0 and image.ndim in (2, 3)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"]


@FAMILIES
@SETTINGS
@given(mode=st.sampled_from(MODES), width=st.integers(0, 3000), height=st.integers(0, 3000),
       seed=st.integers(0, 2**32 - 1), budget=BUDGETS)
def test_pil_images_of_every_mode_and_aspect_ratio(family, mode, width, height, seed, budget):
    proc = IMAGE_PROCS[family]
    if width * height > 200_000:  # keep it quick: weird ratios, not big pictures
        height = max(1, 200_000 // max(width, 1))
    image = Image.new(mode, (width, height))
    if width * height:
        bands = len(image.getbands())
        raw = np.random.default_rng(seed).integers(0, 256, width * height * bands * 4, dtype=np.uint8)
        image.frombytes(raw.tobytes()[: len(image.tobytes())])
    out = outcome(proc, image, max_soft_tokens=budget)
    if out is not None:
        check_image_output(out, 1, budget or proc.max_soft_tokens, proc)
        assert width >= 1 and height >= 1


@SETTINGS
@given(bits=st.sampled_from(["I;16", "F"]), width=st.integers(2, 64), scale=st.floats(1e-3, 1e6),
       offset=st.floats(-1e3, 1e3))
def test_high_bit_depth_is_scaled_as_documented(bits, width, scale, offset):
    from mlx_gemma4.processing.image import load_image

    ramp = np.linspace(0, 1, width)[None].repeat(3, 0)  # (3, W), increasing left to right
    values = (ramp * 65535).astype(np.uint16) if bits == "I;16" else (ramp * scale + offset).astype(np.float32)
    gray = np.asarray(load_image(Image.fromarray(values)))[0, :, 0].astype(float)
    v = values[0].astype(np.float64)
    if bits == "I;16":
        expected = v / 65535 * 255
    elif v.min() >= 0 and v.max() <= 1:
        expected = v * 255  # fractions of white
    elif v.min() >= 0 and v.max() <= 255:
        expected = v  # already 8-bit levels
    elif v.max() > v.min():
        expected = (v - v.min()) / (v.max() - v.min()) * 255  # stretched from its minimum to its maximum
    else:
        expected = np.full_like(v, 0 if v.min() < 0 else 255)
    np.testing.assert_allclose(gray, expected, atol=0.51)
    assert (np.diff(gray) >= 0).all()  # never inverted or scrambled


def audio_shapes():
    n, c = st.integers(0, 6000), st.integers(1, 40)
    return st.one_of(st.tuples(n), st.tuples(n, c), st.tuples(c, n), st.tuples(c, c), st.just(()),
                     st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 40)))


def audio_arrays():
    return st.tuples(DTYPES, audio_shapes()).flatmap(
        lambda d: hnp.arrays(d[0], d[1], elements=_elements(d[0])))


@FAMILIES
@SETTINGS
@given(samples=audio_arrays(), rate=st.one_of(st.none(), st.sampled_from(
    [8000, 16000, 22050, 44100, 0, -1, 999, 10**7, 16000.5, float("nan"), True])))
def test_audio_arrays(family, samples, rate):
    fe = AUDIO_FES[family]
    clip = outcome(load_audio, samples, sampling_rate=rate)
    if clip is None:
        return
    assert clip.ndim == 1 and clip.dtype == np.float32 and np.isfinite(clip).all() and len(clip) > 0
    feats = outcome(fe, [clip])
    if feats is None:
        return
    tokens = feats["num_soft_tokens_per_audio"]
    assert np.isfinite(feats["input_features"]).all()
    assert sum(tokens) + 2 * len(tokens) == fe.prompt_length(len(clip))
    if isinstance(fe, UnifiedAudioFeatureExtractor):  # one 640-sample frame per token, any length
        assert tokens == [math.ceil(len(clip) / 640)] and feats["input_features_mask"].sum() == tokens[0]
    else:
        assert all(0 <= t <= fe.audio_seq_length for t in tokens)


@FAMILIES
@SETTINGS
@given(frames=st.lists(arrays(max_dims=4, max_side=24), min_size=0, max_size=4), as_array=st.booleans(),
       budget=BUDGETS, num_frames=st.integers(1, 5))
def test_videos_of_frames(family, frames, as_array, budget, num_frames):
    vp = VIDEO_PROCS[family](num_frames=num_frames)
    src = frames
    if as_array and frames and len({f.shape for f in frames}) == 1:
        src = np.stack(frames)  # (T, ...) one array
    out = outcome(vp, src, max_soft_tokens=budget)
    if out is None:
        return
    total = sum(out["num_frames_per_video"])
    assert out["pixel_values_videos"].shape[0] == total and total >= 1
    assert all(1 <= n <= num_frames for n in out["num_frames_per_video"])
    assert np.isfinite(out["pixel_values_videos"]).all()
    for stamps in out["timestamps"]:
        assert stamps == sorted(stamps) and all(math.isfinite(t) for t in stamps)


@pytest.fixture(scope="module", params=["gemma4", "gemma4_unified"])
def proc(request, tmp_path_factory):
    import json

    from mlx_gemma4.processing.processor import Processor
    from tests.fixtures_tokenizer import make_tokenizer

    path = make_tokenizer(tmp_path_factory.mktemp("props"))
    (path / "config.json").write_text(json.dumps({"model_type": request.param}))
    proc = Processor.from_pretrained(path)
    assert (type(proc).__name__ == "UnifiedProcessor") == (request.param == "gemma4_unified")
    return proc


TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "<|video|>", "<|image|>", "<bos>"])),
                max_size=12).map("".join)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_placeholders=st.integers(0, 3), n_videos=st.integers(0, 3), frames_each=st.integers(1, 3),
       nested=st.booleans(), text=TEXT)
def test_processor_videos_and_text(proc, n_placeholders, n_videos, frames_each, nested, text):
    frame = np.zeros((20, 30, 3), np.uint8)
    videos = [[frame] * frames_each for _ in range(n_videos)] if nested else [frame] * (n_videos * frames_each)
    prompt = text + "<|video|>" * n_placeholders
    out = outcome(proc, text=prompt, videos=videos or None, max_soft_tokens=70)
    if out is None:
        return
    n = n_videos if nested else min(n_videos, 1)  # a flat list of frames is one video
    assert prompt.count("<|video|>") == n and "<|image|>" not in prompt
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
    ids = np.array(out["input_ids"])[0]
    assert int((ids == proc.special.boi.id).sum()) == n * frames_each


def test_mlx_arrays_are_media_as_numpy_arrays_are():
    """An mx.array image was refused ("Cannot use array as an image") though numpy arrays work and the README says
    arrays (pixels or samples made by other MLX code)."""
    import mlx.core as mx

    from mlx_gemma4.processing.audio_file import load_audio
    from mlx_gemma4.processing.image import load_image
    from mlx_gemma4.processing.video import load_video

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(np.array(load_image(mx.array(pixels))), np.array(load_image(pixels)))
    samples = np.sin(np.arange(16000) / 10).astype(np.float32)
    assert np.array_equal(load_audio(mx.array(samples)), load_audio(samples))
    assert np.allclose(load_audio(mx.array(samples).astype(mx.bfloat16)), load_audio(samples), atol=1e-2)
    frames = rng.integers(0, 255, (4, 20, 30, 3), dtype=np.uint8)
    assert len(load_video(mx.array(frames)).frames) == len(load_video(frames).frames) == 4
