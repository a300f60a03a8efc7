"""Write a random-weight Hugging Face Gemma 4 checkpoint of any size quickly (numpy, no torch init, no weights in RAM).

Tensor names and shapes are exactly those of transformers' ``Gemma4ForConditionalGeneration`` (built on the meta
device, so nothing is allocated), minus the tied ``lm_head`` as ``save_pretrained`` drops it. config.json uses the
published spelling (``global_head_dim``, ``rope_parameters``, no ``per_layer_config``). Tensors are streamed into
safetensors shards (<= ``shard_bytes``) in row chunks, so even the 2.3 G-element PLE table of E2B never sits in
memory. ``--tokenizer`` (default on) adds a Gemma-4-style tokenizer of the full 262,144-token vocabulary with the real
special-token ids (mlx_gemma4.demo.write_tokenizer), so tools that need one (mlx_lm.convert) accept the directory.
Used by the conversion memory tests and the conversion benchmark:

    python -m tests.random_checkpoint --size e2b --dtype bfloat16 OUT_DIR      # 5.1 G params, 10.2 GB
"""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

E2B_TEXT = dict(
    vocab_size=262_144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
    num_key_value_heads=1, head_dim=256, global_head_dim=512, sliding_window=512, num_kv_shared_layers=20,
    hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144, use_double_wide_mlp=True,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, final_logit_softcapping=30.0,
    max_position_embeddings=131_072, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0,
                                        "rope_type": "proportional"},
                     "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}},
    eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0,
)
# The E2B towers: transformers' Gemma4VisionConfig / Gemma4AudioConfig defaults are the E2B/E4B ones (SigLIP-style
# 16 x 768 vision encoder, 12 x 1024 conformer whose output projection is E2B's 1536 wide).
E2B_VISION: dict = {}
E2B_AUDIO: dict = {"output_proj_dims": 1536}
# A few hundred MB in float32: big enough to see memory, small enough for a test.
MEDIUM_TEXT = dict(
    vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=256, global_head_dim=512, sliding_window=64, hidden_size_per_layer_input=0,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, final_logit_softcapping=30.0,
    max_position_embeddings=4096,
)
# E4B's text decoder (the PLE table is 262,144 x 42 * 256 = 262,144 x 10,752).
E4B_TEXT = dict(
    E2B_TEXT, hidden_size=2560, num_hidden_layers=42, intermediate_size=10240, num_key_value_heads=2,
    num_kv_shared_layers=18, use_double_wide_mlp=False,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
)
# 26B-A4B's text decoder: MoE beside the dense MLP, k_eq_v global layers, no PLE or KV sharing.
A26B_TEXT = dict(
    E2B_TEXT, hidden_size=2816, num_hidden_layers=30, intermediate_size=2112, num_attention_heads=16,
    num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
    hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
    moe_intermediate_size=704, num_kv_shared_layers=0, use_double_wide_mlp=False,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
)
# 31B's text decoder: dense, k_eq_v global layers, no PLE or KV sharing.
DENSE_31B_TEXT = dict(
    E2B_TEXT, hidden_size=5376, num_hidden_layers=60, intermediate_size=21504, num_attention_heads=32,
    num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
    hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10,
)
# E4B's shape, narrow, with the full 262,144-token vocabulary: what a CPU can time end to end in seconds while the
# tokenizer, detokenizer, embedding and head cost what they cost at the real size.
SMALL_TEXT = dict(
    E4B_TEXT, hidden_size=256, num_hidden_layers=12, intermediate_size=1024, num_attention_heads=4,
    num_key_value_heads=1, head_dim=64, global_head_dim=128, num_kv_shared_layers=2, hidden_size_per_layer_input=32,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2,
)
# 12B (gemma4_unified, encoder-free): our reading of the published google/gemma-4-12B-it config, written from
# transformers' Gemma4Unified*Config defaults and the release's stated sizes (3840 hidden, 48 layers, 16 heads, 8 KV
# heads, one global KV head, k_eq_v, window 1024 at 5:1, global head dim 512, no PLE or KV sharing; the MLP width is
# mlx-vlm's default for it). ``model_type`` marks the family for _hf_config; the 12B has no towers, only embedders:
# 48 x 48 x 3 raw pixels -> 3840 with a 1120-row factorized position table, and 640-sample waveform frames.
UNIFIED_12B_TEXT = dict(
    model_type="gemma4_unified_text", vocab_size=262_144, hidden_size=3840, intermediate_size=15360,
    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=1024, use_bidirectional_attention="vision",
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8, final_logit_softcapping=30.0,
    max_position_embeddings=262_144, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters=E2B_TEXT["rope_parameters"], eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0,
)
UNIFIED_12B_VISION = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=3840, mm_posemb_size=1120,
                          output_proj_dims=3840)
