"""mlx_gemma4/processing/unified*.py against transformers' Gemma4UnifiedProcessor (Gemma 4 12B), piece by piece:
the reference's image and video ``_preprocess`` (run without torchvision, see tests/unified_reference.py), its audio
feature extractor, and the ids of its placeholder expansion under the reference tokenizer."""

from __future__ import annotations

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.errors import ContextLengthError, InputError
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.processing.unified import UnifiedProcessor
from tests.fixtures_tokenizer import make_tokenizer
from tests.tiny import SPECIAL_IDS
from tests.unified_reference import (
    expected_ids,
    reference_audio,
    reference_images,
    reference_videos,
    unified_dir,
    unified_processor_config,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return unified_dir(tmp_path_factory.mktemp("uproc"), config={
        "model_type": "gemma4_unified", "text_config": {"max_position_embeddings": 131072}})


@pytest.fixture(scope="module")
def proc(ckpt):
    return Processor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def ref_tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


def _check_ids(out, ids, types):
    assert out["input_ids"].dtype == mx.int32 and out["input_ids"].shape == (1, len(ids))
    assert out["input_ids"][0].tolist() == ids
    assert out["mm_token_type_ids"].dtype == mx.int32 and out["mm_token_type_ids"][0].tolist() == types


def close_to_reference(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Resized pixels of a smooth picture: Pillow's bicubic and torch's round their two passes differently, so
    values sit a 1/255 step apart here and there, two steps at most (unified_vision.py's docstring)."""
    steps = np.abs(ours - theirs) * 255
    assert steps.max() < 2.01 and steps.mean() < 0.05, (steps.max(), steps.mean())


def _noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _smooth(h, w, seed=0):
    """A picture without pixel-level noise (where resize filters agree to a 1/255 step)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    rgb = [127.5 + 100 * np.sin(2 * np.pi * (x + 0.7 * y) + p) for p in phase]
    return Image.fromarray(np.stack(rgb, -1).round().astype(np.uint8))


def _wave(samples, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(samples))).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------------
# Choosing the processor
# ------------------------------------------------------------------------------------------------------------------


def test_load_picks_the_unified_processor(tmp_path, ckpt):
    from mlx_gemma4.weights import load_processor

    assert type(load_processor(ckpt)) is UnifiedProcessor  # load()'s path, by config.json's model_type
    # No config.json: the processor files say it, nested (processor_config.json) or flat (preprocessor_config.json).
    assert type(Processor.from_pretrained(unified_dir(tmp_path / "nested"))) is UnifiedProcessor
    flat = make_tokenizer(tmp_path / "flat", processor_config=False)
    (flat / "preprocessor_config.json").write_text(json.dumps(unified_processor_config()["feature_extractor"]))
    assert type(Processor.from_pretrained(flat)) is UnifiedProcessor
    # Gemma 4 checkpoints keep the Gemma 4 processor, whatever else lies around.
    plain = make_tokenizer(tmp_path / "plain")
    assert type(Processor.from_pretrained(plain)) is Processor
    (plain / "config.json").write_text(json.dumps({"model_type": "gemma4"}))
    assert type(Processor.from_pretrained(plain)) is Processor
    # An explicit subclass is what the caller asked for.
    assert type(UnifiedProcessor.from_pretrained(plain)) is UnifiedProcessor


def test_converter_copies_the_processor_files():
    from mlx_gemma4.conversion import SIDE_FILES

    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert name in SIDE_FILES


# ------------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, budget", [
    ((336, 480), 70),    # already the size the budget gives: no resize
    ((384, 384), 70),
    ((240, 672), 70),
    ((480, 672), 140),
])
def test_image_patches_match_reference_exactly(proc, size, budget):
    images = [_noise(*size, seed=budget)]
    ours = proc.image_processor(images, max_soft_tokens=budget)
    theirs = reference_images(images, budget)
    assert ours["num_soft_tokens_per_image"] == theirs["num_soft_tokens_per_image"]
    np.testing.assert_array_equal(ours["image_position_ids"], theirs["image_position_ids"])
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_values"].shape == (1, budget, 48 * 48 * 3)
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])  # bit for bit


@pytest.mark.parametrize("size, budget", [
    ((100, 150), 280),   # upscaled
    ((1000, 700), 70),   # downscaled
    ((300, 90), 140),    # tall
    ((12, 900), 70),     # very wide: one row of patches
    ((1, 1), 70),        # tiny
    ((5, 3), 560),
])
def test_resized_images_match_reference(proc, size, budget):
    images = [_smooth(*size, seed=len(size) + budget), _noise(*size[::-1], seed=budget)]
    ours = proc.image_processor(images, max_soft_tokens=budget)
    theirs = reference_images(images, budget)
    assert ours["num_soft_tokens_per_image"] == theirs["num_soft_tokens_per_image"]
    np.testing.assert_array_equal(ours["image_position_ids"], theirs["image_position_ids"])
    close_to_reference(ours["pixel_values"][0], theirs["pixel_values"][0])
    n = ours["num_soft_tokens_per_image"][1]
    assert (ours["pixel_values"][1, n:] == 0).all() and (ours["image_position_ids"][1, n:] == -1).all()


def test_budgets_come_from_the_call_or_the_config(proc, ckpt, tmp_path):
    image = _smooth(200, 300)
    for budget in (70, 140, 280, 560, 1120):
        out = proc.image_processor([image], max_soft_tokens=budget)
        n = out["num_soft_tokens_per_image"][0]
        assert out["pixel_values"].shape == (1, budget, 6912) and budget * 0.8 <= n <= budget
    assert proc.image_processor([image])["pixel_values"].shape[1] == 280  # the config's
    config = unified_processor_config()
    config["image_processor"]["max_soft_tokens"] = 140
    other = Processor.from_pretrained(unified_dir(tmp_path / "c140", processor_config=config))
    assert other(text="<|image|>", images=image)["pixel_values"].shape == (1, 140, 6912)
    for bad in (0, 100, 2240, "70", True):
        with pytest.raises(InputError, match="max_soft_tokens must be one of"):
            proc(text="<|image|>", images=image, max_soft_tokens=bad)
    # Video frames: the config's 70 per frame, or the call's budget (video_max_soft_tokens= for frames only).
    frames = np.stack([np.asarray(image)] * 2)  # (T, H, W, 3)
    assert proc(text="<|video|>", videos=frames)["pixel_values_videos"].shape == (2, 70, 6912)
    assert proc(text="<|video|>", videos=frames, max_soft_tokens=140)["pixel_values_videos"].shape == (2, 140, 6912)
    both = proc(text="<|image|><|video|>", images=image, videos=frames, video_max_soft_tokens=560)
    assert both["pixel_values"].shape == (1, 280, 6912) and both["pixel_values_videos"].shape == (2, 560, 6912)


def test_image_prompt_expands_like_reference(proc, ref_tok):
    images = [_noise(100, 150, 0), _smooth(300, 90, 1)]
    text = "<bos><|turn>user\nCompare <|image|> with\n\n<|image|>\n\nplease<turn|>\n<|turn>model\n"
    out = proc(text=text, images=images, max_soft_tokens=70)
    _check_ids(out, *expected_ids(ref_tok, text, image_out=reference_images(images, 70)))
    assert set(out) == {"input_ids", "mm_token_type_ids", "pixel_values", "image_position_ids"}
    assert out["pixel_values"].dtype == mx.float32 and out["image_position_ids"].shape == (2, 70, 2)


# ------------------------------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------------------------------


def _write_mp4(path, frames: int, size=(48, 64), rate=4):
    import av

    with av.open(str(path), "w") as box:
        stream = box.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.asarray(_smooth(*size, seed=i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return str(path)


def test_video_frames_match_reference_exactly(proc):
    frames = np.stack([np.asarray(_noise(336, 480, seed=i)) for i in range(3)])  # (T, H, W, 3), budget 70's size
    ours = proc.video_processor([frames])
    theirs = reference_videos([frames], 70)
    assert ours["num_frames_per_video"] == theirs["num_frames_per_video"] == [3]
    assert ours["num_soft_tokens_per_video"] == theirs["num_soft_tokens_per_video"] == [70]
    np.testing.assert_array_equal(ours["video_position_ids"], theirs["video_position_ids"])
    np.testing.assert_array_equal(ours["pixel_values_videos"], theirs["pixel_values_videos"])


def test_video_sampling_patching_and_prompt_match_reference(proc, ref_tok, tmp_path):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    from mlx_gemma4.processing.video import load_video

    clip = _write_mp4(tmp_path / "clip.mp4", frames=10)  # 2.5 s at 4 fps; the config samples 4 frames
    image = _smooth(50, 50, 7)
    text = "Watch <|video|> and <|image|>, then <|video|>."
    frames = [np.asarray(_smooth(90, 160, seed=i)) for i in range(2)]  # a list of frames is one video
    out = proc(text=text, videos=[clip, frames], images=[image])

    indices = default_sample_indices_fn(VideoMetadata(total_num_frames=10, fps=4.0), num_frames=4)
    decoded = load_video(clip, num_frames=None).frames  # every frame, decoded as the video module does
    videos = [decoded[indices], np.stack(frames)]
    theirs = reference_videos(videos, 70)
    theirs["video_metadata"] = [VideoMetadata(total_num_frames=10, fps=4.0, frames_indices=indices),
                                VideoMetadata(total_num_frames=2, fps=None, frames_indices=[0, 1])]
    ids, types = expected_ids(ref_tok, text, image_out=reference_images([image], 280), video_out=theirs)
    _check_ids(out, ids, types)
    assert out["pixel_values_videos"].shape == (6, 70, 6912) and out["video_position_ids"].shape == (6, 70, 2)
    np.testing.assert_array_equal(np.array(out["video_position_ids"]), theirs["video_position_ids"])
    close_to_reference(np.array(out["pixel_values_videos"]), theirs["pixel_values_videos"])
    assert "00:01 <|image>" in ref_tok.decode(ids) and 2 in types and 1 in types


# ------------------------------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [[1], [639, 640, 641], [16000, 37_920], [16000 * 31 + 17]])
def test_audio_frames_match_reference(proc, lengths):
    clips = [_wave(n, seed=i) for i, n in enumerate(lengths)]
    ours = proc.audio_extractor(clips)
    theirs = reference_audio(clips)
    assert ours["input_features"].dtype == np.float32 and ours["input_features_mask"].dtype == np.bool_
    np.testing.assert_array_equal(ours["input_features"], theirs["input_features"])
    np.testing.assert_array_equal(ours["input_features_mask"], theirs["input_features_mask"])
    assert ours["num_soft_tokens_per_audio"] == [math.ceil(n / 640) for n in lengths]


def test_audio_prompt_expands_like_reference(proc, ref_tok):
    clips = [_wave(16000, 0), _wave(16000 * 2.37, 1), _wave(641, 2)]
    image = _noise(64, 200, 3)
    text = "Transcribe <|audio|> then <|audio|> about <|image|> and <|audio|>."
    out = proc(text=text, audio=clips, images=[image], max_soft_tokens=140)
    _check_ids(out, *expected_ids(ref_tok, text, image_out=reference_images([image], 140),
                               audio_out=reference_audio(clips)))
    assert out["input_features"].shape == (3, 60, 640) and out["input_features_mask"].dtype == mx.bool_


def test_audio_longer_than_30_s_is_one_run_as_in_the_reference(proc, ref_tok, tmp_path):
    import soundfile as sf

    wave = _wave(16000 * 45 + 100)  # 45 s: one run of ceil(n / 640) tokens, neither cut nor split
    sf.write(tmp_path / "long.wav", wave, 16000, subtype="FLOAT")
    out = proc(text="<|audio|>", audio=str(tmp_path / "long.wav"))
    _check_ids(out, *expected_ids(ref_tok, "<|audio|>", audio_out=reference_audio([wave])))
    ids = out["input_ids"][0].tolist()
    assert ids.count(SPECIAL_IDS["audio"]) == math.ceil(len(wave) / 640) == 1126 and ids.count(SPECIAL_IDS["boa"]) == 1


def test_audio_that_cannot_fit_the_context_is_refused(ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "ckpt")
    (path / "config.json").write_text(json.dumps({"model_type": "gemma4_unified",
                                                  "text_config": {"max_position_embeddings": 1000}}))
    proc = Processor.from_pretrained(path)
    longest = proc.audio_extractor.longest_clip(999)
    assert longest == 997 * 640 and proc.audio_extractor.prompt_length(longest) == 999
    assert (proc(text="<|audio|>", audio=np.zeros(longest, np.float32))["input_ids"] == SPECIAL_IDS["audio"]
            ).sum().item() == 997
    with pytest.raises(ContextLengthError, match="longest audio it can take is 39.9 s"):
        proc(text="<|audio|>", audio=np.zeros(longest + 1, np.float32))


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_bad_input_is_an_input_error(proc, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + b"\0" * 40)
    cases = [
        ({"text": "<|image|>", "images": str(tmp_path / "broken.png")}, "broken.png"),
        ({"text": "<|image|>", "images": 3.5}, "Cannot use a float"),
        ({"text": "<|image|>", "images": np.zeros((0, 4, 3), np.uint8)}, "non-empty"),
        ({"text": "<|audio|>", "audio": np.zeros(0, np.float32)}, "empty"),
        ({"text": "<|audio|>", "audio": str(tmp_path / "broken.wav")}, "broken.wav"),
        ({"text": "<|audio|>", "audio": {"samples": 1}}, "Cannot use a dict"),
        ({"text": "<|video|>", "videos": str(tmp_path / "missing.mp4")}, "no such file"),
        ({"text": "<|image|> <|image|>", "images": [_noise(8, 8)]}, "2 <\\|image\\|> placeholder"),
        ({"text": ["a"]}, "prompt string"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            proc(**kwargs)
