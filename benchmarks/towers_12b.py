"""Image and audio encoding of Gemma 4 12B (``gemma4_unified``) at its real sizes, random weights, optionally
against mlx-vlm's gemma4_unified path. Run through towers.py, which owns the timing and the report:

    python -m benchmarks.towers --model 12b [--tower {vision,audio,both}] [--compare mlx-vlm] [--tiny]

The 12B has no towers (mlx_gemma4/unified.py): an image is cut into 48 x 48 pixel patches that go LayerNorm ->
Linear -> LayerNorm, get a factorized 2-D position embedding and a LayerNorm, then the multimodal embedder into
text space; audio is raw 640-sample frames straight through its own multimodal embedder. The processor's host
work is then a real share of what a prompt pays before prefill, so every case is timed in three stages:

- ``host``: the processor, image or waveform -> numpy arrays (ours: ``UnifiedImageProcessor`` /
  ``UnifiedAudioFeatureExtractor``; mlx-vlm: ``Gemma4UnifiedImageProcessor.preprocess`` /
  ``Gemma4UnifiedAudioFeatureExtractor``, each with its defaults, which are the reference's);
- ``model``: those arrays -> soft tokens in text space, padding dropped (ours: ``encode_patches`` /
  ``encode_waveform``, as ``Gemma4`` calls them; mlx-vlm: its ``Model.get_image_features`` /
  ``get_audio_features`` run on its ``VisionEmbedder`` and ``MultimodalEmbedder`` modules alone, since a whole
  ``Model`` would build a 12B language model);
- ``total``: the two in a row.

mlx-vlm's modules carry a copy of our random weights (the parameter names match one to one). The host stage
also reports how far the two processors' arrays differ; the other stages compare the soft tokens. Sizes: ours
from tests/random_checkpoint.py (``UNIFIED_12B_*``, our reading of the published config); ``--tiny`` narrows the
patch embedding and the text width (the 6,912-value patches and 640-sample frames are fixed by the format).
"""

from __future__ import annotations

import types
from functools import partial

import mlx.core as mx
import numpy as np

from benchmarks.towers import compare_outputs, nbytes, random_image, report, timed, twin, vlm_modules
from mlx_gemma4.config import EmbedderAudioConfig, EmbedderVisionConfig
from mlx_gemma4.layers import MultimodalEmbedder
from mlx_gemma4.processing.unified_audio import UnifiedAudioFeatureExtractor
from mlx_gemma4.processing.unified_vision import UnifiedImageProcessor
from mlx_gemma4.unified import VisionEmbedder, encode_patches, encode_waveform
from tests import random_checkpoint as rc

VISION_12B = rc.UNIFIED_12B_VISION
AUDIO_12B = rc.UNIFIED_12B_AUDIO
TEXT_HIDDEN_12B = rc.UNIFIED_12B_TEXT["hidden_size"]
TINY_VISION_12B = dict(VISION_12B, mm_embed_dim=64, output_proj_dims=64)
TINY_TEXT_HIDDEN_12B = 128


def import_vlm_unified(root: str | None) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """mlx-vlm's gemma4_unified config, model and processing modules (the last needs transformers)."""
    return vlm_modules(root, "gemma4_unified", ("config", "gemma4_unified", "processing_gemma4_unified"))


def run_stages(host: dict, model: dict, runs: int) -> dict:
    """Time ``host`` (() -> processor output), ``model`` (processor output -> soft tokens) and the two in a row,
    per implementation. Returns stage -> (timed results, last outputs)."""
    inputs = {impl: fn() for impl, fn in host.items()}
    return {
        "host": timed(host, runs),
        "model": timed({impl: partial(fn, inputs[impl]) for impl, fn in model.items()}, runs),
        "total": timed({impl: (lambda fn=fn, h=host[impl]: fn(h())) for impl, fn in model.items()}, runs),
    }


def report_stages(rows: list, tower: str, case: str, stages: dict, weights: dict, extra: dict,
                  host_keys: tuple[str, str]) -> None:
    """One row per stage and implementation; ``host_keys`` name the processor's two arrays to compare."""
    for stage, (res, outs) in stages.items():
        row_extra = dict(extra, stage=stage)
        if stage == "host":
            if "mlx-vlm" in outs:
                row_extra.update(compare_host(outs["ours"], outs["mlx-vlm"], host_keys))
        else:
            row_extra.update(out_shape=list(outs["ours"].shape), out_dtype=str(outs["ours"].dtype))
            if "mlx-vlm" in outs:
                row_extra.update(compare_outputs(outs["ours"], outs["mlx-vlm"]),
                                 vlm_out_dtype=str(outs["mlx-vlm"].dtype))
        report(rows, tower, f"{case}, {stage}", res, weights, row_extra)


def compare_host(ours, theirs, keys: tuple[str, str]) -> dict:
    """How far mlx-vlm's processor arrays are from ours: the values' largest difference, the second array equal."""
    values, other = (np.asarray(ours[k]) for k in keys)
    v_values, v_other = (np.asarray(theirs[k]) for k in keys)
    out = dict(host_shapes_equal=values.shape == v_values.shape and other.shape == v_other.shape)
    if out["host_shapes_equal"]:
        out["host_max_abs_diff"] = float(np.abs(values.astype(np.float64) - v_values).max())
        out[f"host_{keys[1]}_equal"] = bool((other == v_other).all())
    return out