UNIFIED_12B_AUDIO = dict(audio_embed_dim=640)
# The 12B's shape, narrow, with the full vocabulary and embedders at its width: timeable on a CPU end to end.
UNIFIED_SMALL_TEXT = dict(UNIFIED_12B_TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
                          layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2)
UNIFIED_SMALL_VISION = dict(UNIFIED_12B_VISION, mm_embed_dim=256, output_proj_dims=256)
# 26B-A4B's layout (128 experts top-8 beside the dense MLP, k_eq_v global layers, 5:1), narrow, with the full
# vocabulary: proves the 26B paths end to end on a CPU.
A26B_SMALL_TEXT = dict(
    A26B_TEXT, hidden_size=256, num_hidden_layers=6, intermediate_size=256, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, head_dim=64, global_head_dim=128, moe_intermediate_size=64,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
)
SIZES = {"e2b": (E2B_TEXT, E2B_VISION, E2B_AUDIO), "12b": (UNIFIED_12B_TEXT, UNIFIED_12B_VISION, UNIFIED_12B_AUDIO),
         "12b-small": (UNIFIED_SMALL_TEXT, UNIFIED_SMALL_VISION, UNIFIED_12B_AUDIO), "e4b": (E4B_TEXT, None, None),
         "26b": (A26B_TEXT, None, None), "26b-small": (A26B_SMALL_TEXT, None, None),
         "31b": (DENSE_31B_TEXT, None, None), "small": (SMALL_TEXT, None, None), "medium": (MEDIUM_TEXT, None, None)}
# The published special-token ids (tests.tiny / the demo squeeze them into a small vocabulary instead).
REAL_SPECIAL_IDS = {
    "pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4, "think": 98, "channel_open": 100, "channel_close": 101,
    "turn_open": 105, "turn_close": 106, "boi": 255_999, "boa": 256_000, "image": 258_880, "audio": 258_881,
    "eoi": 258_882, "eoa": 258_883, "video": 258_884,
}
_NOISE = ("architectures", "output_hidden_states", "return_dict", "dtype", "chunk_size_feed_forward",
          "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path", "output_attentions",
          "per_layer_config")


def _unified(text_config: dict) -> bool:
    return text_config.get("model_type") == "gemma4_unified_text"


def _hf_config(text_config: dict, vision_config: dict | None = None, audio_config: dict | None = None):
    from transformers import Gemma4Config, Gemma4UnifiedConfig

    text = {k: v for k, v in text_config.items() if k != "model_type"}
    if "layer_types" in text:
        text["layer_types"] = list(text["layer_types"])
    cls = Gemma4UnifiedConfig if _unified(text_config) else Gemma4Config
    return cls(text_config=text, vision_config=vision_config, audio_config=audio_config)


# transformers' in-memory names of the 12B's embedders -> the published ones (what save_pretrained writes).
_PUBLISHED_NAMES = (("model.embed_vision.multimodal_embedder.", "model.embed_vision."),
                    ("model.embed_vision.patch_", "model.vision_embedder.patch_"),
                    ("model.embed_vision.pos_", "model.vision_embedder.pos_"))


def _published(name: str) -> str:
    for old, new in _PUBLISHED_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def config_dict(text_config: dict, vision_config: dict | None = None, audio_config: dict | None = None,
                dtype: str = "bfloat16") -> dict:
    """config.json as published: transformers' serialization, with ``global_head_dim`` instead of the derived
    ``per_layer_config`` and without the generic PreTrainedConfig fields."""
    raw = _hf_config(text_config, vision_config, audio_config).to_dict()
    for sub in ("text_config", "vision_config", "audio_config"):
        if raw.get(sub):
            for k in _NOISE:
                raw[sub].pop(k, None)
    for k in _NOISE:
        raw.pop(k, None)
    raw["text_config"]["global_head_dim"] = text_config.get("global_head_dim", 512)
    for k in ("num_global_key_value_heads",):
        if k in text_config:
            raw["text_config"][k] = text_config[k]
    raw["architectures"] = ["Gemma4UnifiedForConditionalGeneration" if _unified(text_config)
                            else "Gemma4ForConditionalGeneration"]
    if raw["text_config"]["vocab_size"] != 262_144:   # mlx-lm's gemma4 reads the top-level key (default 262,144)
        raw["vocab_size"] = raw["text_config"]["vocab_size"]
    raw["dtype"] = dtype
    return raw


