from __future__ import annotations

import json

import pytest

from mlx_gemma4.config import ModelConfig, TextConfig
from mlx_gemma4.errors import ConfigError
from tests import tiny
from tests.random_checkpoint import E4B_TEXT


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


def test_an_empty_per_layer_config_overrides_no_layer():
    """Full layers as wide as the sliding ones: save_pretrained writes per_layer_config {} and no global_head_dim;
    the reference reads every layer at head_dim (the 512 default applies only when per_layer_config is absent)."""
    hf = tiny.make_model("e", head_dim=32, global_head_dim=32)
    saved = hf.config.to_dict()
    assert saved["text_config"]["per_layer_config"] == {} and saved["text_config"].get("global_head_dim") is None
    ref = [layer.self_attn.q_proj.out_features // 4 for layer in hf.model.language_model.layers]
    assert ModelConfig.from_dict(saved).text_config.layer_head_dims == ref == [32] * 7


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
    cfg = ModelConfig.from_dict(dict(E4B_TEXT, model_type="gemma4_text", some_future_key=1))
    assert cfg.vision_config is None and cfg.text_config.hidden_size == 2560


@pytest.mark.parametrize("bad", [{"model_type": "llama"}, {"model_type": "gemma3"}, {}])
def test_non_gemma4_config_is_rejected(bad):
    with pytest.raises(ConfigError, match="Gemma 4"):
        ModelConfig.from_dict(bad)


@pytest.mark.parametrize("model_type", ["gemma4_assistant", "gemma4_unified_assistant"])
def test_an_assistant_config_points_to_load_assistant(model_type):
    with pytest.raises(ConfigError, match="assistant drafter.*load_assistant") as e:
        ModelConfig.from_dict({"model_type": model_type, "text_config": {}})
    assert "gemma4-chat --model MODEL --assistant DIR" in str(e.value)   # advice for the app's users too


@pytest.mark.parametrize("method", ["bitsandbytes", "fp8", "compressed-tensors"])
def test_a_transformers_quantization_is_named(method):
    """Their packed weights were reported as names and shapes that do not match the config."""
    cfg = tiny.make_config("dense").to_dict()
    with pytest.raises(ConfigError, match=f"quantized with '{method}'.*unquantized checkpoint"):
        ModelConfig.from_dict({**cfg, "quantization_config": {"quant_method": method}})
    mlx_lm_spelling = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert ModelConfig.from_dict({**cfg, "quantization_config": mlx_lm_spelling}).quantization == mlx_lm_spelling


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="No config.json.*Pass the folder that convert.py wrote"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="Cannot read"):
        ModelConfig.from_file(tmp_path)


# Every whole-number / boolean / number field of every config section, with values of the wrong type or range.
_BAD = {int: [0, -1, "8", 1.5, True, None, [4], 2**40], bool: ["yes", 1, None], float: ["x", None, True, float("nan")],
        str: [3, None], "list[int]": ["8", [0, 4], [-1, 4], None, [4.5, 4]]}


def _bad_cases():
    import dataclasses
    import typing

    from mlx_gemma4.config import AudioConfig, VisionConfig

    for section, cls in (("text_config", TextConfig), ("vision_config", VisionConfig),
                         ("audio_config", AudioConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = hints[f.name]
            kind = "list[int]" if tp == list[int] else tp
            for value in _BAD.get(kind, []):
                if value == 0 and (f.name.endswith("_id") or f.name in ("hidden_size_per_layer_input",
                                   "num_kv_shared_layers", "attention_context_left", "attention_context_right")):
                    continue
                yield section, f.name, value
        for f in ("global_head_dim", "num_global_key_value_heads", "num_experts", "sliding_window_pattern",
                  "final_logit_softcapping"):
            if section == "text_config":
                yield section, f, "x"   # optional fields: null is fine, a string is not


def _full_config() -> dict:
    return tiny.make_config("e", vision=tiny.VISION, audio=tiny.AUDIO).to_dict()


@pytest.mark.parametrize("section,name,value", list(_bad_cases()))
def test_every_malformed_field_is_a_config_error_naming_it(section, name, value):
    d = _full_config()
    d[section][name] = value
    with pytest.raises(ConfigError, match=f"{section}.{name}"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("value", [None, [], [1, 2], "text", 3])
def test_text_config_must_be_an_object(value):
    d = _full_config()
    d["text_config"] = value
    with pytest.raises(ConfigError, match="text_config is .*; it must be a JSON object"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("key", ["vision_config", "audio_config"])
def test_tower_config_must_be_an_object_or_null(key):
    d = _full_config()
    d[key] = [1]
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(d)
    d[key] = None
    assert getattr(ModelConfig.from_dict(d), key) is None


@pytest.mark.parametrize("change,field", [
    (dict(num_attention_heads=3), "num_attention_heads"),                      # 3 heads, 2 KV heads
    (dict(head_dim=15), "head_dim"),
    (dict(per_layer_config={"0": {"head_dim": -4}}), "per_layer_config"),
    (dict(per_layer_config={"99": {"head_dim": 16}}), "per_layer_config"),
    (dict(per_layer_config=[1]), "per_layer_config"),
    (dict(rope_parameters={"full_attention": {"rope_theta": -1}}), "rope_theta"),
    (dict(rope_parameters={"sliding_attention": "fast"}), "sliding_attention"),
    (dict(layer_types=["sliding_attention"] * 6 + [3]), "layer_types"),
    (dict(eos_token_id=[1, "2"]), "eos_token_id"),
])
def test_inconsistent_text_sizes(change, field):
    d = _full_config()
    d["text_config"].update(change)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(d)


def test_gemma4_text_config_names_fields_at_the_top_level():
    with pytest.raises(ConfigError, match=r"config.json: num_attention_heads is 0"):
        ModelConfig.from_dict(dict(E4B_TEXT, model_type="gemma4_text", num_attention_heads=0))


def test_convert_and_load_report_malformed_config(tmp_path):
    """Through the public entry points: ConfigError naming the field, no conversion written."""
    from mlx_gemma4 import load
    from mlx_gemma4.conversion import convert

    src = tiny.save_checkpoint(tiny.make_model("dense"), tmp_path / "src")
    d = json.loads((src / "config.json").read_text())
    d["text_config"]["num_attention_heads"] = 0
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="text_config.num_attention_heads is 0"):
        convert(src, tmp_path / "out")
    with pytest.raises(ConfigError, match="text_config.num_attention_heads is 0"):
        load(src)
    assert not (tmp_path / "out").exists()
