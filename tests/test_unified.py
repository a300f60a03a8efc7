"""Gemma 4 12B (gemma4_unified, encoder-free): parity with transformers' Gemma4UnifiedForConditionalGeneration on
tiny random checkpoints (tests/tiny_unified.py), in float32, and the soft tokens of every medium in bfloat16.

Full-forward logits for text, one and two images of different aspect, video frames, audio, audio with an image;
the text-only form (gemma4_unified_text); chunked prefill and token-by-token decoding across the window (8) with
the bidirectional vision blocks, which the reference's forward opens in every layer and for the whole block (a
12-token image is longer than the window); greedy generation equal to transformers' generate. Tolerance: that of
tests/test_model.py (measured ~1e-5 here: the embedders are two norms and two matmuls).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.config import ModelConfig
from mlx_gemma4.errors import InputError
from mlx_gemma4.generation import generate_step
from mlx_gemma4.weights import load_model
from tests import tiny_unified as tu
from tests.helpers import MODEL_ATOL


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tu.make_model()
    path = tmp_path_factory.mktemp("unified")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load_model(path)


def _mx(inputs: dict) -> dict:
    return {k: mx.array(v) for k, v in inputs.items()}


def _check(hf, model, inputs: dict) -> np.ndarray:
    ours = np.array(model(**_mx(inputs)))
    ref = tu.reference_logits(hf, inputs)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=MODEL_ATOL, rtol=0)
    return ours


def _images(grids, *words, seed=0) -> dict:
    pixels, positions = tu.patches(grids, seed)
    parts = [p for i, g in enumerate(grids) for p in (words[i], ("image", g[0] * g[1]))] + [words[-1]]
    return {"input_ids": tu.prompt(*parts, seed=seed), "pixel_values": pixels, "image_position_ids": positions}


def _video(grid, frames: int, seed=0) -> dict:
    pixels, positions = tu.patches([grid] * frames, seed)
    n = grid[0] * grid[1]
    # As the processor writes a video: a timestamp, then each frame between boi / eoi.
    parts = ["clip"] + [p for _ in range(frames) for p in ("00:0 1", ("video", n))] + ["describe it"]
    return {"input_ids": tu.prompt(*parts, seed=seed), "pixel_values_videos": pixels, "video_position_ids": positions}


def _audio(seconds: float, *, image: tuple[int, int] | None = None) -> dict:
    frames = tu.waveform_frames([seconds])
    n = int(frames["input_features_mask"].sum())
    parts = ["hear", ("audio", n), "now"]
    out = dict(frames)
    if image is not None:
        pixels, positions = tu.patches([image], seed=3)
        parts += [("image", image[0] * image[1]), "and this"]
        out.update(pixel_values=pixels, image_position_ids=positions)
    return {"input_ids": tu.prompt(*parts), **out}


def test_text(pair):
    hf, model = pair
    _check(hf, model, {"input_ids": tu.prompt("one two three four five six seven eight nine ten eleven twelve")})


def test_one_image(pair):
    hf, model = pair
    _check(hf, model, _images([(2, 3)], "look at", "what is it"))


def test_two_images_of_different_aspect(pair):
    hf, model = pair
    inputs = _images([(1, 4), (3, 2)], "first", "then", "compare them", seed=1)
    ours = _check(hf, model, inputs)
    # What else the processor returns is taken and not needed.
    extra = {"mm_token_type_ids": tu.token_types(inputs["input_ids"]), "num_soft_tokens_per_image": np.array([4, 6])}
    np.testing.assert_array_equal(np.array(model(**_mx(inputs | extra))), ours)


def test_image_longer_than_the_window(pair):
    """12 soft tokens, window 8: the reference lets the whole block see itself, in sliding and full layers."""
    hf, model = pair
    inputs = _images([(3, 4)], "see", "and say", seed=2)
    ours = _check(hf, model, inputs)
    model.config.text_config.vision_block_layers = "sliding"   # gemma4's rule gives other logits
    try:
        assert np.abs(np.array(model(**_mx(inputs))) - ours).max() > 1e-2
    finally:
        model.config.text_config.vision_block_layers = "every"


def test_video_frames(pair):
    hf, model = pair
    _check(hf, model, _video((2, 2), 3))


@pytest.mark.parametrize("seconds", [0.3, 1.1])
def test_audio(pair, seconds):
    hf, model = pair
    inputs = _audio(seconds)
    assert 0 < inputs["input_features_mask"].sum() == np.ceil(seconds * 16000 / 640)
    _check(hf, model, inputs)


def test_audio_with_image(pair):
    hf, model = pair
    _check(hf, model, _audio(0.7, image=(2, 2)))


def test_padding_audio_frames_are_dropped(pair):
    """Two clips in one batch: the shorter one's padding frames give no soft tokens."""
    hf, model = pair
    frames = tu.waveform_frames([0.2, 0.5])
    n = frames["input_features_mask"].sum(axis=1)
    assert n[0] < n[1] == frames["input_features"].shape[1]
    inputs = {"input_ids": tu.prompt(("audio", int(n[0])), "and", ("audio", int(n[1])), "end"), **frames}
    _check(hf, model, inputs)


