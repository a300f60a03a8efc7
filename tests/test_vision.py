"""The MLX vision tower and embedder against transformers' Gemma4 vision tower (tiny random weights, float32)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_gemma4.config import VisionConfig
from mlx_gemma4.processing.image import ImageProcessor
from mlx_gemma4.vision import MultimodalEmbedder, VisionModel, encode_images

from tests.tiny import VISION, VISION_LARGE, make_model


class Holder(nn.Module):
    """The two attributes the multimodal model will own, so HF names load after dropping 'model.'."""

    def __init__(self, vision: VisionConfig, text_hidden: int):
        super().__init__()
        self.vision_tower = VisionModel(vision)
        self.embed_vision = MultimodalEmbedder(vision.hidden_size, text_hidden, vision.rms_norm_eps)


def _reference(vision: dict, family: str):
    model = make_model(family, vision=vision, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, b in model.named_buffers():
            # Clip bounds tight enough to bite (activations here are O(1)); std params non-trivial.
            if name.endswith(("input_min", "output_min")):
                b.fill_(-0.3 - float(torch.rand((), generator=g)))
            elif name.endswith(("input_max", "output_max")):
                b.fill_(0.3 + float(torch.rand((), generator=g)))
            elif name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def _load(model, vision: dict) -> Holder:
    holder = Holder(VisionConfig.from_dict(vision), model.config.text_config.hidden_size)
    weights = [(k.removeprefix("model."), mx.array(v.numpy())) for k, v in model.state_dict().items()
               if k.startswith(("model.vision_tower.", "model.embed_vision."))]
    holder.load_weights(weights, strict=True)  # raises on any missing / unexpected name or wrong shape
    return holder


def _inputs(budget: int = 70):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((120, 90), (50, 160))]
    return ImageProcessor()(images, max_soft_tokens=budget)


@pytest.mark.parametrize("vision,family", [(VISION, "e"), (VISION_LARGE, "dense")], ids=["small", "large"])
def test_tower_parity(vision, family):
    model = _reference(vision, family)
    holder = _load(model, vision)
    inputs = _inputs()
    pv = torch.from_numpy(inputs["pixel_values"])
    pos = torch.from_numpy(inputs["image_position_ids"])
    with torch.no_grad():
        ref_tower = model.model.vision_tower(pixel_values=pv, pixel_position_ids=pos).last_hidden_state
        ref_split = model.model.get_image_features(pv, pos).pooler_output
    ref = torch.cat(list(ref_split)).numpy()
    assert [len(s) for s in ref_split] == inputs["num_soft_tokens_per_image"]

    tower = holder.vision_tower(mx.array(inputs["pixel_values"]), inputs["image_position_ids"])
    got = encode_images(holder.vision_tower, holder.embed_vision, inputs["pixel_values"], inputs["image_position_ids"])
    assert tower.shape == tuple(ref_tower.shape)
    assert got.shape == ref.shape == (sum(inputs["num_soft_tokens_per_image"]), 64)
    # float32 on both sides; the only differences are summation order (matmuls, softmax, pooling) through
    # two layers, ~1e-6 relative. 1e-4 of the output scale leaves room for that and nothing else: a wrong
    # rope half, norm or clip changes outputs at the 1e-1 level.
    scale = float(np.abs(ref_tower.numpy()).max())
    np.testing.assert_allclose(np.array(tower), ref_tower.numpy(), atol=1e-4 * scale, rtol=0)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(np.array(got), ref, atol=1e-4 * scale, rtol=0)


def test_clipping_and_standardize_matter():
    """Guards the parity test above: the large config's clip bounds and std params change the output."""
    model = _reference(VISION_LARGE, "dense")
    holder = _load(model, VISION_LARGE)
    inputs = _inputs()
    base = np.array(holder.vision_tower(mx.array(inputs["pixel_values"]), inputs["image_position_ids"]))
    holder.vision_tower.std_bias = mx.zeros_like(holder.vision_tower.std_bias)
    no_std = np.array(holder.vision_tower(mx.array(inputs["pixel_values"]), inputs["image_position_ids"]))
    assert np.abs(base - no_std).max() > 1e-2
    q = holder.vision_tower.encoder.layers[0].self_attn.q_proj
    q.output_max = mx.array(np.inf, dtype=mx.float32)
    q.output_min = mx.array(-np.inf, dtype=mx.float32)
    unclipped = np.array(holder.vision_tower(mx.array(inputs["pixel_values"]), inputs["image_position_ids"]))
    assert np.abs(unclipped - no_std).max() > 1e-3


def test_single_image_and_padding_independence():
    """One image alone gives the same soft tokens as in a batch with a differently sized image."""
    model = _reference(VISION, "e")
    holder = _load(model, VISION)
    inputs = _inputs()
    n0 = inputs["num_soft_tokens_per_image"][0]
    both = encode_images(holder.vision_tower, holder.embed_vision, inputs["pixel_values"], inputs["image_position_ids"])
    first = encode_images(holder.vision_tower, holder.embed_vision, inputs["pixel_values"][:1],
                          inputs["image_position_ids"][:1])
    np.testing.assert_allclose(np.array(first), np.array(both[:n0]), atol=1e-5)
