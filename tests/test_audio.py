"""mlx_gemma4.audio against transformers' Gemma4AudioModel + Gemma4MultimodalEmbedder (tiny, random, float32;
one test in bfloat16).

Tolerance: ``atol=2e-5`` on outputs of magnitude ~1. Both sides compute in float32 but in a different order
(conv algorithms, matmul accumulation, softmax, rsqrt vs pow(-0.5)); observed differences are ~5e-7.
A wrong mask, relative shift, scale or clip changes outputs by > 1e-2, which the sensitivity tests check.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_gemma4.audio import AudioModel, MultimodalEmbedder, encode_audio
from mlx_gemma4.config import AudioConfig
from tests import tiny

ATOL = 2e-5


def build(audio: dict, seed: int = 0):
    """Random reference tower + embedder (norms, per_dim_scale and clip bounds randomized) and ours, loaded."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4MultimodalEmbedder

    cfg = tiny.make_config("e", audio=audio)
    cfg.audio_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = Gemma4AudioModel(cfg.audio_config).float().eval()
    ref_embed = Gemma4MultimodalEmbedder(cfg.audio_config, cfg.text_config).float().eval()
    tiny.randomize(ref, seed)
    tiny.randomize(ref_embed, seed + 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # tight, different bounds per linear so clipping really happens
        for name, b in ref.named_buffers():
            if name.endswith("_min"):
                b.fill_(-float(0.3 + torch.rand(1, generator=g)))
            elif name.endswith("_max"):
                b.fill_(float(0.3 + torch.rand(1, generator=g)))

    ours = AudioModel(AudioConfig.from_dict(cfg.audio_config.to_dict()))
    ac = ours.config
    embed = MultimodalEmbedder(ac.output_proj_dims or ac.hidden_size, cfg.text_config.hidden_size, ac.rms_norm_eps)
    state = {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()}
    ours.load_weights(list(ours.sanitize(state).items()), strict=True)
    embed.load_weights([(k, mx.array(v.numpy())) for k, v in ref_embed.state_dict().items()], strict=True)
    return ref, ref_embed, ours, embed


@pytest.fixture(scope="module")
def towers():
    return build(dict(tiny.AUDIO))


def run_ref(ref, ref_embed, x: np.ndarray, m: np.ndarray):
    with torch.no_grad():
        out = ref(torch.tensor(x), torch.tensor(m), return_dict=True)
        soft = ref_embed(out.last_hidden_state)[out.attention_mask]  # what get_audio_features + the merge keep
    return out.last_hidden_state.numpy(), out.attention_mask.numpy(), soft.numpy()


def features(frames: int, valid: int, mel: int, seed: int, garbage: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, frames, mel)).astype(np.float32)  # (1, T, mel)
    m = np.zeros((1, frames), bool)
    m[:, :valid] = True
    if not garbage:
        x = x * m[..., None]  # the feature extractor zeroes padded frames
    return x, m


