"""Reading checkpoints: safetensors files (single or sharded), the name map, strict loading.

The name map is a table (``WEIGHT_MAP``): a checkpoint name pattern maps to ours, or to None when the model never
uses it. ``UNUSED`` lists our names that a given config has no use for (a tied ``lm_head``, absent towers, the K/V
projections that published checkpoints still carry for KV-shared layers). ``tensor_jobs`` turns a checkpoint's
names into one job per parameter (its sources and layout fix); the loader runs the jobs on lazily mapped arrays,
the converter on row chunks read from the files.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import ConfigError, WeightsError, preview
from .ple import PLE_FILE, MappedPerLayerEmbedding, choose_placement
from .quantize import PLE
from .safetensors_io import DTYPES, read_header

logger = logging.getLogger(__name__)

# Checkpoint name -> ours. ``{}`` is a layer index, ``{*}`` the rest of the name; the first match wins.
WEIGHT_MAP: dict[str, str | None] = {
    # transformers' Gemma4ForConditionalGeneration (save_pretrained and the published checkpoints)
    "model.language_model.layers.{}.experts.gate_up_proj": "language_model.layers.{}.experts.gate_up_proj.weight",
    "model.language_model.layers.{}.experts.down_proj": "language_model.layers.{}.experts.down_proj.weight",
    "model.language_model.{*}": "language_model.{*}",
    "model.vision_tower.{*}": "vision_tower.{*}",
    # gemma4_unified (12B): the published names (vision_embedder.*, embed_vision.embedding_projection) and
    # transformers' in-memory ones (everything under embed_vision, the projection as multimodal_embedder)
    "model.vision_embedder.{*}": "vision_embedder.{*}",
    "model.embed_vision.patch_{*}": "vision_embedder.patch_{*}",
    "model.embed_vision.pos_{*}": "vision_embedder.pos_{*}",
    "model.embed_vision.multimodal_embedder.{*}": "embed_vision.{*}",
    "model.embed_vision.{*}": "embed_vision.{*}",
    "model.audio_tower.{*}": "audio_tower.{*}",
    "model.embed_audio.{*}": "embed_audio.{*}",
    # transformers' Gemma4ForCausalLM (model_type gemma4_text): the decoder is the whole model
    "model.layers.{}.experts.gate_up_proj": "language_model.layers.{}.experts.gate_up_proj.weight",
    "model.layers.{}.experts.down_proj": "language_model.layers.{}.experts.down_proj.weight",
    "model.{*}": "language_model.{*}",
    # mlx-vlm conversions (the mlx-community repos); their MoE experts are merged by tensor_jobs
    "language_model.model.{*}": "language_model.{*}",
    # ours, and everything else: as is (an unknown name is reported by the strict load)
    "{*}": "{*}",
}

# Our names that a config has no use for: pattern -> (config, layer index or None) -> True to drop.
UNUSED: dict[str, Callable[[ModelConfig, int | None], bool]] = {
    "lm_head.{*}": lambda c, _: c.tied_head,                           # the tied head is the token embedding
    "vision_tower.{*}": lambda c, _: c.vision_config is None,
    "vision_embedder.{*}": lambda c, _: c.vision_embedder_config is None,
    "embed_vision.{*}": lambda c, _: not c.takes_images,
    "audio_tower.{*}": lambda c, _: c.audio_config is None,
    "embed_audio.{*}": lambda c, _: not c.takes_audio,
    **{f"language_model.layers.{{}}.self_attn.{p}.{{*}}": lambda c, i: _kv_shared(c, i)
       for p in ("k_proj", "v_proj", "k_norm", "v_norm")},
}


def _kv_shared(config: ModelConfig, i: int | None) -> bool:
    t = config.text_config
    return i is not None and i < t.num_hidden_layers and t.is_kv_shared(i)


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{\}", r"(?P<layer>\d+)").replace(r"\{\*\}", r"(?P<rest>.+)")
    return re.compile(f"^{rx}$")


_MAP = [(_compile(k), v) for k, v in WEIGHT_MAP.items()]
_UNUSED = [(_compile(k), f) for k, f in UNUSED.items()]


def map_name(name: str, config: ModelConfig) -> str | None:
    """Our parameter name for a checkpoint tensor name, or None to drop it."""
    for rx, target in _MAP:
        m = rx.match(name)
        if m:
            break
    if target is None:
        return None
    groups = m.groupdict()
    new = target.replace("{}", groups.get("layer") or "").replace("{*}", groups.get("rest") or "")
    for rx, unused in _UNUSED:
        m = rx.match(new)
        if m and unused(config, int(m["layer"]) if m.groupdict().get("layer") else None):
            return None
    return new


@dataclass(frozen=True)
class TensorJob:
    """How one of our parameters is made from the checkpoint: its sources, concatenated along the second-to-last
    axis when there are several (mlx-vlm's separate gate/up experts), then a layout fix. Neither step touches
    axis 0, so a job runs on row chunks as well as on whole tensors."""

    name: str
    sources: tuple[str, ...]
    fix: Callable[[mx.array], mx.array] | None = None

    def __call__(self, parts: list[mx.array]) -> mx.array:
        x = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)
        return self.fix(x) if self.fix is not None else x


def tensor_jobs(names: Iterable[str], config: ModelConfig, model: nn.Module | None = None,
                hf_layout: bool = True) -> list[TensorJob]:
    """One job per parameter the checkpoint provides, sorted by our name.

    ``hf_layout=False`` for MLX-written checkpoints (ours, mlx-vlm's): their conv weights are already in MLX layout.
    """
    ours = {}
    for name in names:
        new = map_name(name, config)
        if new is not None:
            ours[new] = name
    jobs = {}
    for new, src in ours.items():
        if ".experts.switch_glu.gate_proj." in new:
            prefix, suffix = new.split(".switch_glu.gate_proj.")
            up = ours.get(f"{prefix}.switch_glu.up_proj.{suffix}")
            if up is None:
                raise WeightsError(f"{src} has no matching up_proj tensor. Re-download or re-convert the model.")
            new, sources = f"{prefix}.gate_up_proj.{suffix}", (src, up)
        elif ".experts.switch_glu.up_proj." in new:
            continue
        elif ".experts.switch_glu.down_proj." in new:
            new, sources = new.replace(".switch_glu.down_proj.", ".down_proj."), (src,)
        else:
            sources = (src,)
        tower = getattr(model, "audio_tower", None)
        fix = partial(_audio_layout, tower, new) if hf_layout and new.startswith("audio_tower.") and \
            hasattr(tower, "sanitize") else None
        jobs[new] = TensorJob(new, sources, fix)
    return [jobs[k] for k in sorted(jobs)]


def _audio_layout(tower, name: str, x: mx.array) -> mx.array:
    return tower.sanitize({name: x})[name]


def sanitize(weights: Mapping[str, mx.array], config: ModelConfig, model: nn.Module | None = None,
             hf_layout: bool = True) -> dict[str, mx.array]:
    """Checkpoint tensors -> ours: renamed, unused ones dropped, layouts fixed (runs ``tensor_jobs``)."""
    return {j.name: j([weights[s] for s in j.sources]) for j in tensor_jobs(weights, config, model, hf_layout)}


_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


_NO_WEIGHTS = ("the download or conversion did not finish, or the weights were moved. Download the model again, "
               "or convert it again with convert.py (--force replaces an earlier output).")


def safetensors_files(path: Path, missing: str = _NO_WEIGHTS) -> list[Path]:
    """The checkpoint's safetensors files, checking that every shard the index names exists. ``missing``: what
    the error for a folder without any says of why and what to do (a model to load, by default)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index} is unreadable ({e}). Re-download the checkpoint.") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise WeightsError(
                f"{path} is missing shard(s) {', '.join(missing)} named in model.safetensors.index.json. "
                "The download is incomplete: download it again."
            )
        return [path / n for n in names]
    files = sorted(f for f in path.glob("*.safetensors") if f.name != PLE_FILE)
    if files:
        _check_numbered_shards(path, files)
        return files
    pickles = sorted(f.name for pattern in _PICKLES for f in path.glob(pattern))
    if pickles:
        raise WeightsError(
            f"{path} holds {preview(pickles, 3)} (PyTorch pickle) but no .safetensors files. mlx-gemma4 refuses "
            "pickles: loading one can run arbitrary code. Convert it to safetensors first (in Python: "
            "transformers' from_pretrained, then save_pretrained(DIR, safe_serialization=True)) and use DIR.")
    raise WeightsError(f"No *.safetensors weight files in {path}: {missing}")


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _check_numbered_shards(path: Path, files: list[Path]) -> None:
    """Without an index, shards named ``model-00002-of-00004.safetensors`` still say how many there should be."""
    found: dict[tuple[str, str], set[int]] = {}
    for f in files:
        m = _SHARD.match(f.name)
        if m:
            found.setdefault((m["stem"], m["n"]), set()).add(int(m["i"]))
    missing = [f"{stem}-{i:0{len(n)}d}-of-{n}.safetensors" for (stem, n), have in sorted(found.items())
               for i in range(1, int(n) + 1) if i not in have]
    if missing:
        raise WeightsError(f"{path} is missing shard(s) {preview(missing, 3)} (and has no "
                           "model.safetensors.index.json). The download is incomplete: download it again.")


