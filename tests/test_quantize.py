"""quantize.py: the recipe's decisions, and that quantized loading equals fake-quantizing the float model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma4 import load
from mlx_gemma4.config import ModelConfig
from mlx_gemma4.conversion import convert
from mlx_gemma4.errors import ConfigError
from mlx_gemma4.model import Gemma4
from mlx_gemma4.quantize import PLE, plan, recipe
from tests.fixtures_tokenizer import make_tokenizer
from tests.tiny import TEXT_FAMILIES, make_model, save_checkpoint


def _model(family: str, **overrides) -> Gemma4:
    text_config = {**TEXT_FAMILIES[family], **overrides}
    return Gemma4(ModelConfig.from_dict({"model_type": "gemma4", "text_config": text_config}))


def test_recipe_keeps_router_and_sets_ple_bits():
    q = recipe(_model("moe", moe_intermediate_size=32), 4, 32)
    assert q["bits"] == 4 and q["group_size"] == 32
    routers = [k for k in q if ".router." in k]
    assert routers and all(q[k] is False for k in routers)
    d = plan(_model("moe", moe_intermediate_size=32), q)
    assert d["language_model.layers.0.experts.gate_up_proj"] == (4, 32)
    assert d["language_model.embed_tokens"] == (4, 32)

    e = _model("e", hidden_size_per_layer_input=32)
    assert plan(e, recipe(e, 4, 32))[PLE] == (8, 32)
    assert PLE not in plan(e, recipe(e, 4, 32, ple_bits=0))
    assert plan(e, recipe(e, 4, 32, ple_bits=4))[PLE] == (4, 32)


def test_recipe_leaves_small_side_layers_and_rejects_bulk_that_does_not_divide():
    e = _model("e")   # ple_dim 8: the per-layer projection (8 inputs) cannot be grouped by 32
    q = recipe(e, 4, 32)
    assert q["language_model.layers.0.per_layer_projection"] is False
    with pytest.raises(ConfigError, match="does not divide"):
        recipe(_model("dense"), 4, 128)     # hidden 64
    with pytest.raises(ConfigError):
        recipe(e, 7, 32)


def test_both_towers_encoder_layers_take_tower_bits():
    """The audio tower's layers (audio_tower.layers.N..., no level between) never matched the towers' pattern: the
    conformer stayed unquantized whatever --tower-bits said, and E2B/E4B outputs were larger than documented. The
    layers of both towers take the tower bits; their stems and projections into text space stay as they are."""
    from tests import tiny

    hf = tiny.make_model("e", vision=tiny.VISION, audio=tiny.AUDIO_128)
    model = Gemma4(ModelConfig.from_dict(hf.config.to_dict()))
    for tower_bits in (8, 4):
        d = plan(model, recipe(model, 4, 32, tower_bits=tower_bits))
        layers = {p: d.get(p) for p, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m
                  and p.startswith(("audio_tower.layers.", "vision_tower.encoder.layers."))}
        assert {p.split(".")[0] for p in layers} == {"audio_tower", "vision_tower"}
        assert set(layers.values()) == {(tower_bits, 32)}, layers
        assert "audio_tower.subsample_conv_projection.input_proj_linear" not in d
        assert "vision_tower.patch_embedder.input_proj" not in d
    assert not [p for p in plan(model, recipe(model, 4, 32, tower_bits=0)) if p.startswith(("audio", "vision"))]


def test_part_settings_for_parts_a_model_lacks_are_named():
    """--ple-bits on a model without a PLE table and --tower-bits on one without encoder layers change nothing:
    convert warns about them (idle_part_flags), and about nothing a model has or that was left at its default."""
    from mlx_gemma4.quantize import idle_part_flags
    from tests import tiny

    towers = Gemma4(ModelConfig.from_dict(tiny.make_model("e", vision=tiny.VISION).config.to_dict()))
    assert idle_part_flags(towers, 4, 0) == []
    assert idle_part_flags(_model("e"), 4, 8) == ["--tower-bits"]
    assert idle_part_flags(_model("dense"), 0, 4) == ["--ple-bits", "--tower-bits"]
    assert idle_part_flags(_model("dense"), None, None) == []

# Every quantizable input width a multiple of 128 (heads 4 x 32, PLE 7 x 128, experts 128 wide), so every group
# size applies everywhere.
WIDE = dict(hidden_size=128, intermediate_size=128, head_dim=32, global_head_dim=32, moe_intermediate_size=128)


@pytest.mark.parametrize("family,bits,group_size", [
    ("e", 4, 32), ("e", 8, 32), ("e", 2, 64), ("e", 3, 128), ("e", 5, 64), ("e", 6, 128),
    ("moe", 3, 64), ("moe", 5, 128), ("dense", 2, 128), ("dense", 6, 64)])
def test_quantized_load_equals_fake_quantized_float_model(tmp_path, family, bits, group_size):
    """Converter + loader introduce nothing beyond the rounding itself: same logits as quantize->dequantize."""
    overrides = dict(hidden_size_per_layer_input=32) if group_size == 32 else {
        **WIDE, **({"hidden_size_per_layer_input": 128} if family == "e" else {})}
    src = make_tokenizer(save_checkpoint(make_model(family, **overrides), tmp_path / "src"))
    ids = mx.array(np.random.default_rng(1).integers(5, 250, size=(1, 24)), dtype=mx.int32)
    qdst = convert(src, tmp_path / "q", q_bits=bits, q_group_size=group_size, dtype="float32")
    fdst = convert(src, tmp_path / "f", dtype="float32")
    quantized, _ = load(qdst)
    ref, _ = load(fdst, mapped_ple=False)
    params = dict(tree_flatten(ref.parameters()))
    import json

    decisions = plan(ref, json.loads((qdst / "config.json").read_text())["quantization"])
    ref.load_weights([
        (f"{p}.weight", mx.dequantize(*mx.quantize(params[f"{p}.weight"], group_size=g, bits=b), group_size=g, bits=b))
        for p, (b, g) in decisions.items()
    ], strict=False)
    np.testing.assert_allclose(np.array(quantized(ids)), np.array(ref(ids)), atol=1e-5, rtol=0)


def test_dtype_applies_to_scales(tmp_path):
    src = save_checkpoint(make_model("dense"), tmp_path / "src")
    dst = convert(src, tmp_path / "q", q_bits=4, q_group_size=32, dtype="float16")
    w = mx.load(str(dst / "model.safetensors"))
    assert w["language_model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    assert w["language_model.layers.0.input_layernorm.weight"].dtype == mx.float16
    assert w["language_model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32


@pytest.mark.parametrize("change", [dict(hidden_size=32), dict(intermediate_size=4096), dict(num_hidden_layers=8)])
def test_config_that_does_not_match_quantized_weights(tmp_path, change):
    """Sizes edited after a 4-bit conversion: a WeightsError naming the mismatch, not MLX's quantize error."""
    import json

    from mlx_gemma4.errors import WeightsError

    src = make_tokenizer(save_checkpoint(make_model("dense"), tmp_path / "src"))
    dst = convert(src, tmp_path / "q", q_bits=4, q_group_size=32, dtype="float32")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"].update(change, layer_types=None, per_layer_config=None)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="config.json"):
        load(dst)


def test_a_packed_weight_stored_in_another_integer_type_is_refused_at_load(tmp_path):
    """A quantized weight written as int32 (another tool, a damaged file) loaded, and the first forward failed in
    MLX ("[quantized_matmul] The weight matrix should be uint32")."""
    from mlx_gemma4.errors import WeightsError

    src = make_tokenizer(save_checkpoint(make_model("dense"), tmp_path / "src"))
    dst = convert(src, tmp_path / "q", q_bits=4, q_group_size=32, dtype="float32")
    weights = mx.load(str(dst / "model.safetensors"))
    name = "language_model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name].view(mx.int32)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(WeightsError, match=r"q_proj.weight is stored as mlx.core.int32 .* packed in uint32"):
        load(dst)