def hf_shapes(text_config: dict, vision_config: dict | None = None,
              audio_config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, as save_pretrained writes them (tied lm_head left out)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration, Gemma4UnifiedForConditionalGeneration

    cfg = _hf_config(text_config, vision_config, audio_config)
    cls = Gemma4UnifiedForConditionalGeneration if _unified(text_config) else Gemma4ForConditionalGeneration
    with torch.device("meta"):
        model = cls(cfg)
    out = {_published(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.text_config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _init(name: str) -> tuple[float, float]:
    """(mean, std) of the random values: norms and scales near 1, clip bounds wide, the rest like trained weights."""
    if name.endswith(("_min",)):
        return -10.0, 0.0
    if name.endswith(("_max",)):
        return 10.0, 0.0
    if name.endswith(("norm.weight", "layer_scalar", "scale", "per_dim_scale")):
        return 1.0, 0.1
    return 0.0, 0.02


_ST = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}
_CHUNK = 16 * 1024**2     # elements generated at a time


def _values(rng, n: int, mean: float, std: float, dtype: str) -> np.ndarray:
    x = rng.standard_normal(n, dtype=np.float32)
    if std != 1.0:
        x *= std
    if mean:
        x += mean
    if dtype == "bfloat16":       # round to nearest even, keep the top 16 bits
        u = x.view(np.uint32)
        u += 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).astype(np.uint16)
    return x


class _RepeatedNoise:
    """Stands in for the generator in ``_values``: one block of random values per (mean, std, dtype), handed out
    again and again. For speed benchmarks, where only the sizes matter and generating billions of normals would
    take minutes."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.blocks: dict = {}

    def values(self, n: int, mean: float, std: float, dtype: str) -> np.ndarray:
        key = (mean, std, dtype)
        if key not in self.blocks:
            self.blocks[key] = _values(self.rng, _CHUNK, mean, std, dtype)
        return self.blocks[key][:n]


def write(path: str | Path, text_config: dict, dtype: str = "float32", shard_bytes: int = 5 * 1000**3,
          seed: int = 0, vision_config: dict | None = None, audio_config: dict | None = None,
          tokenizer: bool = False, repeat_noise: bool = False) -> Path:
    """Write config.json, sharded safetensors with an index (and optionally a tokenizer); streams every tensor.
    ``repeat_noise`` fills every tensor from one reused block of random values (fast; for speed benchmarks)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = _RepeatedNoise(seed) if repeat_noise else np.random.default_rng(seed)
    st_dtype, itemsize = _ST[dtype]
    shapes = hf_shapes(text_config, vision_config, audio_config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        total += _write_shard(path / final, names, shapes, rng, dtype, st_dtype, itemsize)
        weight_map.update({k: final for k in names})
    if n > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return write_settings(path, text_config, dtype, vision_config, audio_config, tokenizer)


def write_settings(path: str | Path, text_config: dict, dtype: str = "float32", vision_config: dict | None = None,
                   audio_config: dict | None = None, tokenizer: bool = False) -> Path:
    """What ``write`` puts beside the weights: config.json (and optionally the tokenizer files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_dict(text_config, vision_config, audio_config, dtype),
                                                 indent=2))
    if tokenizer:
        from mlx_gemma4.demo import write_tokenizer

        vocab = text_config["vocab_size"]
        ids = REAL_SPECIAL_IDS if vocab > max(REAL_SPECIAL_IDS.values()) else None
        write_tokenizer(path, **({"special_ids": ids} if ids else {}), vocab_size=vocab)
    return path


class GeneratedTensor:
    """One tensor of ``write(..., repeat_noise=True)`` made on demand instead of read back: the writer lays its
    block of random values end to end, so element i of the flattened tensor is ``block[i % block.size]``. Gives
    what the converter reads (mlx_gemma4.safetensors_io.TensorSource: shape, nbytes, mlx_dtype, row chunks) and
    the whole tensor as one lazy array. Values are made by MLX on the default device when evaluated."""

    def __init__(self, shape: tuple[int, ...], block: mx.array):
        self.shape, self.block = tuple(shape), block

    @property
    def mlx_dtype(self) -> mx.Dtype:
        return self.block.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.block.dtype.size

    def _flat(self, start: int, n: int) -> mx.array:
        """Elements start .. start + n of the flattened tensor (lazy)."""
        size, first = self.block.size, start % self.block.size
        if first + n <= size:
            return self.block[first:first + n]
        full, rest = divmod(n - (size - first), size)
        parts = [self.block[first:], *[self.block] * full, *([self.block[:rest]] if rest else [])]
        return mx.concatenate(parts)

    def chunks(self, rows: int) -> Iterator[mx.array]:
        count = self.shape[0] if self.shape else 1
        row = math.prod(self.shape[1:])
        for r0 in range(0, count, rows):
            k = min(rows, count - r0)
            yield self._flat(r0 * row, k * row).reshape((k, *self.shape[1:]) if self.shape else ())

    def array(self) -> mx.array:
        n = math.prod(self.shape)
        if n < 2**31 or len(self.shape) < 2:
            return self._flat(0, n).reshape(self.shape)
        # MLX's dimensions are 32-bit: a larger tensor (E4B's per-layer table) is joined from row blocks
        return mx.concatenate(list(self.chunks(max(1, 2**30 // math.prod(self.shape[1:])))), axis=0)


def generated_tensors(text_config: dict, dtype: str = "bfloat16", seed: int = 0, vision_config: dict | None = None,
                      audio_config: dict | None = None) -> dict[str, GeneratedTensor]:
    """HF name -> the tensor ``write(..., dtype, seed=seed, repeat_noise=True)`` would write, made on demand: the
    weights of that checkpoint without the checkpoint. Holds one block of values per (mean, std): a few MB."""
    rng = _RepeatedNoise(seed)
    blocks: dict = {}
    out = {}
    for name, shape in hf_shapes(text_config, vision_config, audio_config).items():
        key = _init(name)
        if key not in blocks:   # drawn in the writer's order, so each block holds the writer's values
            block = mx.array(rng.values(_CHUNK, *key, dtype))
            blocks[key] = block.view(mx.bfloat16) if dtype == "bfloat16" else block
        out[name] = GeneratedTensor(shape, blocks[key])
    return out


def _write_shard(f: Path, names: list[str], shapes: dict, rng, dtype: str, st_dtype: str, itemsize: int) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in names:
            mean, std = _init(name)
            left = int(np.prod(shapes[name]))
            while left:
                k = min(left, _CHUNK)
                block = (rng.values(k, mean, std, dtype) if isinstance(rng, _RepeatedNoise)
                         else _values(rng, k, mean, std, dtype))
                fh.write(block.tobytes())
                left -= k
    tmp.rename(f)
    return offset


def write_mlx(path: str | Path, text_config: dict, q_bits: int | None = 4, q_group_size: int = 64,
              seed: int = 0) -> Path:
    """Write a random *converted* (MLX, quantized by our recipe) text model: convert.py's own converter run on the
    weights ``write`` would write for this size (``generated_tensors``), without the (large) HF checkpoint on
    disk; only its config.json is written, into ``path``'s sibling ``.NAME-settings``. Streams row chunks, so
    memory stays near one chunk."""
    from mlx_gemma4.conversion import convert

    path = Path(path)
    settings = write_settings(path.parent / f".{path.name}-settings", text_config, "bfloat16")
    tensors = generated_tensors(text_config, "bfloat16", seed=seed)
    return convert(settings, path, q_bits=q_bits, q_group_size=q_group_size, dtype="bfloat16", tensors=tensors)


def _status() -> dict[str, float]:
    """Resident memory of this process in GB (total, anonymous, file-backed) and its peak, from /proc."""
    import re

    text = open("/proc/self/status").read()
    get = lambda k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 / 1e9  # noqa: E731
    return {"rss": round(get("VmRSS"), 3), "anon": round(get("RssAnon"), 3), "file": round(get("RssFile"), 3),
            "peak": round(get("VmHWM"), 3)}


def measure_rss(path: str | Path, mapped_ple: bool, prompt: int = 8, gen: int = 4) -> dict:
    """RSS after ``load(path, lazy=False)`` and after a short greedy generation (run it in a fresh process)."""
    from mlx_gemma4.generation import prefill
    from mlx_gemma4.weights import load_model

    base = _status()
    model = load_model(path, mapped_ple=mapped_ple)   # write_mlx folders carry no tokenizer
    mx.eval(model.parameters())
    loaded = _status()
    print(json.dumps({"mapped_ple": mapped_ple, "imports": base, "loaded": loaded}), flush=True)
    ids = mx.array(np.random.default_rng(0).integers(10, 200_000, (1, prompt)))
    cache = model.make_cache()
    tok = mx.argmax(prefill(model, {"input_ids": ids}, cache)).reshape(1, 1)
    for _ in range(gen):   # the uncompiled step: the compiled one (decode.py) cannot call the mapped PLE's numpy gather
        tok = mx.argmax(prefill(model, {"input_ids": tok}, cache)).reshape(1, 1)
        mx.eval(tok)
    return {"mapped_ple": mapped_ple, "imports": base, "loaded": loaded, "generated": _status()}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--measure-rss"]:   # python -m tests.random_checkpoint --measure-rss DIR {mapped,resident}
        print(json.dumps(measure_rss(sys.argv[2], sys.argv[3] == "mapped")))
        raise SystemExit
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--text-only", action="store_true", help="leave out the vision and audio towers")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--mlx-q-bits", type=int, default=None,
                    help="write a random converted MLX text model at these bits instead (write_mlx)")
    a = ap.parse_args()
    text, vision, audio = SIZES[a.size]
    if a.mlx_q_bits is not None:
        write_mlx(a.out, text, a.mlx_q_bits or None)
        raise SystemExit
    if a.text_only:
        vision = audio = None
    write(a.out, text, a.dtype, vision_config=vision, audio_config=audio, tokenizer=not a.no_tokenizer)
