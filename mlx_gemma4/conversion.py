"""Streaming conversion of a Hugging Face Gemma 4 checkpoint into an MLX directory (what convert.py runs).

Tensor by tensor: each source tensor is read from the memory-mapped safetensors, renamed and re-laid-out
(weights.sanitize), cast or quantized (quantize.recipe), evaluated, and appended to the current output shard,
which is written once it reaches ``max_shard_bytes``. Peak memory is about one shard plus the largest tensor.
Everything is written into a temporary directory beside the destination and renamed at the end, so an
interrupted run never leaves a half-written destination.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import ConfigError
from .ple import PLE_FILE, save_table, table_metadata
from .quantize import PLE, plan, quantize_weight, recipe
from .weights import check_names, check_safetensors, map_name, read_safetensors, safetensors_files, sanitize

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 * 1024**3
# Tokenizer, processor, chat template and generation settings: copied as they are.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")

Progress = Callable[[int, int, str], None]
# Tensors larger than this are read from the file and converted in row chunks of about this size (quantization
# groups run along rows, so chunking rows changes nothing): the E2B/E4B PLE table (4.7 / 5.6 GB in bfloat16, 9.4 GB
# once cast to float32 for quantizing) and the token embedding are never whole in memory.
CHUNK_BYTES = 256 * 1024**2
_ST_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MX_ST = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


def default_mlx_path(hf_path: str, bits: int | None, dtype: str) -> Path:
    name = Path(str(hf_path).rstrip("/")).name
    return Path("models") / (f"{name}-{bits}bit" if bits else f"{name}-{dtype}")


def _check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise ConfigError(f"{dst} already exists and is not empty. Pass --force to replace it, or pick another "
                          "--mlx-path.")


def _source_index(files: list[Path]) -> dict[str, tuple[Path, int, str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (file, absolute byte offset, safetensors dtype, shape)."""
    out = {}
    for f in files:
        header = check_safetensors(f)
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (f, 8 + n + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
    return out


def _read_rows(src: tuple[Path, int, str, tuple[int, ...]], rows: int) -> Iterator[mx.array]:
    """Row chunks of one checkpoint tensor, read with plain file reads (no mapping: nothing stays resident)."""
    f, offset, st_dtype, shape = src
    with open(f, "rb") as fh:
        fh.seek(offset)
        for r0 in range(0, shape[0], rows):
            n = min(rows, shape[0] - r0)
            buf = np.empty((n, *shape[1:]), dtype=_ST_NP[st_dtype])
            if fh.readinto(buf) != buf.nbytes:
                raise ConfigError(f"{f} ended inside a tensor; the file is truncated. Download it again.")
            a = mx.array(buf)
            yield a.view(mx.bfloat16) if st_dtype == "BF16" else a
            del buf, a


class _StreamingFile:
    """A safetensors file whose layout is fixed up front and whose tensors are written in row chunks."""

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...], int]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        self.offsets, self.row_bytes = {}, {}
        pos = 0
        for name, (st_dtype, shape, itemsize) in specs.items():
            nbytes = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.row_bytes[name] = nbytes // shape[0]
            self.offsets[name] = pos
            pos += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.base = 8 + len(blob)
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.fh.truncate(self.base + pos)

    def write_rows(self, name: str, row0: int, value: mx.array) -> None:
        if value.dtype == mx.bfloat16:
            value = value.view(mx.uint16)
        self.fh.seek(self.base + self.offsets[name] + row0 * self.row_bytes[name])
        self.fh.write(memoryview(np.asarray(value)).cast("B"))

    def close(self) -> None:
        self.fh.close()


