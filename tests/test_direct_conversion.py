"""benchmarks/direct.py (e2e --direct) against the path it stands in for: the checkpoint written to disk, then
convert.py and mlx_lm.convert. Generated weights must give the same files (ours) and the same logits (mlx-lm)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from benchmarks import direct
from mlx_gemma4.conversion import convert
from mlx_gemma4.destination import MARKER
from tests import random_checkpoint as rc

# A26B's layout, tiny: MoE beside the dense MLP, k_eq_v global layer; every quantized input dim a multiple of 64.
TINY_MOE = dict(
    rc.A26B_SMALL_TEXT, vocab_size=512, hidden_size=128, num_hidden_layers=2, intermediate_size=128,
    num_attention_heads=2, num_key_value_heads=1, num_global_key_value_heads=1, head_dim=32, global_head_dim=64,
    num_experts=8, top_k_experts=2, moe_intermediate_size=64, sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
)
IDS = mx.array(np.random.default_rng(0).integers(5, 500, size=(1, 12)), dtype=mx.int32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(the HF checkpoint written to disk, its settings alone, the generated tensors that stand in for its weights)."""
    hf = rc.write(tmp_path_factory.mktemp("hf"), TINY_MOE, "bfloat16", tokenizer=True, repeat_noise=True)
    settings = rc.write_settings(tmp_path_factory.mktemp("settings"), TINY_MOE, "bfloat16", tokenizer=True)
    assert not list(settings.glob("*.safetensors"))
    return hf, settings, rc.generated_tensors(TINY_MOE, "bfloat16")


def test_generated_tensors_are_the_written_ones(folders):
    hf, _, tensors = folders
    written = mx.load(str(hf / "model.safetensors"))
    assert sorted(written) == sorted(tensors)
    for name, t in tensors.items():
        assert written[name].dtype == t.mlx_dtype and written[name].shape == t.shape, name
        assert mx.array_equal(written[name], t.array()), name
        assert mx.array_equal(written[name], mx.concatenate(list(t.chunks(3)))), name


def test_ours_writes_what_convert_py_writes(folders, tmp_path):
    hf, settings, tensors = folders
    ref = convert(hf, tmp_path / "converted", q_bits=4)
    got = direct.write_ours(settings, tensors, tmp_path / "direct", 4, 64)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        if p.suffix == ".safetensors":
            a, b = mx.load(str(p)), mx.load(str(got / p.name))
            assert sorted(a) == sorted(b), p.name
            for k in a:
                assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]), k
        elif p.name == MARKER:   # names the folder it came from
            assert {**json.loads(p.read_text()), "source": ""} == {**json.loads((got / MARKER).read_text()),
                                                                   "source": ""}
        else:
            assert p.read_bytes() == (got / p.name).read_bytes(), p.name


def test_mlx_lm_output_loads_as_mlx_lm_convert_output(folders, tmp_path):
    import mlx_lm
    from mlx_lm.convert import convert as mlx_lm_convert

    hf, settings, tensors = folders
    mlx_lm_convert(str(hf), str(tmp_path / "converted"), quantize=True, q_bits=4, q_group_size=64)
    direct.write_mlx_lm(settings, tensors, tmp_path / "direct", 4, 64)
    (ref, _), (got, _) = mlx_lm.load(str(tmp_path / "converted")), mlx_lm.load(str(tmp_path / "direct"))
    assert json.loads((tmp_path / "direct" / "config.json").read_text()) == \
        json.loads((tmp_path / "converted" / "config.json").read_text())
    a, b = ref(IDS), got(IDS)
    assert mx.array_equal(a, b), float(mx.abs(a - b).max())
