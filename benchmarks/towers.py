"""Vision and audio tower speed at the E4B sizes, random weights, optionally against mlx-vlm's gemma4 towers.

    python -m benchmarks.towers [--model {e4b,12b}] --tower {vision,audio,both} [--compare mlx-vlm]
        [--dtype bfloat16] [--tiny]

``--model 12b`` times Gemma 4 12B's encoder-free image and audio path instead, processors included, against
mlx-vlm's gemma4_unified (towers_12b.py says how); the rest of this docstring is about the E4B towers.

Vision: one random ~4:3 image through our ImageProcessor at 280 and 1120 soft tokens, then
``encode_images`` (VisionModel + MultimodalEmbedder). Audio: 5 s and 30 s of noise through our
AudioFeatureExtractor, then ``encode_audio`` (AudioModel + MultimodalEmbedder). With ``--compare mlx-vlm`` the
same inputs go through mlx-vlm's ``VisionModel`` / ``AudioEncoder`` (+ the embedder as mlx-vlm's gemma4 model
builds it) carrying a copy of our random weights, so both do the same work; the max difference of the outputs
is reported. Each case is run twice to warm up (MLX builds kernels per shape), then timed ``--runs`` times
(alternating implementations, ``mx.eval`` on the output); the median and the peak memory are printed.

mlx-vlm is imported module by module (``mlx_vlm.models.gemma4.vision`` / ``.audio``) without running
``mlx_vlm/__init__``, so only mlx, numpy and Pillow are needed (for the 12B, its gemma4_unified modules also need
transformers); ``--vlm-root`` names the directory holding the ``mlx_vlm`` package when it is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from PIL import Image

from mlx_gemma4.audio import AudioModel, encode_audio
from mlx_gemma4.config import AudioConfig, VisionConfig
from mlx_gemma4.layers import MultimodalEmbedder
from mlx_gemma4.processing.audio import AudioFeatureExtractor
from mlx_gemma4.processing.image import ImageProcessor
from mlx_gemma4.vision import VisionModel, encode_images

# E4B towers (transformers' Gemma4VisionConfig / Gemma4AudioConfig defaults, as in google/gemma-4-E4B-it).
E4B_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                  num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=10240, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
E4B_AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=[128, 32],
                 conv_kernel_size=5, attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
                 attention_logit_cap=50.0, use_clipped_linears=True, output_proj_dims=1536)
E4B_TEXT_HIDDEN = 2560
# --tiny: same structure, small widths (a CPU smoke test of both implementations).
TINY_VISION = dict(E4B_VISION, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=32)
TINY_AUDIO = dict(E4B_AUDIO, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  subsampling_conv_channels=[128, 8], output_proj_dims=96)
TINY_TEXT_HIDDEN = 128

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


# ----------------------------------------------------------------------------------------------- mlx-vlm
def vlm_modules(root: str | None, family: str, names: tuple[str, ...]) -> tuple[types.ModuleType, ...]:
    """mlx-vlm's ``mlx_vlm.models.<family>.<name>`` modules, without running the ``__init__`` of ``mlx_vlm``,
    ``mlx_vlm.models``, ``.gemma4`` or ``.<family>`` (each stands in as an empty package) unless mlx-vlm has been
    imported already (then its packages are imported as usual, so no stand-in shadows them)."""
    modules = tuple(f"mlx_vlm.models.{family}.{n}" for n in names)
    vlm = sys.modules.get("mlx_vlm")
    if vlm is not None and vlm.__spec__ is not None:
        return tuple(importlib.import_module(m) for m in modules)
    if vlm is not None:  # the stand-in made by an earlier call
        pkg_dir = list(vlm.__path__)[0]
    elif root is None:
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("mlx-vlm not found: install it or pass --vlm-root DIR (the directory holding mlx_vlm/)")
        pkg_dir = list(spec.submodule_search_locations)[0]
    else:
        pkg_dir = f"{root.rstrip('/')}/mlx_vlm"
    for name, path in (("mlx_vlm", pkg_dir), ("mlx_vlm.models", f"{pkg_dir}/models"),
                       ("mlx_vlm.models.gemma4", f"{pkg_dir}/models/gemma4"),
                       (f"mlx_vlm.models.{family}", f"{pkg_dir}/models/{family}")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
    return tuple(importlib.import_module(m) for m in modules)


def import_vlm(root: str | None):
    """mlx-vlm's gemma4 config / vision / audio modules."""
    return vlm_modules(root, "gemma4", ("config", "vision", "audio"))


