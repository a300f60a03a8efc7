"""Streaming conversion of a Hugging Face Gemma 4 checkpoint into an MLX directory (what convert.py runs).

One job per parameter (weights.tensor_jobs: its checkpoint sources and layout fix), one path for every job: read
the sources in row chunks straight from the files (or from any other TensorSource handed in), cast or quantize each
chunk (quantize.recipe decides), and write it to its place in an output file whose layout was fixed before anything
was written. Quantization groups run along rows, so chunking changes no value. Peak memory is about one chunk
(``CHUNK_BYTES``), whatever the size of the model. The per-layer embedding table goes to its own file (ple.py).
Everything is written into a marked temp dir beside the destination and renamed into place at the end
(destination.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx
from mlx.utils import tree_flatten

from .assistant import Assistant, AssistantConfig, assistant_jobs, assistant_recipe, is_assistant_dir
from .config import ModelConfig
from .destination import (check_destination, check_not_source, replace, resolve_destination, temp_output,
                          write_marker)
from .errors import ConfigError, OutputError
from .ple import PLE_FILE, open_table
from .quantize import PLE, idle_part_flags, plan, quantize_weight, recipe
from .safetensors_io import TensorFileWriter, TensorSource, read_header
from .weights import (TensorJob, build_model, check_names, drop_absent_towers, safetensors_files, shapes,
                      tensor_jobs)

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 * 1024**3
# Source tensors are read in row chunks of about this size: the E2B/E4B PLE table (4.7 / 5.6 GB in bfloat16,
# 9.4 GB once cast to float32 for quantizing) and the token embedding are never whole in memory.
CHUNK_BYTES = 256 * 1024**2
# Tokenizer, processor, chat template and generation settings: copied as they are.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json", "video_preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")   # one of them: what load() reads the tokenizer from
INDEX = "model.safetensors.index.json"

Progress = Callable[[int, int, str], None]
Specs = dict[str, tuple[mx.Dtype, tuple[int, ...]]]


def default_mlx_path(hf_path: str, bits: int | None, dtype: str) -> Path:
    local = Path(str(hf_path)).expanduser()
    # a local folder by its real name: "." or ".." has none of its own (it gave "models/-4bit")
    name = local.resolve().name if local.exists() else Path(str(hf_path).rstrip("/")).name
    return Path("models") / (f"{name}-{bits}bit" if bits else f"{name}-{dtype}")


@dataclass
class _Step:
    """One job with what it reads and writes: ``outputs`` maps each tensor it makes (our name) to its
    (file, name in that file)."""

    job: TensorJob
    sources: list[TensorSource]
    convert: Callable[[mx.array], dict[str, mx.array]]
    specs: Specs
    outputs: dict[str, tuple[str, str]]

    @property
    def rows(self) -> int:
        """Rows per chunk: about CHUNK_BYTES of source."""
        n = self.sources[0].shape[0] if self.sources[0].shape else 1
        row_bytes = sum(s.nbytes for s in self.sources) // max(n, 1)
        return max(1, CHUNK_BYTES // max(row_bytes, 1))

    def run(self, files: dict[str, TensorFileWriter]) -> None:
        row0 = 0
        for parts in zip(*(s.chunks(self.rows) for s in self.sources)):
            out = self.convert(self.job(list(parts)))
            mx.eval(*out.values())
            for name, value in out.items():
                file, key = self.outputs[name]
                files[file].write_rows(key, row0, value)
            row0 += parts[0].shape[0] if parts[0].ndim else 1
            del out, parts


def _converter(name: str, decisions: dict[str, tuple[int, int]], dtype: mx.Dtype):
    """Chunk -> the tensors it becomes: the packed weight, scales and biases, or the chunk cast to ``dtype``."""
    module = name.rsplit(".", 1)[0]
    if name.endswith(".weight") and module in decisions:
        bits, group = decisions[module]
        keys = (name, f"{module}.scales", f"{module}.biases")
        return lambda v: dict(zip(keys, quantize_weight(v, bits, group, dtype)))
    return lambda v: {name: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v}


def _probe(step_sources: list[TensorSource], job: TensorJob, convert) -> tuple[tuple[int, ...], Specs]:
    """(the job's output shape, every tensor it writes -> (dtype, shape)), from one lazy zero row: no data read."""
    first = step_sources[0].shape
    row = [mx.zeros((1, *s.shape[1:]) if s.shape else (), s.mlx_dtype) for s in step_sources]
    value = job(row)
    full = lambda shape: (first[0], *shape[1:]) if first else tuple(shape)  # noqa: E731
    return full(value.shape), {k: (v.dtype, full(v.shape)) for k, v in convert(value).items()}


def _plan_steps(jobs: list[TensorJob], sources: Mapping[str, TensorSource], decisions, dtype: mx.Dtype,
                ple_file: bool, max_shard_bytes: int) -> tuple[list[_Step], dict[str, tuple[int, ...]]]:
    """Steps with their outputs placed: the PLE table in its own file, the rest packed into shards in name order
    (a shard is closed when the next tensor would overflow it), plus each job's output shape."""
    steps, job_shapes = [], {}
    shard, shard_bytes, n_shards = {}, 0, 0
    for job in jobs:
        srcs = [sources[s] for s in job.sources]
        convert = _converter(job.name, decisions, dtype)
        job_shapes[job.name], specs = _probe(srcs, job, convert)
        outputs = {}
        for name, (dt, shape) in specs.items():
            if ple_file and name.rsplit(".", 1)[0] == PLE:
                outputs[name] = (PLE_FILE, name.rsplit(".", 1)[1])
                continue
            nbytes = math.prod(shape) * dt.size
            if shard and shard_bytes + nbytes > max_shard_bytes:
                n_shards, shard, shard_bytes = n_shards + 1, {}, 0
            outputs[name] = (f"shard-{n_shards}", name)
            shard[name] = nbytes
            shard_bytes += nbytes
        steps.append(_Step(job, srcs, convert, specs, outputs))
    return steps, job_shapes


def _open_files(root: Path, steps: list[_Step], ple_meta: tuple) -> dict[str, TensorFileWriter]:
    """Lay out and open every output file; shards get their final names (model.safetensors when one)."""
    layout: dict[str, Specs] = {}
    for step in steps:
        for name, (file, key) in step.outputs.items():
            layout.setdefault(file, {})[key] = step.specs[name]
    shards = sorted((f for f in layout if f != PLE_FILE), key=lambda f: int(f.split("-")[1]))
    final = {f: "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
             for i, f in enumerate(shards)}
    files = {}
    try:
        for f, specs in layout.items():
            if f == PLE_FILE:
                files[f] = open_table(root / PLE_FILE, specs, *ple_meta)
            else:
                files[f] = TensorFileWriter(root / final[f], specs, {"format": "mlx"})
    except BaseException:
        for w in files.values():
            w.close()
        raise
    weight_map = {k: final[f] for f in shards for k in layout[f]}
    total = sum(math.prod(s) * d.size for f in shards for d, s in layout[f].values())
    write_index(root, weight_map, total)
    return files


def write_index(root: Path, weight_map: dict[str, str], total: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor, and the total bytes."""
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX).write_text(json.dumps(index, indent=2))


# What a checkpoint to convert lacks, in a converter's words (load()'s said to convert it with convert.py)
_NO_CONFIG = ("No config.json in {}: --hf-path takes a Hugging Face Gemma 4 checkpoint (a folder with config.json and "
              "its *.safetensors files) or a hub id like google/gemma-4-e4b-it.")
_NO_WEIGHTS = ("the download did not finish, or the weights are in another folder. Download the checkpoint again, or "
               "pass the folder that holds them.")


def convert(
    hf_path: str | Path,
    mlx_path: str | Path | None = None,
    q_bits: int | None = None,
    q_group_size: int = 64,
    dtype: str = "bfloat16",
    force: bool = False,
    ple_bits: int | None = None,
    tower_bits: int | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Progress | None = None,
    tensors: Mapping[str, TensorSource] | None = None,
    **hub_kwargs,
) -> Path:
    """Convert ``hf_path`` (local dir or hub id) into ``mlx_path``; returns the destination (absolute).

    ``tensors`` (name -> TensorSource) stands in for the checkpoint's safetensors files, which ``hf_path`` then
    need not have: it still gives config.json and the tokenizer files. The benchmarks convert generated weights
    this way without writing them to disk first. ``ple_bits`` / ``tower_bits``: bits of the PLE table / the
    towers' encoder layers when quantizing (None: 8; 0: kept in ``dtype``); given for a model without those parts,
    a warning says they change nothing."""
    from .hub import check_source, resolve

    check_source(hf_path, "--hf-path")
    if mlx_path is not None and (not isinstance(mlx_path, (str, os.PathLike)) or not str(mlx_path).strip()):
        raise OutputError(f"--mlx-path {mlx_path!r:.60} is not a folder to write to; pass one, or leave --mlx-path "
                          "out for models/<name>-<bits>bit (is a shell variable unset?).")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ConfigError(f"The shard size must be a whole number of bytes >= 1; got {max_shard_bytes!r}.")
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported; choose one of {sorted(OUTPUT_DTYPES)}.")
    dst = resolve_destination(mlx_path or default_mlx_path(str(hf_path), q_bits, dtype))
    local = Path(hf_path).expanduser()
    if local.exists():
        check_not_source(dst, local)
    check_destination(dst, force)
    src = resolve(hf_path, **hub_kwargs)
    check_not_source(dst, src)    # a hub snapshot: known only now
    if not (src / "config.json").is_file():
        raise ConfigError(_NO_CONFIG.format(src))
    drafter = is_assistant_dir(src)   # an assistant drafter for speculative decoding (assistant.py)
    config = AssistantConfig.from_file(src) if drafter else ModelConfig.from_file(src)
    if config.quantization:
        raise ConfigError(f"{src} is already quantized; convert the original (unquantized) checkpoint instead.")
    if tensors is not None:
        sources = dict(tensors)
    else:
        sources = {k: v for f in safetensors_files(src, _NO_WEIGHTS) for k, v in read_header(f).tensors.items()}
    if not drafter:
        # An earlier output of ours: the PLE table has a file of its own.
        if tensors is None and (src / PLE_FILE).is_file():
            sources.update({f"{PLE}.{k}": v for k, v in read_header(src / PLE_FILE).tensors.items()})
        config = drop_absent_towers(config, sources)   # mlx-lm's text-only conversions
    # Parameters stay lazy (never evaluated): used for names, shapes and the recipe.
    model = Assistant(config) if drafter else build_model(config)
    quant = None
    if q_bits:
        for flag in idle_part_flags(model, ple_bits, tower_bits):
            logger.warning("%s changes nothing: %s has no %s.", flag, src.name or src,
                           "per-layer embedding table" if flag == "--ple-bits" else "vision or audio encoder layers")
        quant = assistant_recipe(model, q_bits, q_group_size) if drafter else \
            recipe(model, q_bits, q_group_size, 8 if ple_bits is None else ple_bits,
                   8 if tower_bits is None else tower_bits)
    decisions = plan(model, quant)

    jobs = assistant_jobs(sources, config) if drafter else tensor_jobs(sources, config, model)
    ple_file = bool(config.text_config.hidden_size_per_layer_input)
    steps, job_shapes = _plan_steps(jobs, sources, decisions, OUTPUT_DTYPES[dtype], ple_file, max_shard_bytes)
    # Fail before writing anything when the checkpoint does not match its config (same rules as loading).
    check_names(shapes(dict(tree_flatten(model.parameters()))), job_shapes)
    ple_meta = ()
    if ple_file:   # (embed_scale, dims, bits, group_size) for the PLE file's metadata
        ple_meta = (model.language_model.ple_scale, job_shapes[f"{PLE}.weight"][-1],
                    *decisions.get(PLE, (0, 0)))
    needed = sum(math.prod(s) * d.size for step in steps for d, s in step.specs.values())
    _check_space(dst, needed)

    try:
        with temp_output(dst) as tmp:
            files = _open_files(tmp, steps, ple_meta)
            try:
                for i, step in enumerate(steps):
                    step.run(files)
                    if progress is not None:
                        progress(i + 1, len(steps), step.job.name)
            finally:
                for w in files.values():
                    w.close()
            write_config(tmp, config, quant, dtype)
            _copy_side_files(src, tmp, needs_tokenizer=not drafter)
            write_marker(tmp, state="complete", source=str(hf_path), q_bits=q_bits, dtype=dtype,
                         files=sorted(p.name for p in tmp.iterdir()))
            replace(tmp, dst, force)
    except OSError as e:
        raise OutputError(
            f"Writing the conversion to {dst} failed: {e.strerror or e}. Free some space (it needs about "
            f"{_size(needed)}) or fix the folder's permissions, or pick another --mlx-path; the partial "
            "output was removed.") from e
    logger.info("Wrote %s (%.1f MB)", dst, sum(f.stat().st_size for f in dst.iterdir()) / 1e6)
    return dst


def _check_space(dst: Path, needed: int) -> None:
    parent = next(p for p in (dst, *dst.parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise OutputError(f"The conversion needs about {_size(needed)} but {parent} has {_size(free)} free. Free "
                          "some space or pick an --mlx-path on another disk.")


def _size(n: int) -> str:
    """Bytes in words, precise enough to tell a need from what is free ("0.0 GB" said nothing)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def write_config(root: Path, config: ModelConfig, quant: dict | None, dtype: str) -> None:
    """config.json of a converted model: the source's, with our quantization and format keys."""
    raw = dict(config.raw)
    raw.pop("quantization_config", None)
    if quant:
        raw["quantization"] = quant
    raw["mlx_gemma4"] = {"format_version": 1, "dtype": dtype,
                         "ple_file": PLE_FILE if (root / PLE_FILE).exists() else None}
    (root / "config.json").write_text(json.dumps(raw, indent=2))


def missing_tokenizer(hf_path: str | Path) -> Path | None:
    """A local checkpoint folder (with its config.json; not a drafter's, which uses its model's tokenizer) without
    tokenizer files, or None (a hub repo id: its files are known once downloaded)."""
    from .assistant import is_assistant_dir

    path = Path(hf_path).expanduser()
    if not str(hf_path).strip() or not (path / "config.json").is_file() or is_assistant_dir(path):
        return None   # (what else is wrong with it, convert() says)
    return None if any((path / n).is_file() for n in TOKENIZER_FILES) else path


def _copy_side_files(src: Path, root: Path, needs_tokenizer: bool = True) -> None:
    """The tokenizer, chat template and processor files beside the weights (a drafter uses its model's: it needs
    none of its own)."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, root / name)
    if needs_tokenizer and not any((root / n).exists() for n in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files; load() will refuse the converted model until tokenizer.json "
                       "is copied into it.", src)