# -- bfloat16: the arithmetic of the reference in its dtypes ------------------------------------------------------
# The published 12B is bfloat16. The reference casts raw float32 pixels to the patch projection's dtype and audio
# frames to the audio projection's, so both embedders run in bfloat16; its LayerNorms compute in float32 and round
# once. Same steps here give the same bfloat16 numbers: image and video soft tokens are bit-equal; an audio row can
# be one unit in the last place off where the float32 RMSNorm of a frame (sums of squares added in another order)
# rounds to the other bfloat16 neighbour, which the projection then spreads over that row (measured: 1 % of
# values). Running a path in float32 instead leaves about half of the values off by a unit or more.
BF16_EQUAL = 0.97


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("unified_bf16")
    hf = tu.make_model(seed=5).to(torch.bfloat16)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


@pytest.fixture(scope="module")
def bf16_pair(bf16_path):
    hf, path = bf16_path
    model = load_model(path)
    assert model.embed_audio.embedding_projection.weight.dtype == mx.bfloat16
    return hf, model


def _assert_bf16_soft_tokens(ours: mx.array, ref: torch.Tensor) -> None:
    """Our soft tokens are bfloat16 and equal the reference's, up to rounding at the scale of each row."""
    assert ours.dtype == mx.bfloat16
    o, r = np.array(ours.astype(mx.float32)), ref.float().numpy()
    assert o.shape == r.shape
    assert (o == r).mean() >= BF16_EQUAL, f"only {(o == r).mean():.1%} of values equal the reference's"
    row_ulp = 2.0 ** (np.floor(np.log2(np.abs(r).max(axis=-1, keepdims=True))) - 7)   # bfloat16: 8-bit mantissa
    assert (np.abs(o - r) <= row_ulp).all()


def _ref_audio(hf, frames: dict) -> torch.Tensor:
    mask = torch.from_numpy(frames["input_features_mask"]).bool()
    with torch.no_grad():
        out = hf.model.get_audio_features(torch.from_numpy(frames["input_features"]), mask)
    return out.pooler_output[mask]                                               # what the merge keeps


@pytest.mark.parametrize("seconds", [[0.3], [0.2, 1.1]])
def test_bfloat16_audio_soft_tokens_equal_the_reference(bf16_pair, seconds):
    hf, model = bf16_pair
    frames = tu.waveform_frames(seconds, seed=len(seconds))
    ours = model._encode_audio(mx.array(frames["input_features"]), mx.array(frames["input_features_mask"]))
    _assert_bf16_soft_tokens(ours, _ref_audio(hf, frames))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_bfloat16_image_and_video_soft_tokens_equal_the_reference(bf16_pair, kind):
    hf, model = bf16_pair
    grids = [(2, 3), (1, 4)] if kind == "image" else [(2, 2)] * 3
    pixels, positions = tu.patches(grids, seed=6)
    px, pos = torch.from_numpy(pixels), torch.from_numpy(positions).long()
    with torch.no_grad():
        if kind == "image":
            ref = hf.model.get_image_features(px, pos).pooler_output
        else:
            ref = hf.model.get_video_features(px, pos, num_frames_per_video=torch.tensor([len(grids)])).pooler_output
    _assert_bf16_soft_tokens(model._encode_images(pixels, positions), torch.cat(ref))


