from __future__ import annotations

import json

import pytest

from mlx_gemma4.config import ModelConfig, TextConfig
from mlx_gemma4.errors import ConfigError
from tests import tiny

# The published E4B text config (the spelling of the released checkpoints: global_head_dim, no per_layer_config).
E4B_TEXT = dict(
    model_type="gemma4_text", hidden_size=2560, num_hidden_layers=42, intermediate_size=10240,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512, sliding_window=512,
    num_kv_shared_layers=18, hidden_size_per_layer_input=256, vocab_size=262144, vocab_size_per_layer_input=262144,
    use_double_wide_mlp=True, final_logit_softcapping=30.0,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
)


def test_published_and_save_pretrained_spellings_agree():
    hf = tiny.make_config("dense")
    saved = hf.to_dict()                       # per_layer_config spelling
    assert "per_layer_config" in saved["text_config"]
    published = json.loads(json.dumps(saved))
    del published["text_config"]["per_layer_config"]
    published["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    a = ModelConfig.from_dict(saved).text_config
    b = ModelConfig.from_dict(published).text_config
    assert a.layer_head_dims == b.layer_head_dims == [16, 32, 16, 32]
    assert a.layer_kv_heads == b.layer_kv_heads == [2, 1, 2, 1]


def test_global_kv_heads_only_with_k_eq_v():
    d = dict(E4B_TEXT, num_global_key_value_heads=1)
    cfg = TextConfig.from_dict(d)  # attention_k_eq_v is off: full layers keep num_key_value_heads
    assert set(cfg.layer_kv_heads) == {2}
    assert cfg.layer_head_dims[5] == 512 and cfg.layer_head_dims[0] == 256


def test_e4b_sharing_layout():
    cfg = TextConfig.from_dict(E4B_TEXT)
    assert cfg.first_kv_shared_layer == 24
    assert cfg.kv_producers[24:] == [22 if t == "sliding_attention" else 23 for t in cfg.layer_types[24:]]


def test_text_only_config_and_unknown_keys():
    cfg = ModelConfig.from_dict(dict(E4B_TEXT, some_future_key=1))
    assert cfg.vision_config is None and cfg.text_config.hidden_size == 2560


@pytest.mark.parametrize("bad", [{"model_type": "llama"}, {"model_type": "gemma3"}, {}])
def test_non_gemma4_config_is_rejected(bad):
    with pytest.raises(ConfigError, match="Gemma 4"):
        ModelConfig.from_dict(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="No config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="Cannot read"):
        ModelConfig.from_file(tmp_path)
