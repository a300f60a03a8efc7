"""Text decoder parity with transformers' gemma4 (the reference) on tiny random checkpoints of each family.

Tolerance: both sides run in float32 with the same weights; the only differences are summation order inside
matmuls / attention and MLX's fused rms_norm / rope kernels. Observed max |diff| is ~1e-5 on logits of size ~2,
so 1e-4 absolute is tight (any wrong formula moves logits by 1e-2 or more) yet stable across BLAS builds.
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.cache import rewind
from mlx_gemma4.config import ModelConfig
from mlx_gemma4.model import Gemma4
from mlx_gemma4.weights import load_into, sanitize
from tests import tiny
from tests.helpers import TEXT_ATOL, build, ids_of

FAMILIES = ["e", "dense", "moe"]


@pytest.fixture(params=FAMILIES)
def pair(request, text_pair):
    return text_pair(request.param)


def reference(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids).logits.numpy()


def test_full_forward_matches_reference(pair):
    hf, model = pair
    ids = ids_of(45)  # crosses the window of 8 several times
    ref = reference(hf, ids)
    out = np.array(model(mx.array(ids.numpy().astype(np.int32))))
    assert out.shape == ref.shape == (1, 45, tiny.VOCAB)
    np.testing.assert_allclose(out, ref, atol=TEXT_ATOL, rtol=0)


def test_token_by_token_decoding_matches_full_forward(pair):
    hf, model = pair
    ids = mx.array(ids_of(30, seed=1).numpy().astype(np.int32))
    full = np.array(model(ids))
    cache = model.make_cache()
    steps = [model(ids[:, :3], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(3, 30)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), full, atol=TEXT_ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [3, 8, 13])  # smaller than, equal to and larger than the window (8)
def test_chunked_prefill_matches_full_forward(pair, chunk):
    hf, model = pair
    ids = mx.array(ids_of(41, seed=2).numpy().astype(np.int32))
    full = np.array(model(ids))
    cache = model.make_cache()
    outs = [model(ids[:, s : s + chunk], cache=cache) for s in range(0, 41, chunk)]
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), full, atol=TEXT_ATOL, rtol=0)
    # And decoding after a chunked prefill continues exactly.
    nxt = mx.array([[7]], dtype=mx.int32)
    ref = np.array(model(mx.concatenate([ids, nxt], axis=1)))[:, -1]
    np.testing.assert_allclose(np.array(model(nxt, cache=cache))[:, -1], ref, atol=TEXT_ATOL, rtol=0)


def test_rewind_then_continue_matches_fresh_forward(pair):
    """Take back tokens after the ring has wrapped, feed different ones: the same logits as a fresh forward."""
    hf, model = pair
    ids = mx.array(ids_of(30, seed=3).numpy().astype(np.int32))
    other = mx.array(ids_of(6, seed=4).numpy().astype(np.int32))
    cache = model.make_cache(max_rewind=5)
    model(ids[:, :20], cache=cache)
    for t in range(20, 30):
        model(ids[:, t : t + 1], cache=cache)
    rewind(cache, 5)  # keep 25 tokens
    got = [model(other[:, :3], cache=cache)]
    rewind(cache, 2)  # keep 26 tokens: 25 + other[0]
    got += [model(other[:, t : t + 1], cache=cache) for t in range(1, 6)]
    full = np.array(model(mx.concatenate([ids[:, :25], other], axis=1)))
    np.testing.assert_allclose(np.array(got[0]), full[:, 25:28], atol=TEXT_ATOL, rtol=0)
    np.testing.assert_allclose(np.array(mx.concatenate(got[1:], axis=1)), full[:, 26:], atol=TEXT_ATOL, rtol=0)


def test_e_family_exercises_sharing_and_wide_mlp():
    cfg = ModelConfig.from_dict(tiny.make_config("e").to_dict()).text_config
    # The shared layers include both a sliding and a full one, each reading its own type's producer.
    shared = range(cfg.first_kv_shared_layer, cfg.num_hidden_layers)
    assert {cfg.layer_types[i] for i in shared} == {"sliding_attention", "full_attention"}
    for i in shared:
        p = cfg.kv_producers[i]
        assert p < cfg.first_kv_shared_layer and cfg.layer_types[p] == cfg.layer_types[i]
    model = Gemma4(ModelConfig.from_dict(tiny.make_config("e").to_dict()))
    assert model.layers[-1].mlp.gate_proj.weight.shape[0] == 2 * cfg.intermediate_size
    assert not hasattr(model.layers[-1].self_attn, "k_proj")


def test_softcapping_bounds_logits():
    hf, model = build("dense", final_logit_softcapping=0.5)
    out = np.array(model(mx.array(ids_of(10).numpy().astype(np.int32))))
    assert np.abs(out).max() <= 0.5 + 1e-6
    np.testing.assert_allclose(out, reference(hf, ids_of(10)), atol=TEXT_ATOL, rtol=0)


def test_untied_head():
    from transformers import Gemma4ForConditionalGeneration

    config = tiny.make_config("dense")
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    config._attn_implementation = "eager"
    hf = Gemma4ForConditionalGeneration(config).float().eval()
    tiny.randomize(hf, 1)
    assert not torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = Gemma4(cfg)
    load_into(model, sanitize({k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}, cfg, model))
    ids = ids_of(12)
    np.testing.assert_allclose(np.array(model(mx.array(ids.numpy().astype(np.int32)))), reference(hf, ids),
                               atol=TEXT_ATOL, rtol=0)


@pytest.mark.parametrize("family", ["e", "dense"])
def test_fused_projections_give_identical_logits(checkpoint_factory, tmp_path, family):
    """q/k/v (q/k where K = V) and gate/up are joined into one matmul each after loading; the logits are the same
    numbers as with separate projections, unquantized and quantized, prefill and cached decoding."""
    from mlx_gemma4.conversion import convert
    from mlx_gemma4.weights import load_model

    ids = mx.array(np.random.default_rng(1).integers(5, 250, size=(1, 24)), dtype=mx.int32)
    _, src = checkpoint_factory(family)
    for bits in (None, 8):
        dst = convert(src, tmp_path / f"q{bits}", q_bits=bits, q_group_size=32, dtype="float32") if bits else src
        fused, plain = load_model(dst), load_model(dst, fuse=False)
        for layer in fused.layers:
            attn = layer.self_attn
            assert "gate_up_proj" in layer.mlp and "gate_proj" not in layer.mlp
            assert ("qkv_proj" in attn) != attn.is_shared and "k_proj" not in attn
        assert all("qkv_proj" not in layer.self_attn for layer in plain.layers)
        np.testing.assert_array_equal(np.array(fused(ids)), np.array(plain(ids)))
        outs = []
        for model in (fused, plain):
            cache = model.make_cache()
            model(ids[:, :20], cache=cache)
            outs.append([np.array(model.step(ids[:, i:i + 1], cache)) for i in range(20, 24)])
        np.testing.assert_array_equal(np.array(outs[0]), np.array(outs[1]))
