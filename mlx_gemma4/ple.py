"""Per-layer embeddings (PLE) kept off the device: a memory-mapped table read one row per token.

E2B/E4B carry a token-identity table of vocab x (layers * ple_dim) (E4B: 262,144 x 10,752), yet a forward pass
reads one row per token. convert.py writes that table to its own safetensors file (``PLE_FILE``, possibly
quantized); ``MappedPerLayerEmbedding`` maps it with numpy and copies only the rows a call needs into MLX, so the
table never counts as resident model memory (the OS pages rows in and may drop them again).

Where the table lives is decided at load (``choose_placement``): in memory when the machine has room for it,
because a decode step can then gather the next token's row on the device without waiting for the token on the
host (the mapped path must read the sampled token first, which stops MLX from building step n+1 while step n
runs: measured ~25% slower decode on a GPU); memory-mapped otherwise. On Apple silicon, memory is unified: the
mapped table is file-backed pages that macOS can drop and re-read under memory pressure, while the resident
table is wired GPU memory that cannot be paged out.

It stands in for ``TextModel.embed_tokens_per_layer``: a module with no parameters, called with token ids and
returning the rows exactly as the embedding (or its quantized form) would; TextModel applies the scale. The
file's ``embed_scale`` metadata records that scale for readers of the file.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import WeightsError
from .safetensors_io import DTYPES, TensorFileWriter, read_header, save

PLE_FILE = "per_layer_embeddings.safetensors"
_RECONVERT = "Re-convert the model with convert.py."


def memmap_safetensors(path: str | Path) -> tuple[dict[str, np.memmap], dict[str, str], dict[str, str]]:
    """Map every tensor of a safetensors file: (name -> memmap, name -> safetensors dtype, metadata)."""
    header = read_header(path, remedy=_RECONVERT)
    arrays, dtypes = {}, {}
    for name, t in header.tensors.items():
        if DTYPES[t.dtype][0] is None:
            raise WeightsError(f"{path}: {name} is stored as {t.dtype}, which the PLE reader does not handle. "
                               + _RECONVERT)
        arrays[name] = np.memmap(t.file, dtype=DTYPES[t.dtype][1], mode="r", offset=t.offset, shape=t.shape)
        dtypes[name] = t.dtype
    return arrays, dtypes, header.metadata


def _to_mx(rows: np.ndarray, st_dtype: str) -> mx.array:
    a = mx.array(np.ascontiguousarray(rows))
    return a.view(mx.bfloat16) if st_dtype == "BF16" else a


class MappedPerLayerEmbedding(nn.Module):
    """Drop-in for the PLE ``ScaledEmbedding``: gathers rows from the memory-mapped file on each call."""

    def __init__(self, path: str | Path):
        super().__init__()
        arrays, dtypes, meta = memmap_safetensors(path)
        self._arrays, self._dtypes = arrays, dtypes   # plain attributes: not parameters
        self.path = str(path)
        self.embed_scale, self.dims, self.bits, self.group_size = _read_metadata(path, meta)
        self.num_embeddings = _check_table(path, arrays, self.dims, self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def _rows(self, name: str, idx: np.ndarray) -> mx.array:
        return _to_mx(self._arrays[name][idx], self._dtypes[name])

    def __call__(self, ids: mx.array) -> mx.array:
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.bits:
            x = mx.dequantize(self._rows("weight", idx), self._rows("scales", idx), self._rows("biases", idx),
                              group_size=self.group_size, bits=self.bits)
        else:
            x = self._rows("weight", idx)
        return x.reshape(*ids.shape, self.dims)                              # (B, L, layers * ple_dim)

    def load_table(self) -> dict[str, mx.array]:
        """The whole table as MLX arrays (the in-memory path, for tests and for callers that want it resident)."""
        return {k: _to_mx(v, self._dtypes[k]) for k, v in self._arrays.items()}


def _read_metadata(path, meta: dict[str, str]) -> tuple[float, int, int, int]:
    """(embed_scale, dims, bits, group_size) from the file's metadata, each checked."""
    try:
        scale = float(meta["embed_scale"])
        dims, bits, group = int(meta["dims"]), int(meta.get("bits", 0)), int(meta.get("group_size", 0))
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{path} has unreadable metadata ({type(e).__name__}: {e}). {_RECONVERT}") from e
    if not (math.isfinite(scale) and dims > 0 and bits in (0, 2, 3, 4, 5, 6, 8)
            and (bits == 0 or (group > 0 and dims % group == 0))):
        raise WeightsError(f"{path} has inconsistent metadata (embed_scale {scale}, dims {dims}, bits {bits}, "
                           f"group_size {group}). {_RECONVERT}")
    return scale, dims, bits, group


