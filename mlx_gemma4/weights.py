"""Reading checkpoints: safetensors files (single or sharded), name mapping, strict loading, hub download.

The name map is declarative: a Hugging Face parameter name maps to ours, or to None when the model does not use it
(the tied ``lm_head``, the K/V projections that published checkpoints still carry for KV-shared layers).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import WeightsError

logger = logging.getLogger(__name__)

_SHARED_KV = re.compile(r"^language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_FUSED_EXPERTS = re.compile(r"^(language_model\.layers\.\d+\.experts\.(gate_up_proj|down_proj))$")


def map_name(name: str, config: ModelConfig) -> str | None:
    """Our parameter name for a checkpoint tensor name, or None to drop it."""
    if name.startswith("lm_head."):
        return None  # tied to the token embedding
    if name.startswith("model."):
        name = name[len("model."):]
        if config.model_type == "gemma4_text" and not name.startswith("language_model."):
            name = "language_model." + name
    elif name.startswith("language_model.model."):
        name = "language_model." + name[len("language_model.model."):]
    if name.startswith("audio_tower.") and config.audio_config is None:
        return None
    if name.startswith(("vision_tower.", "embed_vision.")) and config.vision_config is None:
        return None
    if name.startswith(("audio_tower.", "embed_audio.")) and config.audio_config is None:
        return None
    m = _SHARED_KV.match(name + ".")
    if m and config.text_config.is_kv_shared(int(m.group(1))):
        return None
    m = _FUSED_EXPERTS.match(name)
    if m:
        return name + ".weight"
    return name


def sanitize(weights: dict[str, mx.array], config: ModelConfig, model: nn.Module | None = None) -> dict[str, mx.array]:
    """Rename checkpoint tensors to ours, dropping unused ones and fixing layouts (conv weights)."""
    out = {}
    for name, value in weights.items():
        new = map_name(name, config)
        if new is not None:
            out[new] = value
    if model is not None and hasattr(model, "audio_tower") and hasattr(model.audio_tower, "sanitize"):
        audio = {k: v for k, v in out.items() if k.startswith("audio_tower.")}
        if audio:
            out.update(model.audio_tower.sanitize(audio))
    return out


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, checking that every shard the index names exists."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{index} is unreadable ({e}). Re-download the checkpoint.") from e
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise WeightsError(
                f"{path} is missing shard(s) {', '.join(missing)} named in model.safetensors.index.json. "
                "The download is incomplete: download it again."
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"No *.safetensors files in {path}. Is this a Gemma 4 checkpoint directory?")
    return files


def read_safetensors(files: Iterable[Path]) -> dict[str, mx.array]:
    """Load every tensor lazily (MLX maps the file; nothing is read until it is used)."""
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with terse messages
            raise WeightsError(f"Cannot read {f}: {e}. The file is corrupt or truncated: download it again.") from e
    return weights


def load_into(model: nn.Module, weights: dict[str, mx.array], strict: bool = True) -> None:
    """Load ``weights`` (our names) into ``model``; list missing / unexpected names and shape mismatches."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    if strict:
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {_preview(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_preview(unexpected)}")
        bad_shapes = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in weights.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
        if bad_shapes:
            problems.append(f"{len(bad_shapes)} with the wrong shape: {_preview(bad_shapes)}")
        if problems:
            raise WeightsError(
                "The weights do not match the config: " + "; ".join(problems)
                + ". Check that config.json belongs to these weights, or re-convert the checkpoint."
            )
    model.load_weights(list(weights.items()), strict=False)


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_model(path: str | Path, dtype: mx.Dtype | None = None, progress: Callable | None = None):
    """Build the model for the checkpoint at ``path`` (local dir) and load its weights lazily."""
    from .model import Gemma4

    path = Path(path)
    config = ModelConfig.from_file(path)
    model = Gemma4(config)
    if config.quantization:
        from .quantize import apply_quantization

        apply_quantization(model, config.quantization)
    weights = sanitize(read_safetensors(safetensors_files(path)), config, model)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_into(model, weights)
    model.eval()
    return model
