"""Reading checkpoints: safetensors files (single or sharded), name mapping, strict loading, hub download.

The name map is declarative: a Hugging Face parameter name maps to ours, or to None when the model does not use it
(the tied ``lm_head``, the K/V projections that published checkpoints still carry for KV-shared layers).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import WeightsError
from .ple import PLE_FILE, MappedPerLayerEmbedding, choose_placement
from .quantize import PLE

logger = logging.getLogger(__name__)

_SHARED_KV = re.compile(r"^language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_FUSED_EXPERTS = re.compile(r"^(language_model\.layers\.\d+\.experts\.(gate_up_proj|down_proj))$")


def map_name(name: str, config: ModelConfig) -> str | None:
    """Our parameter name for a checkpoint tensor name, or None to drop it."""
    if name.startswith("lm_head."):
        return None if config.tied_head else name  # a tied head is the token embedding
    if name.startswith("model."):
        name = name[len("model."):]
        if config.model_type == "gemma4_text" and not name.startswith("language_model."):
            name = "language_model." + name
    elif name.startswith("language_model.model."):
        name = "language_model." + name[len("language_model.model."):]
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


def _merge_switch_glu(out: dict[str, mx.array]) -> None:
    """mlx-lm / mlx-vlm keep MoE experts as ``switch_glu.{gate,up,down}_proj``; ours fuse gate and up.

    Rows are quantized independently, so packed weights, scales and biases concatenate along the rows axis too.
    """
    for key in [k for k in out if ".experts.switch_glu.gate_proj." in k]:
        prefix, suffix = key.split(".switch_glu.gate_proj.")
        up = out.pop(f"{prefix}.switch_glu.up_proj.{suffix}")
        out[f"{prefix}.gate_up_proj.{suffix}"] = mx.concatenate([out.pop(key), up], axis=-2)
    for key in [k for k in out if ".experts.switch_glu.down_proj." in k]:
        prefix, suffix = key.split(".switch_glu.down_proj.")
        out[f"{prefix}.down_proj.{suffix}"] = out.pop(key)


def sanitize(weights: dict[str, mx.array], config: ModelConfig, model: nn.Module | None = None,
             hf_layout: bool = True) -> dict[str, mx.array]:
    """Rename checkpoint tensors to ours, dropping unused ones and fixing layouts (conv weights).

    ``hf_layout=False`` for MLX-written checkpoints (ours, mlx-vlm's): their conv weights are already in MLX layout.
    """
    out = {}
    for name, value in weights.items():
        new = map_name(name, config)
        if new is not None:
            out[new] = value
    _merge_switch_glu(out)
    if hf_layout and model is not None and hasattr(model, "audio_tower") and hasattr(model.audio_tower, "sanitize"):
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
    files = sorted(f for f in path.glob("*.safetensors") if f.name != PLE_FILE)
    if not files:
        raise WeightsError(f"No *.safetensors files in {path}. Is this a Gemma 4 checkpoint directory?")
    return files


def check_safetensors(f: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises; returns the header."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise WeightsError(f"Cannot read {f}: {e}. The file is corrupt or truncated: download it again.") from e
    if 8 + n + end > size:
        raise WeightsError(f"{f} is truncated ({size} bytes, its header needs {8 + n + end}). Download it again.")
    return header


def read_safetensors(files: Iterable[Path]) -> dict[str, mx.array]:
    """Load every tensor lazily (nothing is read until it is used); truncated files are caught up front."""
    weights: dict[str, mx.array] = {}
    for f in files:
        check_safetensors(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with terse messages
            raise WeightsError(f"Cannot read {f}: {e}. The file is corrupt or truncated: download it again.") from e
    return weights


def is_mlx_layout(files: list[Path]) -> bool:
    """MLX writers (ours, mlx-lm, mlx-vlm) tag their safetensors with format=mlx; save_pretrained writes pt."""
    meta = check_safetensors(files[0]).get("__metadata__") or {}
    return meta.get("format") == "mlx"


def check_names(expected: dict[str, mx.array], weights: dict[str, mx.array]) -> None:
    """Raise WeightsError listing missing / unexpected names and shape mismatches."""
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


def load_into(model: nn.Module, weights: dict[str, mx.array], strict: bool = True) -> None:
    """Load ``weights`` (our names) into ``model``; list missing / unexpected names and shape mismatches."""
    from mlx.utils import tree_flatten

    if strict:
        check_names(dict(tree_flatten(model.parameters())), weights)
    model.load_weights(list(weights.items()), strict=False)


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_model(path: str | Path, dtype: mx.Dtype | None = None, progress: Callable | None = None,
               mapped_ple: bool | None = None):
    """Build the model for the checkpoint at ``path`` (local dir) and load its weights lazily.

    ``path`` may be our converted dir, an mlx-vlm / mlx-community conversion, or a raw Hugging Face checkpoint
    (loaded as is, unquantized). Quantized modules are read off the packed tensors themselves. A separate PLE
    file (see ple.py) is loaded into memory when ``mapped_ple`` is False, memory-mapped when it is True, and by
    default (None) kept in memory when the machine has room for it (ple.choose_placement), which decodes
    fastest; ``model.ple_placement`` says which was chosen and why.
    """
    from .model import Gemma4
    from .quantize import apply_quantization

    path = Path(path)
    config = ModelConfig.from_file(path)
    model = Gemma4(config)
    files = safetensors_files(path)
    weights = sanitize(read_safetensors(files), config, model, hf_layout=not is_mlx_layout(files))
    ple_path = path / PLE_FILE
    ple = MappedPerLayerEmbedding(ple_path) if ple_path.exists() else None
    placement = None
    if ple is not None:
        placement = choose_placement(ple.nbytes, sum(v.nbytes for v in weights.values()), mapped_ple)
        mapped_ple = placement.mapped
        logger.info("per-layer embedding table: %s", placement)
    if ple is not None and not mapped_ple:
        weights.update({f"{PLE}.{k}": v for k, v in ple.load_table().items()})
    apply_quantization(model, weights=weights)
    if ple is not None and mapped_ple:
        model.language_model.embed_tokens_per_layer = ple
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_into(model, weights)
    model.eval()
    model.ple_placement = placement
    if progress is not None:
        progress(1, 1)
    return model


def load(path_or_repo: str | Path, progress: Callable | None = None, lazy: bool = True, mapped_ple: bool | None = None,
         **hub_kwargs):
    """``(model, processor)`` for a converted dir, a raw HF checkpoint dir, or a hub repo id.

    ``lazy`` leaves the weights memory-mapped until first use; ``lazy=False`` reads them all now.
    ``mapped_ple``: where E2B/E4B's per-layer embedding table lives (see load_model; default: decided from free
    memory).
    ``hub_kwargs`` (revision, cache_dir, local_files_only) go to huggingface_hub's snapshot_download.
    The processor is None (with a warning) when the processing package cannot build one.
    """
    from .hub import resolve

    path = resolve(path_or_repo, **hub_kwargs)
    model = load_model(path, progress=progress, mapped_ple=mapped_ple)
    if not lazy:
        mx.eval(model.parameters())
    return model, load_processor(path)


def load_processor(path: Path):
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        logger.warning("%s has no tokenizer files; load() returns None for the processor.", path)
        return None
    try:
        from .processing.processor import Processor
    except ImportError as e:
        logger.warning("No processor (%s); load() returns None for it.", e)
        return None
    return Processor.from_pretrained(path)