def test_quantized_embedders_compute_in_the_dtype_of_their_scales(bf16_path):
    """A checkpoint whose embedders are quantized (convert.py keeps them in float; other converters may not):
    the inputs are cast to the scales' dtype, as the reference casts them to its weights'."""
    import mlx.nn as nn

    _, path = bf16_path
    model = load_model(path)
    names = ("vision_embedder.patch_dense", "embed_vision.embedding_projection", "embed_audio.embedding_projection")
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: p in names)
    assert model.embed_audio.embedding_projection.scales.dtype == mx.bfloat16
    frames = tu.waveform_frames([0.3])
    x, mask = mx.array(frames["input_features"]), frames["input_features_mask"]
    soft = model._encode_audio(x, mx.array(mask))
    expected = model.embed_audio(x.astype(mx.bfloat16))[0, : int(mask.sum())]          # (valid frames, hidden)
    assert soft.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(soft.astype(mx.float32)), np.array(expected.astype(mx.float32)))
    pixels, positions = tu.patches([(2, 2)])
    assert model._encode_images(pixels, positions).dtype == mx.bfloat16


def test_text_only_form(tmp_path):
    hf = tu.make_text_model(seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    assert model.config.model_type == "gemma4_unified_text" and not model.config.takes_images
    ids = tu.prompt("a b c d e f g h i j k l m n o p q r")
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids))), ref, atol=MODEL_ATOL, rtol=0)


def test_chunked_and_token_by_token_decoding_match_full_forward(pair):
    hf, model = pair
    inputs = _images([(3, 4), (1, 3)], "a b c", "d e", "f g h i j k l m n o", seed=4)
    full = np.array(model(**_mx(inputs)))
    L = inputs["input_ids"].shape[1]
    ids = mx.array(inputs["input_ids"])
    tail = 6   # the last text tokens go one at a time
    for chunk in (3, 8, 64):
        cache = model.make_cache()
        ends = []
        last = model.prefill(_mx(inputs) | {"input_ids": ids[:, : L - tail]}, cache, chunk_size=chunk,
                             progress=lambda done, total: ends.append(done))
        np.testing.assert_allclose(np.array(last), full[0, L - tail - 1], atol=MODEL_ATOL, rtol=0)
        is_image = inputs["input_ids"][0] == model.config.image_token_id
        assert not any(is_image[e - 1] and is_image[e] for e in ends[1:])   # no chunk splits an image
        for t in range(L - tail, L):
            step = np.array(model.step(ids[:, t : t + 1], cache))[0, 0]
            np.testing.assert_allclose(step, full[0, t], atol=MODEL_ATOL, rtol=0)


