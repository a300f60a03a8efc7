"""Quantization recipes: which modules are quantized at which bits, and the runtime module swap.

Two phases, as in gpt-fast: offline, ``recipe`` decides per module and ``quantize_weight`` makes the packed
tensors (convert.py); at load time, ``apply_quantization`` swaps module types so the packed tensors load.
The decision is written into config.json's ``quantization`` section in mlx-lm's spelling: default ``bits`` /
``group_size`` plus one entry per module that deviates (a dict of its own bits / group size, or False for a
module left in the float dtype). docs/QUANTIZATION.md explains every choice and its size cost.
"""

from __future__ import annotations

import logging
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
PLE = "language_model.embed_tokens_per_layer"
_TEXT_BULK = re.compile(r"^language_model\.(embed_tokens$|layers\.\d+\.(self_attn|mlp|experts)\.)")
# The towers' encoder layers: vision_tower.encoder.layers.N..., audio_tower.layers.N... (the audio tower's sat
# directly under it and never matched "tower.<something>.layers": its conformer stayed in --dtype, against the docs).
_TOWER_LAYER = re.compile(r"^(vision_tower|audio_tower)\.(.*\.)?layers\.\d+\.")


def check_settings(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"--q-bits {bits} is not supported; choose one of {SUPPORTED_BITS}.")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--q-group-size {group_size} is not supported; choose one of {GROUP_SIZES}.")


def _quantizable(model: nn.Module):
    """(path, module) for every module that has a quantized twin (Linear, Embedding, SwitchLinear)."""
    return [(p, m) for p, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m]


def idle_part_flags(model: nn.Module, ple_bits: int | None, tower_bits: int | None) -> list[str]:
    """The part settings given (not None) for parts ``model`` does not have: ``--ple-bits`` without a per-layer
    embedding table (the 12B, 26B, 31B, a drafter), ``--tower-bits`` without encoder layers (the 12B's embedders,
    a text-only checkpoint, a drafter)."""
    paths = [p for p, _ in _quantizable(model)]
    return [flag for flag, given, present in (("--ple-bits", ple_bits, PLE in paths),
                                              ("--tower-bits", tower_bits, any(map(_TOWER_LAYER.match, paths))))
            if given is not None and not present]


def recipe(model: nn.Module, bits: int, group_size: int, ple_bits: int | None = 8,
           tower_bits: int | None = 8) -> dict:
    """The quantization section for ``model``: defaults plus per-module exceptions.

    ``ple_bits`` / ``tower_bits`` of None or 0 keep the PLE table / the towers' encoder layers unquantized.
    """
    check_settings(bits, group_size)
    for name, b in (("ple bits", ple_bits), ("tower bits", tower_bits)):
        if b and b not in SUPPORTED_BITS:
            raise ConfigError(f"{name} {b} is not supported; choose one of {SUPPORTED_BITS} (or 0 to keep them).")
    q: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, m in _quantizable(model):
        if path == PLE:
            want = ple_bits
        elif ".router" in path:
            want = None          # a few hidden x experts weights that pick every token's experts
        elif _TOWER_LAYER.match(path):
            want = tower_bits
        elif _TEXT_BULK.match(path) or path.startswith("language_model."):
            want = bits
        else:
            want = None          # patch embedder, audio subsampling, projections into text space
        in_dims = m.weight.shape[-1]
        if want and in_dims % group_size:
            if _TEXT_BULK.match(path):
                raise ConfigError(
                    f"{path} has {in_dims} input dims, which --q-group-size {group_size} does not divide. "
                    f"Pick a group size from {GROUP_SIZES} that divides {in_dims}."
                )
            logger.info("%s: %d input dims not divisible by %d; left unquantized", path, in_dims, group_size)
            want = None
        if not want:
            q[path] = False
        elif want != bits:
            q[path] = {"group_size": group_size, "bits": want}
    return q


def plan(model: nn.Module, quantization: dict | None) -> dict[str, tuple[int, int]]:
    """Module path -> (bits, group_size) for every module that the quantization section quantizes."""
    if not quantization:
        return {}
    out = {}
    for path, _ in _quantizable(model):
        entry = quantization.get(path, True)
        if entry is False:
            continue
        entry = entry if isinstance(entry, dict) else {}
        out[path] = (int(entry.get("bits", quantization["bits"])),
                     int(entry.get("group_size", quantization["group_size"])))
    return out


def infer_plan(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, tuple[int, int]]:
    """Read (bits, group_size) off the packed tensors themselves: a module is quantized iff it has ``scales``.

    Works for any writer (ours, mlx-lm, mlx-vlm) whatever the spelling of its config's quantization section.
    """
    out = {}
    for path, m in _quantizable(model):
        scales = weights.get(f"{path}.scales")
        packed = weights.get(f"{path}.weight")
        if scales is None or packed is None:
            continue
        if f"{path}.biases" not in weights:
            raise ConfigError(f"{path} is quantized without biases (not the affine mode); this format is "
                              "not supported. Convert the original checkpoint with convert.py instead.")
        if packed.dtype != mx.uint32:   # (it loaded, and the first forward failed inside MLX)
            raise WeightsError(f"{path}.weight is stored as {packed.dtype} beside its scales; quantized weights are "
                               "packed in uint32. The file is damaged or was written by another tool: re-convert "
                               "the checkpoint with convert.py.")
        in_dims = m.weight.shape[-1]
        group_size = in_dims // max(scales.shape[-1], 1)
        bits = packed.shape[-1] * 32 // in_dims
        if (group_size not in GROUP_SIZES or bits not in SUPPORTED_BITS or scales.shape[-1] * group_size != in_dims
                or packed.shape[-1] * 32 != bits * in_dims):
            raise WeightsError(
                f"{path} is quantized as {tuple(packed.shape)} packed weights with {tuple(scales.shape)} scales, "
                f"which no bit width and group size give for the {in_dims} input dims config.json sets. Check that "
                "config.json belongs to these weights, or re-convert the checkpoint.")
        out[path] = (bits, group_size)
    return out


def apply_quantization(model: nn.Module, quantization: dict | None = None,
                       weights: dict[str, mx.array] | None = None) -> dict[str, tuple[int, int]]:
    """Swap the modules that ``quantization`` (or, given ``weights``, the packed tensors) quantize."""
    decisions = infer_plan(model, weights) if weights is not None else plan(model, quantization)
    modules = dict(model.named_modules())
    swaps = []
    for path, (bits, group_size) in decisions.items():
        swaps.append((path, modules[path].to_quantized(group_size=group_size, bits=bits)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return decisions


def quantize_weight(w: mx.array, bits: int, group_size: int, dtype: mx.Dtype | None = None):
    """(packed, scales, biases) for one weight; scales and biases come out in ``dtype``.

    Quantizes from float32 so a bfloat16 output does not round the weights twice.
    """
    dtype = dtype or w.dtype
    packed, scales, biases = mx.quantize(w.astype(mx.float32), group_size=group_size, bits=bits)
    return packed, scales.astype(dtype), biases.astype(dtype)
