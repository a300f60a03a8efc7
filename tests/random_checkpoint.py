"""Write a random-weight Hugging Face Gemma 4 checkpoint of any size quickly (numpy + safetensors, no torch init).

Tensor names and shapes come from our own model built lazily from the config (nothing is allocated), spelled
as transformers' save_pretrained spells them. Used by the conversion memory tests and the conversion benchmark:

    python -m tests.random_checkpoint --size e2b OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

E2B_TEXT = dict(
    vocab_size=262_144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
    num_key_value_heads=1, head_dim=256, global_head_dim=512, sliding_window=512, num_kv_shared_layers=20,
    hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144, use_double_wide_mlp=True,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, final_logit_softcapping=30.0,
    max_position_embeddings=131_072, rms_norm_eps=1e-6, tie_word_embeddings=True,
)
# A few hundred MB in float32: big enough to see memory, small enough for a test.
MEDIUM_TEXT = dict(
    vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=256, global_head_dim=512, sliding_window=64, hidden_size_per_layer_input=0,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, final_logit_softcapping=30.0,
    max_position_embeddings=4096,
)
SIZES = {"e2b": E2B_TEXT, "medium": MEDIUM_TEXT}


def hf_shapes(text_config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a text-only ``gemma4`` config."""
    from mlx.utils import tree_flatten

    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.model import Gemma4

    model = Gemma4(ModelConfig.from_dict({"model_type": "gemma4", "text_config": text_config}))
    out = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith(("experts.gate_up_proj.weight", "experts.down_proj.weight")):
            name = name[: -len(".weight")]
        out["model." + name] = tuple(p.shape)
    return out


def write(path: str | Path, text_config: dict, dtype: str = "float32", shard_bytes: int = 2 * 1024**3,
          seed: int = 0) -> Path:
    """Write config.json and sharded safetensors with an index; holds one shard in memory at a time."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "float32" else np.uint16   # bfloat16 written as raw 16-bit patterns
    st_dtype = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    shapes = hf_shapes(text_config)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if name.endswith(("norm.weight", "layer_scalar", "scale")):
            x = (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)
        else:
            x = (0.02 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)
        if dtype == "bfloat16":
            x = (x.view(np.uint32) >> 16).astype(np.uint16)
        if current and size + x.nbytes > shard_bytes:
            shards.append(list(current))
            _flush(path, len(shards), current, save_file, st_dtype)
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    shards.append(list(current))
    _flush(path, len(shards), current, save_file, st_dtype)
    del current
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (path / f"part{i + 1}.safetensors").rename(path / final)
        weight_map.update({k: final for k in names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
              "text_config": dict(text_config, model_type="gemma4_text"), "vision_config": None,
              "audio_config": None, "tie_word_embeddings": True, "torch_dtype": dtype}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _flush(path: Path, i: int, tensors: dict, save_file, st_dtype: str) -> None:
    f = path / f"part{i}.safetensors"
    save_file(tensors, str(f), metadata={"format": "pt"})
    if st_dtype == "BF16":   # safetensors.numpy wrote U16; relabel the header as BF16 (same bytes)
        _relabel(f, "U16", "BF16")


def _relabel(f: Path, old: str, new: str) -> None:
    import struct

    with open(f, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(n).decode()
        fixed = header.replace(f'"dtype":"{old}"', f'"dtype":"{new}"')
        assert len(fixed) == len(header)
        fh.seek(8)
        fh.write(fixed.encode())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    a = ap.parse_args()
    write(a.out, SIZES[a.size], a.dtype)