def test_greedy_generation_equals_transformers(pair):
    hf, model = pair
    inputs = _images([(2, 3)], "look at", "and tell me", seed=5)
    ours = [int(t) for t, _ in generate_step(model, _mx(inputs), max_tokens=12, prefill_chunk=4)]
    kw = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in inputs.items()}
    kw["mm_token_type_ids"] = torch.from_numpy(tu.token_types(inputs["input_ids"]).astype(np.int64))
    with torch.no_grad():
        ref = hf.generate(**kw, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_bad_media_inputs_are_input_errors(pair):
    _, model = pair
    good = _images([(2, 2)], "x", "y")
    with pytest.raises(InputError, match="6912"):
        model(**_mx(good | {"pixel_values": good["pixel_values"][..., :768]}))
    with pytest.raises(InputError, match="position ids"):
        model(**_mx(good | {"image_position_ids": good["image_position_ids"][:, :2]}))
    audio = _audio(0.3)
    with pytest.raises(InputError, match="input_features_mask"):
        model(**_mx({k: v for k, v in audio.items() if k != "input_features_mask"}))
    with pytest.raises(InputError, match="soft tokens"):
        model(**_mx(audio | {"input_ids": tu.prompt(("audio", 3))}))


def test_text_only_checkpoint_refuses_media(tmp_path):
    hf = tu.make_model(vision=None, audio=None)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    assert not model.config.takes_images and not model.config.takes_audio
    pixels, positions = tu.patches([(1, 2)])
    with pytest.raises(InputError, match="no vision"):
        model(mx.array(tu.prompt(("image", 2))), pixel_values=mx.array(pixels),
              image_position_ids=mx.array(positions))


def test_config_defaults_of_the_unified_text_config():
    """config.json leaves out values equal to the defaults; gemma4_unified's differ from gemma4's."""
    cfg = ModelConfig.from_dict({"model_type": "gemma4_unified", "text_config": {"num_hidden_layers": 6},
                                 "vision_config": {}, "audio_config": {}})
    t = cfg.text_config
    assert (t.sliding_window, t.max_position_embeddings, t.use_bidirectional_attention) == (1024, 262_144, "vision")
    assert t.vision_block_layers == "every" and cfg.vision_embedder_config.patch_dim == 6912
    assert cfg.audio_embedder_config.audio_embed_dim == 640 and cfg.vision_config is None
    g = ModelConfig.from_dict({"model_type": "gemma4", "text_config": {"num_hidden_layers": 6}}).text_config
    assert (g.sliding_window, g.use_bidirectional_attention, g.vision_block_layers) == (512, None, "sliding")


# -- conversion ---------------------------------------------------------------------------------------------------
def _put_on_grid(hf, bits: int, group_size: int, seed: int = 0) -> None:
    """Give every weight that the converter's recipe quantizes values that the quantizer represents exactly: per
    group of ``group_size``, a power-of-two step times integer codes spanning the whole range 0 .. 2**bits - 1,
    shifted so that 0 is a code (as MLX's affine quantizer places its grid). A quantized conversion must then give
    the float32 logits."""
    from mlx_gemma4.model import Gemma4
    from mlx_gemma4.quantize import plan, recipe

    cfg = ModelConfig.from_dict(hf.config.to_dict())
    quantized = plan(Gemma4(cfg), recipe(Gemma4(cfg), bits, group_size))
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.removeprefix("model.").removesuffix(".weight") not in quantized:
                continue
            groups = p.numel() // group_size
            codes = rng.integers(0, top + 1, (groups, group_size))
            codes[:, 0], codes[:, 1] = 0, top                       # each group spans the whole grid
            step = 2.0 ** rng.integers(-7, -4, (groups, 1))          # 1/128 .. 1/32
            p.copy_(torch.from_numpy((step * (codes - (top + 1) // 2)).astype(np.float32).reshape(p.shape)))


def test_4bit_conversion_of_grid_aligned_weights_equals_float32(tmp_path):
    from mlx_gemma4 import load
    from mlx_gemma4.conversion import convert
    from tests.fixtures_tokenizer import make_tokenizer

    hf = tu.make_model(seed=2)
    _put_on_grid(hf, 4, 32)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    make_tokenizer(tmp_path / "src")
    dst = convert(tmp_path / "src", tmp_path / "q4", q_bits=4, q_group_size=32, dtype="float32")
    model, _ = load(dst)
    o = model.language_model.layers[0].self_attn.o_proj
    assert getattr(o, "bits", None) == 4                       # the decoder is quantized ...
    assert "scales" not in model.vision_embedder.patch_dense   # ... the embedders stay in float (QUANTIZATION.md)
    assert "scales" not in model.embed_vision.embedding_projection
    assert "scales" not in model.embed_audio.embedding_projection
    inputs = _audio(0.5, image=(2, 3))
    ours = np.array(model(**_mx(inputs)))
    np.testing.assert_allclose(ours, tu.reference_logits(hf, inputs), atol=MODEL_ATOL, rtol=0)


def test_published_12b_config_parses_and_builds():
    """Our reading of google/gemma-4-12B-it's config.json (tests/random_checkpoint.py) gives a model whose
    parameters are exactly the checkpoint's tensors, by name and shape (nothing allocated: shapes only)."""
    from mlx.utils import tree_flatten

    from mlx_gemma4.model import Gemma4
    from mlx_gemma4.weights import check_names, map_name
    from tests import random_checkpoint as rc

    text, vision, audio = rc.SIZES["12b"]
    cfg = ModelConfig.from_dict(json.loads(json.dumps(rc.config_dict(text, vision, audio))))
    t = cfg.text_config
    assert cfg.unified and cfg.vision_config is None and cfg.audio_config is None
    assert (t.hidden_size, t.num_hidden_layers, t.sliding_window, t.first_kv_shared_layer) == (3840, 48, 1024, 48)
    assert t.layer_types.count("full_attention") == 8 and set(t.layer_head_dims) == {256, 512}
    assert set(t.layer_kv_heads) == {8, 1} and t.attention_k_eq_v and t.hidden_size_per_layer_input == 0
    model = Gemma4(cfg)
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    published = {map_name(k, cfg): s for k, s in rc.hf_shapes(text, vision, audio).items()}
    check_names(ours, published)
    assert ours["vision_embedder.patch_dense.weight"] == (3840, 6912)
    assert ours["vision_embedder.pos_embedding"] == (1120, 2, 3840)
    assert ours["embed_audio.embedding_projection.weight"] == (3840, 640)
    assert 11.9e9 < sum(np.prod(s) for s in ours.values()) < 12.1e9


def test_mlx_vlm_conversion_loads_with_its_logits_and_soft_tokens(tmp_path):
    """A 4-bit mlx-vlm conversion of a 12B-style checkpoint (what mlx-community repos hold) loads: the decoder's
    logits and the image and audio soft tokens are mlx-vlm's own."""
    pytest.importorskip("mlx_vlm")
    from mlx_vlm import convert as vlm_convert
    from mlx_vlm.utils import load_model as vlm_load_model

    from mlx_gemma4 import load
    from tests.fixtures_tokenizer import make_tokenizer

    src = tmp_path / "src"
    tu.make_model(seed=4).save_pretrained(src, safe_serialization=True)
    make_tokenizer(src)
    # mlx-vlm reads the published spelling of the config (global_head_dim), not save_pretrained's per_layer_config.
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].pop("per_layer_config")
    cfg["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "vlm4"
    vlm_convert(str(src), mlx_path=str(dst), quantize=True, q_bits=4, q_group_size=32, trust_remote_code=False)

    ours, _ = load(dst)
    theirs = vlm_load_model(dst)
    ids = mx.array(tu.prompt("a b c d e f g h i j k l m n"))
    out = theirs.language_model(ids)
    np.testing.assert_allclose(np.array(ours(ids)), np.array(getattr(out, "logits", out)), atol=1e-4, rtol=0)
    pixels, positions = (mx.array(a) for a in tu.patches([(2, 3), (1, 2)]))
    np.testing.assert_allclose(np.array(ours._encode_images(pixels, positions)),
                               np.array(theirs.get_image_features(pixels, positions)), atol=1e-4, rtol=0)
    frames = _mx(tu.waveform_frames([0.2, 0.5]))
    np.testing.assert_allclose(
        np.array(ours._encode_audio(frames["input_features"], frames["input_features_mask"])),
        np.array(theirs.get_audio_features(frames["input_features"], frames["input_features_mask"])),
        atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["gemma4", "gemma4_unified"])
def test_bidirectional_all_and_unknown_values_are_refused(model_type):
    """"all" (every token sees every other: an embedding model; the reference also halves the stored window) is not
    a chat model; any other value is a typo."""
    from mlx_gemma4.errors import ConfigError

    def parse(value):
        ModelConfig.from_dict({"model_type": model_type, "text_config": {"use_bidirectional_attention": value}})

    with pytest.raises(ConfigError, match="embedding model"):
        parse("all")
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        parse("images")