def bench_image(args, dtype, rows) -> None:
    vkw = TINY_VISION_12B if args.tiny else VISION_12B
    text_hidden = TINY_TEXT_HIDDEN_12B if args.tiny else TEXT_HIDDEN_12B
    cfg = EmbedderVisionConfig.from_dict(vkw)
    embedder, projection = VisionEmbedder(cfg), MultimodalEmbedder(cfg.mm_embed_dim, text_hidden, cfg.rms_norm_eps)
    vlm = None
    if args.compare == "mlx-vlm":
        vcfg, vmodel, vproc = import_vlm_unified(args.vlm_root)
        vlm = types.SimpleNamespace(  # what Model.get_image_features reads off its model
            vision_embedder=vmodel.VisionEmbedder(vcfg.VisionConfig(**vkw)),
            embed_vision=vmodel.MultimodalEmbedder(cfg.mm_embed_dim, text_hidden, cfg.rms_norm_eps))
    twin(embedder, 10, dtype, None if vlm is None else vlm.vision_embedder)
    twin(projection, 11, dtype, None if vlm is None else vlm.embed_vision)
    weights = {"ours": nbytes(embedder) + nbytes(projection)}
    if vlm is not None:
        weights["mlx-vlm"] = nbytes(vlm.vision_embedder) + nbytes(vlm.embed_vision)

    image = random_image(args.image_width, args.image_height)
    proc = UnifiedImageProcessor()
    for budget in args.vision_tokens:
        host = {"ours": lambda budget=budget: proc(image, max_soft_tokens=budget)}
        model = {"ours": lambda inp: encode_patches(embedder, projection, mx.array(inp["pixel_values"]),
                                                    mx.array(inp["image_position_ids"]))}
        if vlm is not None:
            v_proc = vproc.Gemma4UnifiedImageProcessor()
            host["mlx-vlm"] = lambda budget=budget: v_proc.preprocess([image], max_soft_tokens=budget)[0]
            model["mlx-vlm"] = lambda inp: vmodel.Model.get_image_features(
                vlm, mx.array(inp["pixel_values"]), mx.array(inp["image_position_ids"]))
        stages = run_stages(host, model, args.runs)
        inp = stages["host"][1]["ours"]
        extra = dict(soft_tokens=int(inp["num_soft_tokens_per_image"][0]),
                     padded_patches=int(inp["pixel_values"].shape[1]), image=f"{args.image_width}x{args.image_height}",
                     dtype=args.dtype, device=str(mx.default_device()))
        report_stages(rows, "12b image", f"{budget} tokens", stages, weights, extra,
                      ("pixel_values", "image_position_ids"))


def bench_audio(args, dtype, rows) -> None:
    text_hidden = TINY_TEXT_HIDDEN_12B if args.tiny else TEXT_HIDDEN_12B
    cfg = EmbedderAudioConfig.from_dict(AUDIO_12B)
    width = cfg.audio_embed_dim
    projection = MultimodalEmbedder(width, text_hidden, cfg.rms_norm_eps)
    vlm = None
    if args.compare == "mlx-vlm":
        _, vmodel, vproc = import_vlm_unified(args.vlm_root)
        vlm = types.SimpleNamespace(embed_audio=vmodel.MultimodalEmbedder(width, text_hidden, cfg.rms_norm_eps))
    twin(projection, 12, dtype, None if vlm is None else vlm.embed_audio)
    weights = {"ours": nbytes(projection)}
    if vlm is not None:
        weights["mlx-vlm"] = nbytes(vlm.embed_audio)

    fe = UnifiedAudioFeatureExtractor()
    for seconds in args.audio_seconds:
        wave = (0.1 * np.random.default_rng(int(seconds)).standard_normal(int(seconds * fe.sampling_rate)))
        wave = wave.astype(np.float32)
        for feature_dtype in args.audio_feature_dtype:
            def frames(inp, cast=feature_dtype == "model"):
                # the processors give float32; "model" casts to the weights' dtype first, as transformers does
                x = mx.array(inp["input_features"])
                return x.astype(dtype) if cast else x

            host = {"ours": lambda: fe([wave])}
            model = {"ours": lambda inp, frames=frames: encode_waveform(
                projection, frames(inp), mx.array(inp["input_features_mask"]), width)}
            if vlm is not None:
                v_fe = vproc.Gemma4UnifiedAudioFeatureExtractor()
                host["mlx-vlm"] = lambda v_fe=v_fe: v_fe(wave)
                model["mlx-vlm"] = lambda inp, frames=frames: vmodel.Model.get_audio_features(
                    vlm, frames(inp), mx.array(inp["input_features_mask"]))
            stages = run_stages(host, model, args.runs)
            inp = stages["host"][1]["ours"]
            extra = dict(seconds=seconds, frames=list(inp["input_features"].shape[:2]),
                         soft_tokens=int(sum(inp["num_soft_tokens_per_audio"])),
                         feature_dtype=str(dtype if feature_dtype == "model" else mx.float32), dtype=args.dtype,
                         device=str(mx.default_device()))
            case = f"{seconds:g} s" + ("" if feature_dtype == "float32" else f", features {args.dtype}")
            report_stages(rows, "12b audio", case, stages, weights, extra,
                          ("input_features", "input_features_mask"))