def read_safetensors(files: Iterable[Path]) -> dict[str, mx.array]:
    """Load every tensor lazily (nothing is read until it is used); truncated files are caught up front."""
    weights: dict[str, mx.array] = {}
    for f in files:
        header = read_header(f)
        f64 = [n for n, t in header.tensors.items() if DTYPES[t.dtype][0] is None]
        if f64:
            raise WeightsError(
                f"{f} stores {len(f64)} tensor(s) in float64 ({preview(f64, 2)}), which MLX cannot load. Convert "
                "the checkpoint with convert.py (it casts them to --dtype) and load the converted directory.")
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with terse messages
            raise WeightsError(f"Cannot read {f}: {e}. The file is corrupt or truncated: download it again.") from e
    return weights


def is_mlx_layout(files: list[Path]) -> bool:
    """MLX writers (ours, mlx-lm, mlx-vlm) tag their safetensors with format=mlx; save_pretrained writes pt."""
    return read_header(files[0]).metadata.get("format") == "mlx"


def check_names(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> None:
    """Raise WeightsError listing missing / unexpected names and shape mismatches (name -> shape on both sides)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {preview(unexpected)}")
    bad_shapes = [
        f"{k}: checkpoint {tuple(v)} vs model {tuple(expected[k])}"
        for k, v in got.items() if k in expected and tuple(v) != tuple(expected[k])
    ]
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} with the wrong shape: {preview(bad_shapes)}")
    if problems:
        raise WeightsError(
            "The weights do not match the config: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights, or re-convert the checkpoint."
        )


def shapes(arrays: Mapping[str, mx.array]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def load_into(model: nn.Module, weights: dict[str, mx.array], strict: bool = True) -> None:
    """Load ``weights`` (our names) into ``model``; list missing / unexpected names and shape mismatches."""
    from mlx.utils import tree_flatten

    if strict:
        check_names(shapes(dict(tree_flatten(model.parameters()))), shapes(weights))
    model.load_weights(list(weights.items()), strict=False)


def build_model(config: ModelConfig):
    """``Gemma4(config)``; sizes that pass validation but cannot be built become a ConfigError."""
    from .model import Gemma4

    try:
        return Gemma4(config)
    except (ValueError, OverflowError, RuntimeError, MemoryError) as e:
        raise ConfigError(f"config.json describes a model that cannot be built ({e}). Check its sizes against "
                          "the published config of this model.") from e


def load_model(path: str | Path, dtype: mx.Dtype | None = None, progress: Callable | None = None,
               mapped_ple: bool | None = None, fuse: bool = True):
    """Build the model for the checkpoint at ``path`` (local dir) and load its weights lazily.

    ``path`` may be our converted dir, an mlx-vlm / mlx-community conversion, or a raw Hugging Face checkpoint
    (loaded as is, unquantized). Quantized modules are read off the packed tensors themselves. A separate PLE
    file (see ple.py) is loaded into memory when ``mapped_ple`` is False, memory-mapped when it is True, and by
    default (None) kept in memory when the machine has room for it (ple.choose_placement), which decodes
    fastest; ``model.ple_placement`` says which was chosen and why. ``fuse`` joins projections that read the same
    input into one matmul each (q/k/v, gate/up: same numbers, fewer kernels per token).
    """
    from .quantize import apply_quantization

    path = Path(path)
    config = ModelConfig.from_file(path)
    files = safetensors_files(path)
    raw = read_safetensors(files)
    config = drop_absent_towers(config, raw)
    model = build_model(config)
    weights = sanitize(raw, config, model, hf_layout=not is_mlx_layout(files))
    ple_path = path / PLE_FILE
    if not ple_path.exists() and (config.raw.get("mlx_gemma4") or {}).get("ple_file"):
        raise WeightsError(f"{path} lacks {PLE_FILE}, which convert.py wrote beside the other files (config.json "
                           "names it). Copy it from where the conversion was made, or convert again.")
    ple = MappedPerLayerEmbedding(ple_path) if ple_path.exists() else None
    placement = None
    if ple is not None:
        _check_ple(ple, model)
        placement = choose_placement(ple.nbytes, sum(v.nbytes for v in weights.values()), mapped_ple)
        mapped_ple = placement.mapped
        logger.info("per-layer embedding table: %s", placement)
        if not mapped_ple:
            weights.update({f"{PLE}.{k}": v for k, v in ple.load_table().items()})
    apply_quantization(model, weights=weights)
    if ple is not None and mapped_ple:
        model.language_model.embed_tokens_per_layer = ple
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_into(model, weights)
    if fuse:
        model.language_model.fuse()
    model.eval()
    model.ple_placement = placement
    if progress is not None:
        progress(1, 1)
    return model


# Our name prefixes of each modality's modules, and the config sections that describe them.
_TOWERS = {
    "vision": (("vision_tower.", "vision_embedder.", "embed_vision."), ("vision_config", "vision_embedder_config")),
    "audio": (("audio_tower.", "embed_audio."), ("audio_config", "audio_embedder_config")),
}


def drop_absent_towers(config: ModelConfig, weights: Iterable[str]) -> ModelConfig:
    """``config`` without the towers of which the checkpoint holds no tensor at all.

    mlx-lm's converter keeps only the text model but copies config.json whole, vision and audio sections included;
    such a checkpoint is a text-only model (it refuses media with an InputError). A tower with some but not all of
    its tensors is still reported by the strict load.
    """
    ours = [n for n in (map_name(n, config) for n in weights) if n is not None]
    drop = {}
    for kind, (prefixes, sections) in _TOWERS.items():
        present = [s for s in sections if getattr(config, s) is not None]
        if present and not any(n.startswith(prefixes) for n in ours):
            logger.info("config.json describes %s input but the checkpoint has no %s weights (a text-only "
                        "conversion, as mlx-lm writes); loading the text model alone", kind, kind)
            drop.update(dict.fromkeys(present))
    return replace(config, **drop) if drop else config


def _check_ple(ple: MappedPerLayerEmbedding, model: nn.Module) -> None:
    table = getattr(model.language_model, "embed_tokens_per_layer", None)
    want = tuple(table.weight.shape) if table is not None else None
    if want != (ple.num_embeddings, ple.dims):
        raise WeightsError(
            f"{ple.path} holds a {ple.num_embeddings} x {ple.dims} per-layer embedding table but config.json "
            f"needs {'none' if want is None else ' x '.join(map(str, want))}. Re-convert the model.")


HUB_KWARGS = {"revision", "cache_dir", "local_files_only"}   # what load() passes on to hub.resolve


def load(path_or_repo: str | Path, progress: Callable | None = None, lazy: bool = True,
         mapped_ple: bool | None = None, **hub_kwargs):
    """``(model, processor)`` for a converted dir, a raw HF checkpoint dir, or a hub repo id.

    ``lazy`` leaves the weights memory-mapped until first use; ``lazy=False`` reads them all now.
    ``mapped_ple``: where E2B/E4B's per-layer embedding table lives (see load_model; default: decided from free
    memory).
    ``hub_kwargs`` (revision, cache_dir, local_files_only) go to huggingface_hub's snapshot_download.
    A directory without tokenizer files raises ConfigError (``load_model`` loads the model alone).
    """
    from .hub import resolve

    _check_load_args(progress=progress, lazy=lazy, mapped_ple=mapped_ple)
    unknown = sorted(set(hub_kwargs) - HUB_KWARGS)
    if unknown:   # (a TypeError from deep inside the hub helper: load(DIR, mapped_pel=True))
        raise ConfigError(f"Unknown argument(s) {unknown}; load takes progress, lazy, mapped_ple and, for the hub, "
                         f"{', '.join(sorted(HUB_KWARGS))}.")
    path = resolve(path_or_repo, **hub_kwargs)
    model = load_model(path, progress=progress, mapped_ple=mapped_ple)
    processor = load_processor(path)
    if not lazy:
        mx.eval(model.parameters())
    return model, processor


def _check_load_args(progress: Any, lazy: Any, mapped_ple: Any) -> None:
    """load()'s settings, checked before anything is read or downloaded."""
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a function (or None); got {type(progress).__name__}.")
    if not isinstance(lazy, bool):
        raise ConfigError(f"lazy must be True or False; got {lazy!r:.60}.")
    if mapped_ple is not None and not isinstance(mapped_ple, bool):
        raise ConfigError(f"mapped_ple must be True (memory-map the per-layer embedding table), False (load it) or "
                          f"None (decide from free memory); got {mapped_ple!r:.60}.")


def load_processor(path: Path):
    """The Processor for the tokenizer and processor files in ``path``."""
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model), so load() cannot build a processor. "
            "Copy the tokenizer files from the original checkpoint into it, or convert again from a checkpoint "
            "that has them.")
    from .processing.processor import Processor

    return Processor.from_pretrained(path)
