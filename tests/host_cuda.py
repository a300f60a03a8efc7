"""What the host replays of our CUDA kernels share (tests/test_few_rows_host.py, tests/test_decode_attention.py):
the C++ the kernel sources need beside CUDA's built-ins (bfloat16 as CUDA stores it, rounded to nearest even;
``dim3``; ``uint4``), bfloat16 bit patterns from NumPy, and building and running one replay."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

CXX = shutil.which("g++") or shutil.which("clang++")

PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
using std::min;
struct uint4 { uint32_t x, y, z, w; };
struct dim3 { int x, y, z; };
struct bf16 {
    uint16_t bits;
    bf16() = default;
    explicit bf16(float f) {
        uint32_t u; std::memcpy(&u, &f, 4);
        bits = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    operator float() const { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
"""


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as the prelude's struct does."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def run(folder: Path, code: str, *args) -> np.ndarray:
    """Build ``PRELUDE + code`` in ``folder`` (where its input files are), run it with ``args``, and return the
    float32 values it wrote to out.bin."""
    (folder / "k.cpp").write_text(PRELUDE + code)
    subprocess.run([CXX, "-std=c++20", "-O1", "-w", "-pthread", "k.cpp", "-o", "k"], cwd=folder, check=True)
    subprocess.run(["./k", *map(str, args)], cwd=folder, check=True)
    return np.fromfile(folder / "out.bin", dtype=np.float32)