# The reference sizes its input projection as (channels[0] // 4) * channels[1], so a tower takes
# 4 * (channels[0] // 4) mel bins (128 for the published checkpoints).
TINY_MEL = 4 * (tiny.AUDIO["subsampling_conv_channels"][0] // 4)


@pytest.mark.parametrize("frames, valid", [(37, 37), (40, 29), (61, 13), (9, 9), (5, 3), (100, 97)])
def test_tower_matches_reference(towers, frames, valid):
    ref, ref_embed, ours, embed = towers
    x, m = features(frames, valid, TINY_MEL, seed=frames + valid)
    h_ref, m_ref, soft_ref = run_ref(ref, ref_embed, x, m)
    h, m_ours = ours(mx.array(x), mx.array(m))
    np.testing.assert_array_equal(np.array(m_ours), m_ref)
    np.testing.assert_allclose(np.array(h), h_ref, rtol=0, atol=ATOL)  # padded positions too
    soft = encode_audio(ours, embed, mx.array(x), mx.array(m))
    assert soft.shape == soft_ref.shape == (int(m_ref.sum()), 64)
    np.testing.assert_allclose(np.array(soft), soft_ref, rtol=0, atol=ATOL)


def test_padding_is_masked(towers):
    """Garbage in padded frames changes nothing that is kept: same soft tokens as the reference and as the
    unpadded clip (the attention mask, the conv masks and the causal conv all have to be right)."""
    ref, ref_embed, ours, embed = towers
    x, m = features(64, 30, TINY_MEL, seed=7, garbage=True)
    _, _, soft_ref = run_ref(ref, ref_embed, x, m)
    soft = np.array(encode_audio(ours, embed, mx.array(x), mx.array(m)))
    np.testing.assert_allclose(soft, soft_ref, rtol=0, atol=ATOL)
    unpadded = np.array(encode_audio(ours, embed, mx.array(x[:, :30]), mx.array(m[:, :30])))
    np.testing.assert_allclose(soft, unpadded, rtol=0, atol=ATOL)


def test_batch_order_is_row_major(towers):
    ref, ref_embed, ours, embed = towers
    a, ma = features(40, 40, TINY_MEL, seed=1)
    b, mb = features(40, 17, TINY_MEL, seed=2)
    x, m = np.concatenate([a, b]), np.concatenate([ma, mb])
    _, _, soft_ref = run_ref(ref, ref_embed, x, m)
    soft = np.array(encode_audio(ours, embed, mx.array(x), mx.array(m)))
    np.testing.assert_allclose(soft, soft_ref, rtol=0, atol=ATOL)
    first = np.array(encode_audio(ours, embed, mx.array(a), mx.array(ma)))
    np.testing.assert_allclose(soft[: len(first)], first, rtol=0, atol=ATOL)


@pytest.mark.parametrize("what", ["clip bounds", "per_dim_scale", "norm weights"])
def test_randomized_parameters_matter(towers, what):
    """The parity test would notice if we ignored these: resetting them moves the output well beyond ATOL."""
    _, _, ours, _ = towers
    x, m = features(37, 37, TINY_MEL, seed=3)
    base = np.array(ours(mx.array(x), mx.array(m))[0])
    changed = AudioModel(ours.config)
    flat = dict(tree_flatten(ours.parameters()))
    for k, v in flat.items():
        if what == "clip bounds" and k.endswith(("_min", "_max")):
            flat[k] = mx.array(np.inf if k.endswith("_max") else -np.inf)
        elif what == "per_dim_scale" and k.endswith("per_dim_scale"):
            flat[k] = mx.zeros_like(v)
        elif what == "norm weights" and "norm" in k and k.endswith("weight"):
            flat[k] = mx.ones_like(v)
    changed.load_weights(list(flat.items()), strict=True)
    assert np.abs(np.array(changed(mx.array(x), mx.array(m))[0]) - base).max() > 100 * ATOL


def test_sanitize_is_idempotent_and_names_match_hf(towers):
    ref, _, ours, _ = towers
    hf = {f"model.audio_tower.{k}": mx.array(v.numpy()) for k, v in ref.state_dict().items()}
    once = ours.sanitize(hf)
    twice = ours.sanitize(once)
    assert once.keys() == twice.keys() == hf.keys()
    for k in once:
        assert once[k].shape == twice[k].shape and mx.array_equal(once[k], twice[k])
    c0, c1 = tiny.AUDIO["subsampling_conv_channels"]
    assert once["model.audio_tower.subsample_conv_projection.layer0.conv.weight"].shape == (c0, 3, 3, 1)
    assert once["model.audio_tower.subsample_conv_projection.layer1.conv.weight"].shape == (c1, 3, 3, c0)
    assert once["model.audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 5, 1)
    ours_names = {k for k, _ in tree_flatten(ours.parameters())}
    assert ours_names == {k.removeprefix("model.audio_tower.") for k in hf}
    for name in ("layers.0.self_attn.per_dim_scale", "layers.0.feed_forward1.ffw_layer_1.linear.weight",
                 "layers.0.feed_forward1.ffw_layer_1.input_min", "subsample_conv_projection.layer0.conv.weight"):
        assert name in ours_names


def test_end_to_end_from_waveform_with_128_mel_bins():
    """Real features from our extractor through a tower sized for 128 mel bins (first conv has 128 channels, as
    in the published checkpoints): the soft-token count equals the processor's placeholder count."""
    from mlx_gemma4.processing.audio import AudioFeatureExtractor

    ref, ref_embed, ours, embed = build(dict(tiny.AUDIO, subsampling_conv_channels=[128, 4]), seed=5)
    t = np.arange(int(1.3 * 16_000)) / 16_000
    clips = [(0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32),
             np.random.default_rng(0).standard_normal(7_000).astype(np.float32) * 0.1]
    fe = AudioFeatureExtractor()(clips)
    x, m = fe["input_features"], fe["input_features_mask"]
    _, m_ref, soft_ref = run_ref(ref, ref_embed, x, m)
    assert m_ref.sum(axis=1).tolist() == fe["num_soft_tokens_per_audio"]
    soft = np.array(encode_audio(ours, embed, mx.array(x), mx.array(m)))
    assert soft.shape[0] == sum(fe["num_soft_tokens_per_audio"])
    np.testing.assert_allclose(soft, soft_ref, rtol=0, atol=ATOL)


class _Recording:
    """The tower, recording how many rows each call gets."""

    def __init__(self, tower):
        self.tower, self.rows = tower, []

    def __call__(self, features, mask):
        self.rows.append(features.shape[0])
        return self.tower(features, mask)


def test_long_audio_goes_through_the_tower_in_bounded_batches(towers):
    ref, ref_embed, ours, embed = towers
    rows = [features(48, 48 - 5 * i, TINY_MEL, seed=10 + i) for i in range(7)]  # 7 segments of one recording
    x, m = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
    _, _, soft_ref = run_ref(ref, ref_embed, x, m)
    recording = _Recording(ours)
    soft = np.array(encode_audio(recording, embed, mx.array(x), mx.array(m), batch_size=3))
    assert recording.rows == [3, 3, 1]
    np.testing.assert_allclose(soft, soft_ref, rtol=0, atol=ATOL)
    recording.rows.clear()
    encode_audio(recording, embed, mx.array(x), mx.array(m))  # the default bound applies without asking
    assert max(recording.rows) < len(rows)


def test_peak_memory_of_the_tower_does_not_grow_with_the_recording(towers):
    _, _, ours, embed = towers

    def peak_and_output(segments: int) -> tuple[int, int]:
        x, m = features(400, 400, TINY_MEL, seed=3)
        x, m = mx.array(np.repeat(x, segments, 0)), mx.array(np.repeat(m, segments, 0))
        mx.eval(x, m)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = encode_audio(ours, embed, x, m, batch_size=2)
        mx.eval(out)
        return mx.get_peak_memory() - base, out.nbytes

    (short, short_out), (long, long_out) = peak_and_output(2), peak_and_output(16)
    # Only the soft tokens themselves may grow with the length; one batch of 16 segments costs ~12x more.
    assert long - short < 2 * (long_out - short_out), (short, long, long_out - short_out)


def test_bfloat16_tower_runs_in_bfloat16():
    """As the reference casts the float32 features to the first conv's dtype, a bfloat16 tower computes in
    bfloat16 (not in float32, which the features would otherwise promote every layer to) and stays within
    bfloat16 rounding of the reference's bfloat16 tower (a unit in the last place at 1 is 2**-7)."""
    ref, ref_embed, ours, embed = build(dict(tiny.AUDIO), seed=2)
    ref, ref_embed = ref.to(torch.bfloat16), ref_embed.to(torch.bfloat16)
    ours.set_dtype(mx.bfloat16)
    embed.set_dtype(mx.bfloat16)
    x, m = features(40, 29, TINY_MEL, seed=4)
    with torch.no_grad():
        out = ref(torch.tensor(x), torch.tensor(m), return_dict=True)
        soft_ref = ref_embed(out.last_hidden_state)[out.attention_mask].float().numpy()
    h, _ = ours(mx.array(x), mx.array(m))
    soft = encode_audio(ours, embed, mx.array(x), mx.array(m))
    assert h.dtype == soft.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(soft.astype(mx.float32)), soft_ref, rtol=0, atol=4 * 2.0**-7)
