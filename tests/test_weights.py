"""weights.load: converted dirs, raw HF dirs, hub ids (through a local cache, no network), mlx-vlm conversions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import load
from mlx_gemma4.conversion import convert
from mlx_gemma4.errors import ConfigError, WeightsError
from mlx_gemma4.hub import resolve
from tests.fixtures_tokenizer import make_tokenizer
from tests.tiny import VISION, make_model, save_checkpoint

IDS = np.random.default_rng(0).integers(5, 250, size=(1, 32))


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS, dtype=mx.int32)))


def _fake_hub_cache(cache: Path, repo: str, files: Path) -> None:
    """The layout huggingface_hub's cache uses: refs/main names a snapshot holding the files."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit)


def test_hub_id_resolves_through_the_cache_offline(tmp_path):
    src = make_tokenizer(save_checkpoint(make_model("dense"), tmp_path / "src"))
    dst = convert(src, tmp_path / "conv", dtype="float32")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-gemma4", dst)
    model, processor = load("someone/tiny-gemma4", cache_dir=tmp_path / "cache", local_files_only=True)
    ref, _ = load(dst)
    np.testing.assert_array_equal(_logits(model), _logits(ref))
    assert processor is not None
    with pytest.raises(WeightsError, match="not in the local hub cache"):
        resolve("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(ConfigError, match="neither a local directory"):
        resolve("not a repo id/../x")
    for typo in ("./typo-dir", "../typo", "..hidden/x", "owner/..x"):   # paths (HFValidationError from the hub)
        with pytest.raises(ConfigError, match="neither a local directory"):
            resolve(typo, cache_dir=tmp_path / "cache", local_files_only=True)


@pytest.mark.parametrize("env,said", [({}, "local_files_only"), ({"HF_HUB_OFFLINE": "0"}, "local_files_only"),
                                      ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                                      ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE is set")])
def test_a_repo_not_in_the_cache_names_the_offline_switch_only_when_it_is_set(tmp_path, monkeypatch, env, said):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(WeightsError) as e:
        resolve("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)
    assert said in str(e.value) and ("OFFLINE" in str(e.value)) == ("OFFLINE" in said), str(e.value)


def test_a_local_path_with_a_typo_is_named_as_missing_too(tmp_path, monkeypatch):
    """'models/x' reads as a hub repo id too; offline, the message only spoke of the hub cache."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=f"no folder {tmp_path / 'models' / 'typo'} either"):
        resolve("models/typo", cache_dir=tmp_path / "cache", local_files_only=True)


@pytest.mark.parametrize("src, said", [(None, "got NoneType"), (5, "got int"), ("", "path is empty"),
                                       ("  ", "path is empty")])
def test_a_source_that_is_not_a_path_is_named(src, said):
    """None or a number was a TypeError from pathlib; "" loaded the current folder ("No config.json at
    config.json")."""
    with pytest.raises(ConfigError, match=said):
        load(src)


@pytest.mark.parametrize("kw, said", [(dict(mapped_ple="yes"), "mapped_ple"), (dict(mapped_ple=1), "mapped_ple"),
                                      (dict(lazy="no"), "lazy"), (dict(progress=5), "progress"),
                                      (dict(mapped_pel=True), r"Unknown argument\(s\) \['mapped_pel'\]")])
def test_load_settings_are_checked_before_reading(tmp_path, kw, said):
    with pytest.raises(ConfigError, match=said):
        load(tmp_path / "not-even-there", **kw)


def test_load_eager_and_with_processor(tmp_path):
    src = save_checkpoint(make_model("e"), tmp_path / "src")
    make_tokenizer(src)
    dst = convert(src, tmp_path / "conv", dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (dst / name).exists(), name
    model, processor = load(dst, lazy=False)
    assert processor is not None
    ids = processor(text="hello world")["input_ids"]
    assert ids.dtype == mx.int32 and model(ids).shape[-1] == 400


def test_mlx_vlm_conversion_loads_with_same_logits(tmp_path):
    """A checkpoint converted by mlx-vlm (what the mlx-community repos hold), 4-bit, MoE and vision tower:
    our load() gives mlx-vlm's own logits."""
    pytest.importorskip("mlx_vlm")
    from mlx_vlm import convert as vlm_convert
    from mlx_vlm.utils import load_model as vlm_load_model

    src = save_checkpoint(make_model("moe", vision=VISION, moe_intermediate_size=32), tmp_path / "src")
    make_tokenizer(src)
    # mlx-vlm reads the published spelling of the config (global_head_dim), not save_pretrained's per_layer_config.
    cfg = json.loads((src / "config.json").read_text())
    text = cfg["text_config"]
    text.pop("per_layer_config")
    text.update(global_head_dim=32, num_global_key_value_heads=1)
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "vlm4"
    vlm_convert(str(src), mlx_path=str(dst), quantize=True, q_bits=4, q_group_size=32, trust_remote_code=False)

    ours, processor = load(dst)
    theirs = vlm_load_model(dst)
    out = theirs.language_model(mx.array(IDS, dtype=mx.int32))
    ref = np.array(getattr(out, "logits", out))
    # Same packed weights, same float32 math up to op order (measured 5e-6).
    np.testing.assert_allclose(_logits(ours), ref, atol=1e-4, rtol=0)
    assert processor is not None


def _published_spelling(src: Path) -> Path:
    """``src`` with config.json in the published spelling (global_head_dim, top-level vocab_size), as mlx-lm and
    mlx-vlm read it; returns ``src``."""
    cfg = json.loads((src / "config.json").read_text())
    text = cfg["text_config"]
    full = next(iter(text.pop("per_layer_config").values()))
    text["global_head_dim"] = full["head_dim"]
    if "num_key_value_heads" in full:
        text["num_global_key_value_heads"] = full["num_key_value_heads"]
    cfg["vocab_size"] = text["vocab_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_mlx_lm_conversion_of_a_model_with_towers_loads_as_text_only(tmp_path):
    """mlx-lm keeps only the text model (here with its mixed 3/6-bit recipe: per-module bits) but copies the
    audio section of config.json: that is a text-only model, read with mlx-lm's own logits."""
    pytest.importorskip("mlx_lm")
    from mlx_lm import convert as lm_convert
    from mlx_lm import load as lm_load

    from tests.tiny import AUDIO

    src = make_tokenizer(save_checkpoint(make_model("e", vision=VISION, audio=AUDIO, hidden_size_per_layer_input=32),
                                         tmp_path / "src"))
    dst = tmp_path / "lm"
    lm_convert(str(_published_spelling(src)), mlx_path=str(dst), quantize=True, q_group_size=32,
               quant_predicate="mixed_3_6", dtype="float32")
    assert "audio_config" in json.loads((dst / "config.json").read_text())

    ours, processor = load(dst)
    assert not ours.config.takes_audio and not ours.config.takes_images and processor is not None
    theirs, _ = lm_load(str(dst))
    # Same packed weights, same float32 math up to op order.
    np.testing.assert_allclose(_logits(ours), np.array(theirs(mx.array(IDS, dtype=mx.int32))), atol=1e-4, rtol=0)


def test_mlx_lm_unquantized_text_only_conversion_converts_again(tmp_path):
    """convert.py on mlx-lm's unquantized output: the text model, as the converter's own output of the source."""
    pytest.importorskip("mlx_lm")
    from mlx_lm import convert as lm_convert

    from tests.tiny import AUDIO

    src = make_tokenizer(save_checkpoint(make_model("e", audio=AUDIO, hidden_size_per_layer_input=32),
                                         tmp_path / "src"))
    lm_convert(str(_published_spelling(src)), mlx_path=str(tmp_path / "lm"), dtype="float32")
    ours, _ = load(convert(tmp_path / "lm", tmp_path / "q4", q_bits=4, q_group_size=32, dtype="float32"))
    direct, _ = load(convert(src, tmp_path / "direct", q_bits=4, q_group_size=32, dtype="float32"))
    assert not ours.config.takes_audio
    np.testing.assert_array_equal(_logits(ours), _logits(direct))


def test_missing_and_corrupt_files(tmp_path):
    src = save_checkpoint(make_model("dense"), tmp_path / "src")
    dst = convert(src, tmp_path / "conv", dtype="float32")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    (dst / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing shard"):
        load(dst)
    assert index["weight_map"]
    with pytest.raises(ConfigError, match="neither a local directory"):
        load(tmp_path / "src" / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load(tmp_path / "empty")


def test_sharded_checkpoint_with_and_without_its_index(tmp_path):
    """Shards load with or without the index; without it, a missing shard is named from the shards' numbering
    (it was reported as the missing tensors that happened to live in it)."""
    hf = make_model("dense")
    src = save_checkpoint(hf, tmp_path / "src")
    ref, _ = load(make_tokenizer(src))
    sharded = make_tokenizer(tmp_path / "sharded")
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    np.testing.assert_array_equal(_logits(load(sharded)[0]), _logits(ref))
    (sharded / "model.safetensors.index.json").unlink()
    np.testing.assert_array_equal(_logits(load(sharded)[0]), _logits(ref))
    shards[1].unlink()
    with pytest.raises(WeightsError, match=f"missing shard.*{shards[1].name} .and has no model.safetensors.index"):
        load(sharded)


def test_mismatched_weights_are_listed(tmp_path):
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.model import Gemma4
    from mlx_gemma4.weights import load_into, sanitize

    hf = make_model("dense")
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    weights = sanitize({k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}, cfg)
    weights.pop("language_model.layers.0.mlp.up_proj.weight")
    weights["language_model.layers.0.extra.weight"] = mx.zeros((2,))
    weights["language_model.layers.1.mlp.down_proj.weight"] = mx.zeros((3, 3))
    with pytest.raises(WeightsError) as e:
        load_into(Gemma4(cfg), weights)
    msg = str(e.value)
    assert "1 missing: language_model.layers.0.mlp.up_proj.weight" in msg
    assert "1 unexpected: language_model.layers.0.extra.weight" in msg
    assert "language_model.layers.1.mlp.down_proj.weight: checkpoint (3, 3)" in msg


def test_config_that_does_not_match_the_weights(tmp_path):
    src = save_checkpoint(make_model("dense"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 80
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="wrong shape.*mlp.*Check that config.json belongs to these weights"):
        load(src)


@pytest.fixture(scope="module")
def e_checkpoint(tmp_path_factory):
    """A tiny E-family checkpoint with tokenizer, and its float32 conversion (PLE in its own file)."""
    root = tmp_path_factory.mktemp("e")
    src = make_tokenizer(save_checkpoint(make_model("e"), root / "src"))
    return src, convert(src, root / "conv", dtype="float32")


def test_no_tokenizer_is_a_clear_error(e_checkpoint, tmp_path):
    _, conv = e_checkpoint
    bare = shutil.copytree(conv, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.*Copy the tokenizer files"):
        load(bare)


@pytest.mark.parametrize("metadata", [
    {"dims": "56"},                                                    # no embed_scale
    {"embed_scale": "abc", "dims": "56"},
    {"embed_scale": "2.8", "dims": "x"},
    {"embed_scale": "2.8", "dims": "56", "bits": "7", "group_size": "32"},
    {"embed_scale": "2.8", "dims": "48", "bits": "0"},                 # disagrees with the tensor's shape
    {"embed_scale": "nan", "dims": "56"},
])
def test_corrupt_ple_metadata_is_a_weights_error(e_checkpoint, tmp_path, metadata):
    from mlx_gemma4.ple import PLE_FILE

    _, conv = e_checkpoint
    bad = shutil.copytree(conv, tmp_path / "bad")
    table = mx.load(str(bad / PLE_FILE))
    mx.save_safetensors(str(bad / PLE_FILE), table, metadata=metadata)
    with pytest.raises(WeightsError, match="Re-convert"):
        load(bad)


def test_a_missing_ple_file_is_named(e_checkpoint, tmp_path):
    """It was reported as a missing embed_tokens_per_layer weight, with advice to check config.json."""
    from mlx_gemma4.ple import PLE_FILE

    _, conv = e_checkpoint
    bad = shutil.copytree(conv, tmp_path / "bad", ignore=shutil.ignore_patterns(PLE_FILE))
    with pytest.raises(WeightsError, match=f"lacks {PLE_FILE}, which convert.py wrote"):
        load(bad)


def test_ple_table_that_does_not_match_the_config(e_checkpoint, tmp_path):
    from mlx_gemma4.ple import PLE_FILE, save_table

    _, conv = e_checkpoint
    bad = shutil.copytree(conv, tmp_path / "bad")
    w = mx.load(str(bad / PLE_FILE))["weight"][:, :48]
    save_table(bad / PLE_FILE, {"weight": w}, 2.8, 48)
    with pytest.raises(WeightsError, match="per-layer embedding table.*config.json needs"):
        load(bad)


def _resave(src: Path, dst: Path, cast) -> Path:
    """A copy of checkpoint ``src`` whose tensors went through ``cast`` (numpy arrays, safetensors' own writer)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    for f in src.glob("*.safetensors"):
        save_file({k: cast(k, v) for k, v in load_file(f).items()}, dst / f.name, metadata={"format": "pt"})
    return dst


def test_float64_checkpoint_is_converted_not_called_corrupt(e_checkpoint, tmp_path):
    src, conv = e_checkpoint
    f64 = _resave(src, tmp_path / "f64", lambda k, v: v.astype(np.float64) if v.dtype == np.float32 else v)
    with pytest.raises(WeightsError, match="float64.*convert.py") as e:
        load(f64)
    assert "download" not in str(e.value)
    ref, _ = load(conv)
    ours, _ = load(convert(f64, tmp_path / "conv", dtype="float32"))
    np.testing.assert_array_equal(_logits(ours), _logits(ref))


def test_unsupported_dtype_names_it(e_checkpoint, tmp_path):
    import struct

    src, _ = e_checkpoint
    bad = shutil.copytree(src, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "F8_E4M3"                 # 1 byte per item: the byte range no longer fits either
    blob = json.dumps(header).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    for call in (lambda: load(bad), lambda: convert(bad, tmp_path / "out")):
        with pytest.raises(WeightsError, match=f"{name} is stored as F8_E4M3") as e:
            call()
        assert "download it again" not in str(e.value)


def test_pickle_only_checkpoint_is_refused_with_the_reason(e_checkpoint, tmp_path):
    src, _ = e_checkpoint
    pt = shutil.copytree(src, tmp_path / "pt", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    (pt / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickle")
    for call in (lambda: load(pt), lambda: convert(pt, tmp_path / "out")):
        with pytest.raises(WeightsError, match="pytorch_model.bin.*pickle.*arbitrary code.*safetensors"):
            call()
    assert not (tmp_path / "out").exists()


def test_name_map_table():
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.weights import map_name
    from tests.tiny import make_config

    cfg = ModelConfig.from_dict(make_config("e").to_dict())
    text = ModelConfig.from_dict({**make_config("e").to_dict()["text_config"], "model_type": "gemma4_text"})
    up = "language_model.layers.0.mlp.up_proj.weight"
    assert map_name(f"model.{up}", cfg) == up
    assert map_name("model.layers.0.mlp.up_proj.weight", text) == "language_model.layers.0.mlp.up_proj.weight"
    assert map_name("language_model.model.norm.weight", cfg) == "language_model.norm.weight"
    assert map_name("model.language_model.layers.3.experts.gate_up_proj", cfg).endswith("gate_up_proj.weight")
    assert map_name("lm_head.weight", cfg) is None                                    # tied
    assert map_name("model.vision_tower.patch_embedder.weight", cfg) is None          # no vision tower
    assert map_name("model.language_model.layers.6.self_attn.k_proj.weight", cfg) is None   # KV-shared layer
    assert map_name("model.language_model.layers.1.self_attn.k_proj.weight", cfg).startswith("language_model.")
    # A layer index past the config's layers is kept (and reported as unexpected), not an IndexError.
    assert map_name("model.language_model.layers.99.self_attn.k_proj.weight", cfg) is not None


def test_folder_with_no_weights_says_what_to_do(tmp_path):
    from mlx_gemma4.weights import safetensors_files

    with pytest.raises(WeightsError, match="No \\*.safetensors weight files.*convert it again with convert.py"):
        safetensors_files(tmp_path)