class _ShardWriter:
    """Accumulates evaluated tensors and writes a shard whenever the next tensor would overflow it."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, value: mx.array) -> None:
        if self.pending and self.pending_bytes + value.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = value
        self.pending_bytes += value.nbytes
        self.total += value.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        mx.save_safetensors(str(self.root / f"shard-{len(self.shards):05d}.tmp.safetensors"), self.pending,
                            metadata={"format": "mlx"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Give the shards their final names and write the index."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.root / f"shard-{i:05d}.tmp.safetensors").rename(self.root / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert(
    hf_path: str | Path,
    mlx_path: str | Path | None = None,
    q_bits: int | None = None,
    q_group_size: int = 64,
    dtype: str = "bfloat16",
    force: bool = False,
    ple_bits: int | None = 8,
    tower_bits: int | None = 8,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Progress | None = None,
    **hub_kwargs,
) -> Path:
    """Convert ``hf_path`` (local dir or hub id) into ``mlx_path``; returns the destination."""
    from .hub import resolve
    from .model import Gemma4

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported; choose one of {sorted(DTYPES)}.")
    dst = Path(mlx_path) if mlx_path else default_mlx_path(str(hf_path), q_bits, dtype)
    _check_destination(dst, force)
    src = resolve(hf_path, **hub_kwargs)
    config = ModelConfig.from_file(src)
    if config.quantization:
        raise ConfigError(f"{src} is already quantized; convert the original (unquantized) checkpoint instead.")
    model = Gemma4(config)   # parameters stay lazy (never evaluated): used for names, shapes and the recipe
    quant = recipe(model, q_bits, q_group_size, ple_bits, tower_bits) if q_bits else None
    decisions = plan(model, quant)

    files = safetensors_files(src)
    raw = read_safetensors(files)
    weights = sanitize(raw, config, model)
    _check_names(model, weights)
    out_dtype = DTYPES[dtype]
    # Big tensors that sanitize only renamed are converted in row chunks straight from the file.
    index = _source_index(files)
    chunked = {}
    for hf_name, value in raw.items():
        new = map_name(hf_name, config)
        if (new is not None and weights.get(new) is value and value.ndim >= 2 and value.nbytes > CHUNK_BYTES
                and index[hf_name][2] in _ST_NP):
            chunked[new] = index[hf_name]
    del raw
    ple_dims = config.text_config.hidden_size_per_layer_input

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        names = sorted(weights)
        for i, name in enumerate(names):
            value = weights.pop(name)    # drop our reference so the tensor is freed once written
            module = name.rsplit(".", 1)[0]
            quantized = name.endswith(".weight") and module in decisions
            bits, group = decisions[module] if quantized else (0, 0)

            def convert_one(v: mx.array) -> dict[str, mx.array]:
                if quantized:
                    packed, scales, biases = quantize_weight(v, bits, group, out_dtype)
                    return {name: packed, f"{module}.scales": scales, f"{module}.biases": biases}
                return {name: v.astype(out_dtype) if mx.issubdtype(v.dtype, mx.floating) else v}

            is_ple = module == PLE and ple_dims
            if name in chunked:
                src_info = chunked[name]
                shape = src_info[3]
                rows = max(1, CHUNK_BYTES // (int(np.prod(shape[1:])) * np.dtype(_ST_NP[src_info[2]]).itemsize))
                if is_ple:   # straight into its own file, chunk by chunk: never whole in memory
                    probe = convert_one(mx.zeros((1, *shape[1:]), dtype=value.dtype))
                    specs = {k.rsplit(".", 1)[1]: (_MX_ST[v.dtype], (shape[0], *v.shape[1:]), v.dtype.size)
                             for k, v in probe.items()}
                    out = _StreamingFile(tmp / PLE_FILE, specs, table_metadata(
                        model.language_model.embed_tokens_per_layer.embed_scale, shape[-1], bits, group))
                    try:
                        row0 = 0
                        for chunk in _read_rows(src_info, rows):
                            part = convert_one(chunk)
                            mx.eval(*part.values())
                            for k, v in part.items():
                                out.write_rows(k.rsplit(".", 1)[1], row0, v)
                            row0 += chunk.shape[0]
                            del part, chunk
                    finally:
                        out.close()
                    tensors = {}
                else:
                    parts = []
                    for chunk in _read_rows(src_info, rows):
                        part = convert_one(chunk)
                        mx.eval(*part.values())
                        parts.append(part)
                        del chunk
                    tensors = {k: mx.concatenate([p[k] for p in parts]) for k in parts[0]}
                    del parts
                    mx.eval(*tensors.values())
            else:
                tensors = convert_one(value)
                mx.eval(*tensors.values())
                if is_ple:
                    save_table(tmp / PLE_FILE, {k.rsplit(".", 1)[1]: v for k, v in tensors.items()},
                               model.language_model.embed_tokens_per_layer.embed_scale, value.shape[-1], bits,
                               group)
                    tensors = {}
            for k, v in tensors.items():
                writer.add(k, v)
            del value, tensors
            if progress is not None:
                progress(i + 1, len(names), name)
        writer.finish()
        _write_config(tmp, config, quant, dtype)
        _copy_side_files(src, tmp)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote %s (%.1f MB)", dst, sum(f.stat().st_size for f in dst.iterdir()) / 1e6)
    return dst


def _check_names(model, weights: dict[str, mx.array]) -> None:
    """Fail before writing anything when the checkpoint does not match its config (same rules as loading)."""
    check_names(dict(tree_flatten(model.parameters())), weights)


def _write_config(root: Path, config: ModelConfig, quant: dict | None, dtype: str) -> None:
    raw = dict(config.raw)
    raw.pop("quantization_config", None)
    if quant:
        raw["quantization"] = quant
    raw["mlx_gemma4"] = {"format_version": 1, "dtype": dtype,
                         "ple_file": PLE_FILE if (root / PLE_FILE).exists() else None}
    (root / "config.json").write_text(json.dumps(raw, indent=2))


def _copy_side_files(src: Path, root: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, root / name)
    if not any((root / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        logger.warning("%s has no tokenizer files; the converted model will load without a processor.", src)


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished temporary directory into place (the old destination goes only after that succeeds)."""
    tmp.chmod(0o755)   # mkdtemp makes it private
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
