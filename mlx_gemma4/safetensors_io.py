"""safetensors without loading files whole: the one header reader, the one dtype table, a row-chunk reader and
a writer whose layout is fixed up front.

The loader maps whole files with ``mx.load``; the converter reads source tensors in row chunks at the offsets the
header gives and writes its output the same way, so no tensor is ever whole in memory; the PLE table is read
through numpy memory maps (ple.py). Format: 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {str: str}}``, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import mlx.core as mx
import numpy as np

from .errors import WeightsError

# safetensors dtype -> (its MLX dtype, the numpy dtype its bytes are read as). numpy has no bfloat16: its bytes
# are read as uint16 and viewed as bfloat16 in MLX. MLX cannot hold float64 (None): the converter reads it with
# numpy and casts it; the loader refuses it.
DTYPES: dict[str, tuple[mx.Dtype | None, type]] = {
    "F64": (None, np.float64), "F32": (mx.float32, np.float32), "F16": (mx.float16, np.float16),
    "BF16": (mx.bfloat16, np.uint16), "I64": (mx.int64, np.int64), "I32": (mx.int32, np.int32),
    "I16": (mx.int16, np.int16), "I8": (mx.int8, np.int8), "U64": (mx.uint64, np.uint64),
    "U32": (mx.uint32, np.uint32), "U16": (mx.uint16, np.uint16), "U8": (mx.uint8, np.uint8),
    "BOOL": (mx.bool_, np.bool_),
}
ST_NAME = {mlx: name for name, (mlx, _) in DTYPES.items() if mlx is not None}   # MLX dtype -> safetensors name
DOWNLOAD_AGAIN = "The file is corrupt or truncated: download it again."


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live."""

    file: Path
    offset: int                 # absolute byte offset of its data in the file
    dtype: str                  # safetensors spelling ("BF16")
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return np.dtype(DTYPES[self.dtype][1]).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def mlx_dtype(self) -> mx.Dtype:
        """The dtype its rows come out of ``read_rows`` in (float64 comes out as float32)."""
        return DTYPES[self.dtype][0] or mx.float32

    def chunks(self, rows: int) -> Iterator[mx.array]:
        return read_rows(self, rows)


class TensorSource(Protocol):
    """A named source tensor as the converter reads it: its shape, size, the dtype of its chunks, and its rows in
    chunks along axis 0. TensorInfo reads them from a safetensors file; a benchmark may generate them instead."""

    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...

    @property
    def mlx_dtype(self) -> mx.Dtype: ...

    def chunks(self, rows: int) -> Iterator[mx.array]: ...


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path, remedy: str = DOWNLOAD_AGAIN) -> Header:
    """Parse and check a safetensors header: every tensor has a known dtype, its byte range matches its shape,
    and the file holds every byte the header promises. ``remedy`` ends every error message."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        tensors = {name: _tensor_info(path, 8 + n, name, info) for name, info in header.items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise WeightsError(f"Cannot read {path}: {e}. {remedy}") from e
    end = max((t.offset + t.nbytes for t in tensors.values()), default=0)
    if end > size:
        raise WeightsError(f"{path} is truncated ({size} bytes, its header needs {end}). {remedy}")
    return Header(tensors, metadata)


def _tensor_info(path: Path, base: int, name: str, info: dict) -> TensorInfo:
    dtype = info["dtype"]
    if dtype not in DTYPES:
        raise WeightsError(
            f"{path}: tensor {name} is stored as {dtype}, a dtype mlx-gemma4 does not read. Save the checkpoint "
            "in float32, float16 or bfloat16 (e.g. with transformers' save_pretrained) and use that copy.")
    shape = tuple(int(d) for d in info["shape"])
    start, end = (int(o) for o in info["data_offsets"])
    itemsize = np.dtype(DTYPES[dtype][1]).itemsize
    if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != math.prod(shape) * itemsize:
        raise ValueError(f"tensor {name}: byte range {start}..{end} does not fit its shape {list(shape)} ({dtype})")
    return TensorInfo(path, base + start, dtype, shape)


def read_rows(t: TensorInfo, rows: int) -> Iterator[mx.array]:
    """Chunks of ``rows`` rows (along axis 0) of one tensor, read with plain file reads (nothing stays mapped)."""
    np_dtype = DTYPES[t.dtype][1]
    count = t.shape[0] if t.shape else 1
    try:
        fh = open(t.file, "rb")
    except OSError as e:
        raise WeightsError(f"Cannot read {t.file}: {e}. Check the file's permissions, or download it again.") from e
    with fh:
        fh.seek(t.offset)
        for r0 in range(0, count, rows):
            shape = (min(rows, count - r0), *t.shape[1:]) if t.shape else ()
            buf = np.empty(shape, dtype=np_dtype)
            try:
                n = fh.readinto(memoryview(buf.reshape(-1)).cast("B"))
            except OSError as e:
                raise WeightsError(f"Reading {t.file} failed: {e}. Check the disk, or download it again.") from e
            if n != buf.nbytes:
                raise WeightsError(f"{t.file} ended inside a tensor; the file is truncated. Download it again.")
            if t.dtype == "F64":
                buf = buf.astype(np.float32)
            a = mx.array(buf)
            yield a.view(mx.bfloat16) if t.dtype == "BF16" else a
            del buf, a


class TensorFileWriter:
    """A safetensors file whose layout (names, dtypes, shapes) is fixed up front; tensors are then written in row
    chunks, in any order, straight to their place in the file."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[mx.Dtype, tuple[int, ...]]],
                 metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        self.row_bytes: dict[str, int] = {}
        pos = 0
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * dtype.size
            header[name] = {"dtype": ST_NAME[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name] = pos
            self.row_bytes[name] = nbytes // shape[0] if shape and shape[0] else nbytes
            pos += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.base = 8 + len(blob)
        self.size = self.base + pos
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.fh.truncate(self.size)

    def write_rows(self, name: str, row0: int, value: mx.array) -> None:
        if value.dtype == mx.bfloat16:
            value = value.view(mx.uint16)
        self.fh.seek(self.base + self.offsets[name] + row0 * self.row_bytes[name])
        self.fh.write(memoryview(np.ascontiguousarray(value).reshape(-1)).cast("B"))

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save(path: str | Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """Write whole tensors through the same writer (evaluated first: they may be mapped from ``path`` itself)."""
    mx.eval(*tensors.values())
    with TensorFileWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata) as out:
        for k, v in tensors.items():
            out.write_rows(k, 0, v)
