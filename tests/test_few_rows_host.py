"""The few-rows CUDA-core kernel's source (mlx_gemma4/few_rows.py ``_SOURCE``), run on the host: each warp's 32 lanes
as threads, the CUDA built-ins they use written in C++ (a warp shuffle is a barrier-synchronised exchange), so the
kernel's arithmetic, bounds and tails are checked here against NumPy before a GPU ever runs them. Inputs in bfloat16
(a 16-bit struct as CUDA's, rounded to nearest even) and float32, aligned and not (the scalar-load branch), output
rows that leave a warp and a block part-filled."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_gemma4 import few_rows
from tests import host_cuda

HARNESS = r"""
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim;
static float slots[32];
static std::barrier<>* warp_barrier;
inline float __int_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __shfl_xor_sync(unsigned, float v, int off) {
    slots[threadIdx.x] = v;
    warp_barrier->arrive_and_wait();
    const float r = slots[threadIdx.x ^ off];
    warp_barrier->arrive_and_wait();
    return r;
}
typedef TYPE T;
constexpr int M = ROWS_IN, K = WIDTH, G = GROUP, R = ROWS_PER_WARP, W = WARPS;
static int w_shape[2];
void kernel(const T* x, const uint32_t* w, const T* scales, const T* biases, T* out) {
SOURCE
}
template <typename U> std::vector<U> read(const char* path, size_t n, size_t shift) {
    std::vector<U> v(n + shift);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(v.data() + shift, sizeof(U), n, f) != n) { std::perror(path); std::exit(2); }
    std::fclose(f);
    return v;
}
int main(int argc, char** argv) {
    const int N = std::atoi(argv[1]);
    const size_t shift = std::atoi(argv[2]);   // 1: inputs one element off 16-byte alignment
    w_shape[0] = N; w_shape[1] = K / 8;
    auto x = read<T>("x.bin", (size_t)M * K, shift);
    auto w = read<uint32_t>("w.bin", (size_t)N * K / 8, 0);
    auto s = read<T>("s.bin", (size_t)N * K / G, 0);
    auto b = read<T>("b.bin", (size_t)N * K / G, 0);
    std::vector<T> out((size_t)M * N, T(0.f));
    blockDim = {32, W, 1};
    const int warps = (N + R - 1) / R, blocks = (warps + W - 1) / W;
    for (int by = 0; by < blocks; ++by)
        for (int ty = 0; ty < W; ++ty) {
            std::barrier<> bar(32);
            warp_barrier = &bar;
            std::vector<std::thread> lanes;
            for (int lane = 0; lane < 32; ++lane)
                lanes.emplace_back([&, lane, by, ty] {
                    threadIdx = {lane, ty, 0};
                    blockIdx = {0, by, 0};
                    kernel(x.data() + shift, w.data(), s.data(), b.data(), out.data());
                });
            for (auto& t : lanes) t.join();
        }
    std::vector<float> o(out.begin(), out.end());
    FILE* f = std::fopen("out.bin", "wb");
    std::fwrite(o.data(), sizeof(float), o.size(), f);
    std::fclose(f);
}
"""


def _run(tmp_path, source: str, dtype: str, m: int, k: int, n: int, r: int, warps: int, shift: int,
         group: int = 64) -> None:
    rng = np.random.default_rng(m * 1000 + k + n + r + shift)
    x = rng.normal(size=(m, k)).astype(np.float32)
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint32)
    scales = (rng.normal(size=(n, k // group)) * 0.05).astype(np.float32)
    biases = (rng.normal(size=(n, k // group)) * 0.1).astype(np.float32)
    if dtype == "bf16":   # what the kernel sees: the inputs rounded to bfloat16
        x, scales, biases = (host_cuda.from_bf16(host_cuda.bf16(a)) for a in (x, scales, biases))
    packed = np.zeros((n, k // 8), dtype=np.uint32)
    for j in range(8):
        packed |= q[:, j::8] << np.uint32(4 * j)
    as_type = host_cuda.bf16 if dtype == "bf16" else (lambda a: a.astype(np.float32))
    for name, a in (("x", x), ("s", scales), ("b", biases)):
        as_type(a).tofile(tmp_path / f"{name}.bin")
    packed.tofile(tmp_path / "w.bin")
    code = (HARNESS.replace("SOURCE", source).replace("TYPE", "bf16" if dtype == "bf16" else "float")
            .replace("ROWS_IN", str(m)).replace("WIDTH", str(k)).replace("GROUP", str(group))
            .replace("ROWS_PER_WARP", str(r)).replace("WARPS", str(warps)))
    out = host_cuda.run(tmp_path, code, n, shift).reshape(m, n)

    dense = (q.reshape(n, k // group, group) * scales[..., None] + biases[..., None]).reshape(n, k)
    ref = x.astype(np.float64) @ dense.T.astype(np.float64)
    tol = 1e-4 * np.abs(ref).max()
    if dtype == "bf16":   # one rounding of the float32 sum to bfloat16
        tol = 2.0 ** -8 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


@pytest.mark.skipif(host_cuda.CXX is None, reason="needs a C++20 compiler (g++ or clang++) to build the host replay")
@pytest.mark.parametrize(("dtype", "m", "k", "n", "r", "warps", "shift"), [
    ("bf16", 1, 2048, 37, 4, 4, 0),    # more 32-weight chunks than lanes; the last warp and block part-filled
    ("bf16", 2, 512, 21, 2, 4, 0),
    ("bf16", 5, 256, 19, 4, 2, 1),     # a verify's rows, inputs off alignment (the scalar loads)
    ("float", 3, 192, 9, 1, 8, 0),     # float32: two 16-byte loads per 8 inputs
    ("float", 8, 128, 11, 2, 4, 1),
])
def test_kernel_source_matches_numpy_on_the_host(tmp_path, dtype, m, k, n, r, warps, shift):
    _run(tmp_path, few_rows._SOURCE, dtype, m, k, n, r, warps, shift)