def _check_table(path, arrays: dict[str, np.ndarray], dims: int, bits: int, group: int) -> int:
    """The table's row count, after checking its tensors have the shapes its metadata implies."""
    if "weight" not in arrays or arrays["weight"].ndim != 2:
        raise WeightsError(f"{path} has no 2-D 'weight' tensor. {_RECONVERT}")
    rows = arrays["weight"].shape[0]
    want = {"weight": (rows, dims)}
    if bits:
        want = {"weight": (rows, dims * bits // 32), "scales": (rows, dims // group), "biases": (rows, dims // group)}
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    if got != want:
        raise WeightsError(f"{path} holds tensors {got} but its metadata (dims {dims}, bits {bits}) implies {want}. "
                           + _RECONVERT)
    return rows


def table_metadata(embed_scale: float, dims: int, bits: int = 0, group_size: int = 0) -> dict[str, str]:
    """The PLE file's safetensors metadata (what MappedPerLayerEmbedding reads back)."""
    return {"embed_scale": repr(float(embed_scale)), "dims": str(dims), "bits": str(bits),
            "group_size": str(group_size), "format": "mlx"}


def open_table(path: str | Path, specs: dict[str, tuple[mx.Dtype, tuple[int, ...]]], embed_scale: float,
               dims: int, bits: int = 0, group_size: int = 0) -> TensorFileWriter:
    """The PLE file laid out for ``weight`` (and, when quantized, ``scales`` / ``biases``), to be written in row
    chunks: the table is never whole in memory while converting."""
    return TensorFileWriter(path, specs, table_metadata(embed_scale, dims, bits, group_size))


def save_table(path: str | Path, tensors: dict[str, mx.array], embed_scale: float, dims: int,
               bits: int = 0, group_size: int = 0) -> None:
    """Write a whole (evaluated) PLE table as its own file."""
    save(path, tensors, table_metadata(embed_scale, dims, bits, group_size))


@dataclass(frozen=True)
class Placement:
    """Where the PLE table lives and why (``str()`` is the one-line report)."""

    mapped: bool
    reason: str

    def __str__(self) -> str:
        return f"{'memory-mapped' if self.mapped else 'in memory'} ({self.reason})"


# Keep the table in memory only if weights + table stay under this share of the memory budget, which leaves room
# for the KV cache, activations and the rest of the system.
RESIDENT_SHARE = 0.6


def memory_budget() -> tuple[int, str] | None:
    """Bytes the model may use on this machine's default device, and where the figure comes from."""
    try:
        info = mx.device_info()
    except Exception:
        info = {}
    for key in ("max_recommended_working_set_size", "free_memory", "total_memory", "memory_size"):
        value = info.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return int(value), f"device {key.replace('_', ' ')}"
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available system memory"
        except OSError:
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return None


def choose_placement(table_bytes: int, weight_bytes: int, mapped: bool | None = None) -> Placement:
    """In memory when ``weights + table <= RESIDENT_SHARE * budget`` (fastest decode), else memory-mapped;
    ``mapped`` True / False forces the choice."""
    gb = 1e9
    if mapped is not None:
        return Placement(bool(mapped), "as asked")
    budget = memory_budget()
    if budget is None:
        return Placement(True, "free memory unknown")
    limit, source = budget
    need = table_bytes + weight_bytes
    fits = need <= RESIDENT_SHARE * limit
    return Placement(not fits, f"weights + table {need / gb:.2f} GB {'<=' if fits else '>'} "
                               f"{RESIDENT_SHARE:.0%} of {limit / gb:.1f} GB {source}")