class VlmEmbedder(nn.Module):
    """mlx-vlm's gemma4 ``MultimodalEmbedder`` (gemma4/gemma4.py: ``RMSNormNoScale`` = ``mx.fast.rms_norm(x,
    None, eps)``, then a bias-free Linear), restated here because importing gemma4.py pulls in its whole
    language model and trainer stack."""

    def __init__(self, in_dim: int, text_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dim, text_hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


# ----------------------------------------------------------------------------------------------- helpers
def randomize(module: nn.Module, seed: int) -> None:
    """Random weights that give non-trivial activations: norm scales ~1, biases / tables / scales small normals;
    linear and conv weights keep MLX's uniform init; clip bounds stay +-inf."""
    mx.random.seed(seed)

    def f(path: str, v: mx.array) -> mx.array:
        last = path.split(".")[-1]
        if last in ("input_min", "input_max", "output_min", "output_max"):
            return v
        if last in ("position_embedding_table", "pos_embedding"):
            return 0.02 * mx.random.normal(v.shape)
        if last == "per_dim_scale":
            return 0.1 * mx.random.normal(v.shape)
        if v.ndim == 1:  # norm weights (RMSNorm "*norm*", the 12B's LayerNorms "*_ln*"), biases
            is_scale = last != "bias" and ("norm" in path or "_ln" in path)
            return 1.0 + 0.1 * mx.random.normal(v.shape) if is_scale else 0.02 * mx.random.normal(v.shape)
        return v

    module.update(tree_map_with_path(f, module.parameters()))


def copy_weights(src: nn.Module, dst: nn.Module) -> str:
    """Load ``src``'s parameters into ``dst`` by name. Returns 'copied' or raises with the mismatch."""
    s = dict(tree_flatten(src.parameters()))
    d = dict(tree_flatten(dst.parameters()))
    missing, extra = sorted(set(d) - set(s)), sorted(set(s) - set(d))
    bad_shape = [k for k in set(s) & set(d) if s[k].shape != d[k].shape]
    if missing or extra or bad_shape:
        raise RuntimeError(f"weight names differ: only in mlx-vlm {missing[:5]}, only in ours {extra[:5]}, "
                           f"shape mismatch {bad_shape[:5]}")
    dst.load_weights(list(s.items()), strict=True)
    return "copied"


def nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def eval_arrays(out) -> None:
    """``mx.eval`` the MLX arrays in ``out`` (other leaves, such as a processor's numpy arrays, are ready)."""
    mx.eval([a for _, a in tree_flatten(out) if isinstance(a, mx.array)])


def timed(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Warm every function, then time them alternately. Returns name -> (median s, all times, peak bytes)."""
    outs = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs[name] = fn()
            eval_arrays(outs[name])
    times = {name: [] for name in fns}
    peaks = {name: 0 for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            mx.clear_cache()
            mx.synchronize()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            out = fn()
            eval_arrays(out)
            mx.synchronize()
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
            del out
    return {n: (statistics.median(times[n]), times[n], peaks[n]) for n in fns}, outs


def max_diff(a: mx.array, b: mx.array) -> tuple[float, float]:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    d = mx.abs(a - b).max().item()
    return d, d / max(mx.abs(a).max().item(), 1e-30)


def report(rows: list[dict], tower: str, case: str, res: dict, weights: dict, extra: dict) -> None:
    base = res.get("mlx-vlm")
    for impl, (med, ts, peak) in res.items():
        row = dict(tower=tower, case=case, impl=impl, median_ms=round(1e3 * med, 2),
                   runs_ms=[round(1e3 * t, 2) for t in ts], peak_gb=round(peak / 1e9, 3),
                   weights_gb=round(weights[impl] / 1e9, 3), **extra)
        if base is not None and impl != "mlx-vlm":
            row["ratio_vs_mlx_vlm"] = round(med / base[0], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)


def twin(ours: nn.Module, seed: int, dtype, theirs: nn.Module | None = None) -> None:
    """Random weights for ``ours`` in ``dtype`` and, when given, the same weights copied into mlx-vlm's ``theirs``."""
    randomize(ours, seed)
    ours.set_dtype(dtype)
    mx.eval(ours.parameters())
    if theirs is not None:
        theirs.set_dtype(dtype)
        copy_weights(ours, theirs)
        mx.eval(theirs.parameters())


def build_pair(tower: nn.Module, out_dims: int, text_hidden: int, eps: float, dtype, seeds: tuple[int, int],
               vlm_tower: nn.Module | None):
    """Our tower + embedder with random weights in ``dtype``, and (when given) mlx-vlm's tower with a copy of
    them; returns ((tower, embed), impls, weights) where impls maps "mlx-vlm" to its (tower, embedder)."""
    embed = MultimodalEmbedder(out_dims, text_hidden, eps)
    vembed = None if vlm_tower is None else VlmEmbedder(out_dims, text_hidden, eps)
    twin(tower, seeds[0], dtype, vlm_tower)
    twin(embed, seeds[1], dtype, vembed)
    impls = {"ours": None}
    weights = {"ours": nbytes(tower) + nbytes(embed)}
    if vlm_tower is not None:
        weights["mlx-vlm"] = nbytes(vlm_tower) + nbytes(vembed)
        impls["mlx-vlm"] = (vlm_tower, vembed)
    return (tower, embed), impls, weights


def random_image(width: int, height: int) -> Image.Image:
    """RGB noise, the same image for every run."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def compare_outputs(a: mx.array, b: mx.array) -> dict:
    """Shapes of both outputs and, when they agree, their largest absolute and relative differences."""
    out = dict(vlm_out_shape=list(b.shape), shapes_equal=a.shape == b.shape)
    if a.shape == b.shape:
        out["max_abs_diff"], out["max_rel_diff"] = (round(x, 6) for x in max_diff(a, b))
    return out


# ----------------------------------------------------------------------------------------------- towers
def bench_vision(args, dtype, rows) -> None:
    vkw = TINY_VISION if args.tiny else E4B_VISION
    text_hidden = TINY_TEXT_HIDDEN if args.tiny else E4B_TEXT_HIDDEN
    cfg = VisionConfig.from_dict(vkw)
    vlm_tower = None
    if args.compare == "mlx-vlm":
        vcfg, vvision, _ = import_vlm(args.vlm_root)
        vlm_tower = vvision.VisionModel(vcfg.VisionConfig(**vkw))
    (tower, embed), impls, weights = build_pair(VisionModel(cfg), cfg.hidden_size, text_hidden, cfg.rms_norm_eps,
                                                dtype, (0, 1), vlm_tower)

    image = random_image(args.image_width, args.image_height)
    proc = ImageProcessor()
    for budget in args.vision_tokens:
        inp = proc(image, max_soft_tokens=budget)
        pv_np, pos_np = inp["pixel_values"], inp["image_position_ids"]
        pv, pos = mx.array(pv_np), mx.array(pos_np)
        n_patches = int((pos_np[0] != -1).any(-1).sum())
        fns = {"ours": lambda: encode_images(tower, embed, pv, pos_np)}
        if "mlx-vlm" in impls:
            vt, ve = impls["mlx-vlm"]
            fns["mlx-vlm"] = lambda: ve(vt(pv, pos))[0]  # (1, T, text_hidden) -> (T, text_hidden)
        res, outs = timed(fns, args.runs)
        extra = dict(soft_tokens=int(inp["num_soft_tokens_per_image"][0]), patches=n_patches,
                     padded_patches=int(pos_np.shape[1]), image=f"{args.image_width}x{args.image_height}",
                     out_shape=list(outs["ours"].shape), dtype=args.dtype, device=str(mx.default_device()))
        if "mlx-vlm" in outs:
            extra.update(compare_outputs(outs["ours"], outs["mlx-vlm"]))
        report(rows, "vision", f"{budget} tokens", res, weights, extra)


def bench_audio(args, dtype, rows) -> None:
    akw = TINY_AUDIO if args.tiny else E4B_AUDIO
    text_hidden = TINY_TEXT_HIDDEN if args.tiny else E4B_TEXT_HIDDEN
    cfg = AudioConfig.from_dict(akw)
    vlm_tower = None
    if args.compare == "mlx-vlm":
        vcfg, _, vaudio = import_vlm(args.vlm_root)
        vkw = dict(akw, subsampling_conv_channels=tuple(akw["subsampling_conv_channels"]))
        vlm_tower = vaudio.AudioEncoder(vcfg.AudioConfig(**vkw))
    (tower, embed), impls, weights = build_pair(AudioModel(cfg), cfg.output_proj_dims, text_hidden,
                                                cfg.rms_norm_eps, dtype, (2, 3), vlm_tower)

    fe = AudioFeatureExtractor()
    cases = [(s, fd) for s in args.audio_seconds for fd in args.audio_feature_dtype]
    for seconds, feature_dtype in cases:
        wave = (0.1 * np.random.default_rng(int(seconds)).standard_normal(int(seconds * fe.sampling_rate)))
        inp = fe([wave.astype(np.float32)])
        feats_np, mask_np = inp["input_features"], inp["input_features_mask"].astype(bool)
        feats, mask = mx.array(feats_np), mx.array(mask_np)
        if feature_dtype == "model":  # the processor gives float32; this casts it to the weights' dtype first
            feats = feats.astype(dtype)
        fns = {"ours": lambda: encode_audio(tower, embed, feats, mask)}
        if "mlx-vlm" in impls:
            vt, ve = impls["mlx-vlm"]
            inv = ~mask  # mlx-vlm's mask marks padding

            def vlm_fn(vt=vt, ve=ve, inv=inv):
                enc, m = vt(feats, inv)
                return ve(enc), m

            fns["mlx-vlm"] = vlm_fn
        res, outs = timed(fns, args.runs)
        extra = dict(seconds=seconds, feature_frames=list(feats_np.shape[:2]),
                     soft_tokens=int(sum(inp["num_soft_tokens_per_audio"])), out_shape=list(outs["ours"].shape),
                     feature_dtype=str(feats.dtype), dtype=args.dtype, device=str(mx.default_device()))
        if "mlx-vlm" in outs:
            emb, m = outs["mlx-vlm"]
            keep = np.flatnonzero(~np.array(m).reshape(-1))
            extra.update(compare_outputs(outs["ours"], emb.reshape(-1, emb.shape[-1])[mx.array(keep, dtype=mx.int32)]))
        case = f"{seconds:g} s" + ("" if feature_dtype == "float32" else f", features {args.dtype}")
        report(rows, "audio", case, res, weights, extra)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["e4b", "12b"], default="e4b",
                   help="e4b: the vision and audio towers; 12b: gemma4_unified's image and audio embedders with "
                        "the processors (benchmarks/towers_12b.py)")
    p.add_argument("--tower", choices=["vision", "audio", "both"], default="both")
    p.add_argument("--compare", choices=["mlx-vlm"], default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test), same inputs")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--vision-tokens", type=int, nargs="+", default=[280, 1120])
    p.add_argument("--audio-seconds", type=float, nargs="+", default=[5.0, 30.0])
    p.add_argument("--audio-feature-dtype", nargs="+", choices=["float32", "model"], default=["float32"],
                   help="float32: the processor's features as they come (the activations then run in float32 "
                        "in both implementations); model: cast to --dtype first")
    p.add_argument("--image-width", type=int, default=1024)
    p.add_argument("--image-height", type=int, default=768)
    p.add_argument("--vlm-root", default=None, help="directory holding the mlx_vlm package (default: installed)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    rows: list[dict] = []
    print(json.dumps(dict(mlx=mx.__version__, device=str(mx.default_device()), model=args.model, tiny=args.tiny,
                          dtype=args.dtype, runs=args.runs)), flush=True)
    if args.model == "12b":
        from benchmarks import towers_12b

        vision, audio = towers_12b.bench_image, towers_12b.bench_audio
    else:
        vision, audio = bench_vision, bench_audio
    if args.tower in ("vision", "both"):
        vision(args, dtype, rows)
    if args.tower in ("audio", "both"):
        audio(args, dtype, rows)
    print("\n| tower | case | impl | median ms | peak GB | ratio vs mlx-vlm | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tower']} | {r['case']} | {r['impl']} | {r['median_ms']} | {r['peak_gb']} | "
              f"{r.get('ratio_vs_mlx_vlm', '')} | {r.get('max_abs_diff', r.get('host_max_abs_diff', ''))} |")
    return rows


if __name__ == "__main__":
    main()
