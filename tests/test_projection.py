"""projection: prefill's quantized projections on dequantized weights (the default but on Metal), a slice of
output rows at a time with at most two slices queued; and text.attention's choice of mx.fast for few queries."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_gemma4 import projection, text
from mlx_gemma4.projection import dense_matmuls, project
from tests.helpers import build_4bit, ids_of


def _quantized_linear(n_in=128, n_out=96, bias=False, seed=0):
    mx.random.seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    lin.weight = mx.random.normal((n_out, n_in)) * 0.05
    if bias:
        lin.bias = mx.random.normal((n_out,))
    return nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)


@pytest.mark.parametrize("bias", [False, True])
def test_project_is_the_quantized_matmul_slice_by_slice(monkeypatch, bias):
    lin = _quantized_linear(bias=bias)
    x = mx.random.normal((1, 300, 128))
    monkeypatch.setattr(projection, "SLICE_BYTES", 40 * 128 * 4)   # 40 rows a slice: 3 slices, the last short
    with dense_matmuls():
        out = project(lin, x)
    ref = lin(x)
    assert out.shape == ref.shape == (1, 300, 96)
    assert mx.allclose(out, ref, atol=1e-5, rtol=1e-5).item()


def test_project_outside_or_few_rows_is_the_module_call(monkeypatch):
    lin = _quantized_linear()
    calls = []
    real = mx.dequantize
    monkeypatch.setattr(projection.mx, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    few = mx.random.normal((1, projection.DENSE_FROM_ROWS - 1, 128))
    many = mx.random.normal((1, projection.DENSE_FROM_ROWS, 128))
    project(lin, many)                       # not inside dense_matmuls
    with dense_matmuls():
        project(lin, few)                    # too few rows
        project(nn.Linear(128, 8), many)     # not quantized
    with dense_matmuls(enabled=False):
        project(lin, many)
    assert calls == []
    with dense_matmuls():
        project(lin, many)
    assert calls == [1]


def test_at_most_two_slices_are_queued(monkeypatch):
    """Each slice is queued as it is built and the host then waits for the one before: when slice i is queued,
    every slice before i - 1 has been waited for."""
    lin = _quantized_linear(n_out=128)
    x = mx.random.normal((1, 256, 128))
    monkeypatch.setattr(projection, "SLICE_BYTES", 16 * 128 * 4)   # 8 slices of 16 rows
    queued, waited, order = [], [], []
    real_async, real_eval = mx.async_eval, mx.eval

    def async_eval(*arrays):
        queued.append(arrays[0])
        order.append(("queue", len(queued) - 1))
        return real_async(*arrays)

    def eval_(*arrays):
        i = next(j for j, q in enumerate(queued) if q is arrays[0])
        waited.append(i)
        order.append(("wait", i))
        return real_eval(*arrays)

    monkeypatch.setattr(projection.mx, "async_eval", async_eval)
    monkeypatch.setattr(projection.mx, "eval", eval_)
    with dense_matmuls():
        out = project(lin, x)
    assert len(queued) == 8 and waited == list(range(7))
    for step, (kind, i) in enumerate(order):
        if kind == "queue" and i >= 2:
            assert ("wait", i - 2) in order[:step]
    assert mx.allclose(out, lin(x), atol=1e-5).item()


def test_default_is_on_but_for_metal(monkeypatch):
    assert projection.default_enabled() is not (mx.default_device() == mx.gpu and mx.metal.is_available())
    monkeypatch.setattr(projection.mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(projection.mx.metal, "is_available", lambda: True)
    assert not projection.default_enabled()
    monkeypatch.setattr(projection.mx.metal, "is_available", lambda: False)
    assert projection.default_enabled()


@pytest.mark.parametrize("family", ["e", "dense", "moe"])
def test_prefill_on_dequantized_weights_matches_quantized(family, monkeypatch):
    """A whole 4-bit prefill (chunked, across the sliding window) with the dense path forced on: the same
    logits and the same cache as with quantized matmuls, and the dense path really taken."""
    model = build_4bit(family, lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
    monkeypatch.setattr(projection, "DENSE_FROM_ROWS", 16)
    inputs = {"input_ids": mx.array(ids_of(70).numpy())}
    results = {}
    taken = []
    real = projection.mx.dequantize
    monkeypatch.setattr(projection.mx, "dequantize", lambda *a, **k: taken.append(1) or real(*a, **k))
    for dense in (False, True):
        model.dense_prefill = dense
        cache = model.make_cache()
        logits = model.prefill(inputs, cache, chunk_size=32)
        mx.eval(logits)
        results[dense] = (logits, [mx.array(s) for c in cache for s in c.state if s is not None])
        assert bool(taken) is dense
    (l0, s0), (l1, s1) = results[False], results[True]
    assert mx.allclose(l0, l1, atol=1e-4, rtol=1e-4).item()
    assert len(s0) == len(s1) and all(mx.allclose(a, b, atol=1e-4).item() for a, b in zip(s0, s1))


def test_few_queries_take_mx_fast_on_cuda_settings(monkeypatch):
    """With CUDA's settings (text._fused_attention_sizes), a pass of up to 8 queries goes through mx.fast's
    attention at any head size and any number of grouped heads; a longer one through the written-out math."""
    monkeypatch.setattr(text.mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(text.mx.metal, "is_available", lambda: False)
    assert text._fused_attention_sizes()[0] == 128
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(text.mx.fast, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for L, D, H in [(1, 512, 8), (5, 256, 8), (8, 512, 16)]:
        q, k, v = (mx.random.normal(s) for s in ((1, H, L, D), (1, 1, 40, D), (1, 1, 40, D)))
        with mx.stream(mx.cpu):
            text.attention(q, k, v, None)
    assert len(calls) == 3
    q, k, v = (mx.random.normal(s) for s in ((1, 8, 9, 256), (1, 2, 40, 256), (1, 2, 40, 256)))
    with mx.stream(mx.cpu):
        text.attention(q, k, v, None)
    assert len(calls) == 3


def test_cpu_widens_half_precision_inputs_of_quantized_matmuls(monkeypatch):
    """On the CPU backend a bfloat16 / float16 input reaches the quantized matmul as float32 (8x faster there) and
    the output is rounded back; float32 inputs, plain Linears and other backends are left as they are."""
    lin = _quantized_linear()
    seen = []
    real = mx.quantized_matmul
    monkeypatch.setattr(projection.mx, "quantized_matmul", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    for dtype in (mx.bfloat16, mx.float16):
        x = mx.random.normal((1, 3, 128)).astype(dtype)
        with mx.stream(mx.cpu):
            monkeypatch.setattr(projection.mx, "default_device", lambda: mx.cpu)
            out = project(lin, x)
            ref = lin(x.astype(mx.float32)).astype(dtype)
        assert out.dtype == dtype and mx.array_equal(out, ref).item()
    assert seen[::2] == [mx.float32, mx.float32]
    seen.clear()
    project(lin, mx.random.normal((1, 3, 128)))                       # float32 already
    plain = nn.Linear(128, 8)
    assert mx.array_equal(project(plain, mx.ones((1, 128), mx.bfloat16)),
                          plain(mx.ones((1, 128), mx.bfloat16))).item()
    monkeypatch.setattr(projection.mx, "default_device", lambda: mx.gpu)
    with mx.stream(mx.cpu):
        project(lin, mx.random.normal((1, 3, 128)).astype(mx.bfloat16))   # another backend: as it is
    assert seen == [mx.float32, mx.bfloat16]


def test_tied_head_widens_on_the_cpu(monkeypatch):
    mx.random.seed(3)
    emb = nn.Embedding(512, 128)
    emb.weight = mx.random.normal((512, 128)) * 0.05
    q = nn.QuantizedEmbedding.from_embedding(emb, group_size=64, bits=4)
    h = mx.random.normal((1, 2, 128)).astype(mx.bfloat16)
    monkeypatch.setattr(projection.mx, "default_device", lambda: mx.cpu)
    out = projection.head(q, h)
    assert out.dtype == mx.bfloat16 and out.shape == (1, 2, 512)
    assert mx.array_equal(out, q.as_linear(h.astype(mx.float32)).astype(mx.bfloat16)).item()
    assert mx.array_equal(projection.head(emb, h), emb.as_linear(h)).item()


def _rows_seen(monkeypatch) -> list[int]:
    seen = []
    real = mx.quantized_matmul
    monkeypatch.setattr(projection.mx, "quantized_matmul",
                        lambda x, *a, **k: seen.append(x.size // x.shape[-1]) or real(x, *a, **k))
    return seen


def test_cuda_pads_few_rows_of_wide_quantized_matmuls(monkeypatch):
    """On CUDA a quantized projection at least PAD_FROM_OUT wide on 2 to 7 rows reaches the kernel as 8 rows (the
    tiled kernel instead of one pass per row); the real rows' outputs are the unpadded call's, in their shape."""
    lin = _quantized_linear()
    seen = _rows_seen(monkeypatch)
    monkeypatch.setattr(projection, "on_cuda", lambda: True)
    monkeypatch.setattr(projection.few_rows, "ENABLED", False)   # the padding path (where the kernel does not fit)
    monkeypatch.setattr(projection, "PAD_FROM_OUT", 96)
    for shape in [(1, r, 128) for r in range(1, 10)] + [(2, 3, 128), (5, 128)]:
        x = mx.random.normal(shape)
        seen.clear()
        out = project(lin, x)
        rows = x.size // 128
        assert seen == [8 if 2 <= rows < 8 else rows], shape
        ref = lin(x)
        assert out.shape == ref.shape == (*shape[:-1], 96)
        assert mx.allclose(out, ref, atol=1e-6, rtol=1e-6).item()


def test_padding_leaves_narrow_projections_and_other_backends(monkeypatch):
    lin = _quantized_linear()
    seen = _rows_seen(monkeypatch)
    x = mx.random.normal((1, 4, 128))
    monkeypatch.setattr(projection, "PAD_FROM_OUT", 96)
    project(lin, x)                                       # not CUDA
    monkeypatch.setattr(projection, "on_cuda", lambda: True)
    monkeypatch.setattr(projection.few_rows, "ENABLED", False)   # the padding path (where the kernel does not fit)
    monkeypatch.setattr(projection, "PAD_FROM_OUT", 97)
    project(lin, x)                                       # narrower than PAD_FROM_OUT
    monkeypatch.setattr(projection, "PAD_FROM_OUT", None)
    project(lin, x)                                       # padding off
    assert seen == [4, 4, 4]
    plain = nn.Linear(128, 96)
    monkeypatch.setattr(projection, "PAD_FROM_OUT", 0)
    assert mx.array_equal(project(plain, x), plain(x)).item() and seen == [4, 4, 4]


def test_tied_head_pads_few_rows_on_cuda(monkeypatch):
    mx.random.seed(4)
    emb = nn.Embedding(512, 128)
    emb.weight = mx.random.normal((512, 128)) * 0.05
    q = nn.QuantizedEmbedding.from_embedding(emb, group_size=64, bits=4)
    h = mx.random.normal((1, 3, 128))
    seen = _rows_seen(monkeypatch)
    monkeypatch.setattr(projection, "on_cuda", lambda: True)
    monkeypatch.setattr(projection.few_rows, "ENABLED", False)   # the padding path (where the kernel does not fit)
    out = projection.head(q, h)                           # 512 outputs: under the default PAD_FROM_OUT
    monkeypatch.setattr(projection, "PAD_FROM_OUT", 512)
    padded = projection.head(q, h)
    assert seen == [3, 8]
    assert padded.shape == out.shape == (1, 3, 512) and mx.allclose(padded, out, atol=1e-6, rtol=1e-6).item()


def test_padded_verify_step_gives_the_same_logits_and_hidden_states(monkeypatch):
    """A whole verify step (k + 1 = 4 tokens after a prompt, the compiled step) with every quantized projection and
    the head padded to 8 rows: the real rows' logits and hidden states are the unpadded step's."""
    from benchmarks.speculative import pad_from_out

    model = build_4bit("e", lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    prompt = mx.array(ids_of(20).numpy())
    monkeypatch.setattr(projection, "on_cuda", lambda: True)
    monkeypatch.setattr(projection.few_rows, "ENABLED", False)   # the padding path (where the kernel does not fit)

    def outputs():
        cache = model.make_cache()
        model.prefill({"input_ids": prompt[:, :-1]}, cache)
        return model.step_hidden(mx.repeat(prompt[:, -1:], 4, axis=1), cache)

    with pad_from_out(model, None):
        ref_logits, ref_hidden = outputs()
    seen = _rows_seen(monkeypatch)
    with pad_from_out(model, 0):
        logits, hidden = outputs()
    assert 8 in seen and 4 not in seen          # the traced step's 4-row projections all ran padded
    assert model._compiled_hidden_step is None   # traced again after the A/B
    assert mx.allclose(logits, ref_logits, atol=1e-4).item() and mx.allclose(hidden, ref_hidden, atol=1e-4).item()


def test_no_padding_where_mlx_has_no_cuda_module(monkeypatch):
    """An MLX build without mx.cuda (or a GPU that is not CUDA: Metal) runs few rows as they are."""
    lin = _quantized_linear()
    seen = _rows_seen(monkeypatch)
    monkeypatch.setattr(projection, "PAD_FROM_OUT", 0)
    monkeypatch.setattr(projection.mx, "default_device", lambda: mx.gpu)
    monkeypatch.delattr(mx, "cuda")
    with mx.stream(mx.cpu):
        project(lin, mx.random.normal((1, 3, 128)))
    assert seen == [3]


def test_few_rows_kernel_fits_only_what_was_checked_on_the_device():
    """bfloat16 inputs, 4-bit affine weights in groups of 64 with biases, 1 to 8 rows."""
    from mlx_gemma4 import few_rows

    w32 = mx.random.normal((96, 128)).astype(mx.bfloat16)
    w, s, b = mx.quantize(w32, group_size=64, bits=4)

    def fits(x, w=w, s=s, b=b, g=64, bits=4, mode="affine"):
        return few_rows.fits(x, w, s, b, g, bits, mode)

    for rows in range(1, 9):
        assert fits(mx.zeros((1, rows, 128), dtype=mx.bfloat16))
    assert not fits(mx.zeros((1, 9, 128), dtype=mx.bfloat16))
    assert not fits(mx.zeros((3, 128), dtype=mx.float32))               # scales of another dtype
    w8, s8, b8 = mx.quantize(w32, group_size=64, bits=8)
    assert not fits(mx.zeros((2, 128), dtype=mx.bfloat16), w8, s8, b8, bits=8)
    assert not fits(mx.zeros((2, 128), dtype=mx.bfloat16), b=None)
    assert not fits(mx.zeros((2, 128), dtype=mx.bfloat16), mode="mxfp4")
    w32g, s32g, b32g = mx.quantize(w32, group_size=32, bits=4)
    assert not fits(mx.zeros((2, 128), dtype=mx.bfloat16), w32g, s32g, b32g, g=32)   # not yet run on the device
    f32 = mx.random.normal((96, 128))
    assert not fits(mx.zeros((2, 128)), *mx.quantize(f32, group_size=64, bits=4))


def test_few_rows_kernels_are_chosen_where_the_device_run_found_them_faster():
    from mlx_gemma4.few_rows import choose

    # one row: the CUDA-core kernel on the widest weights only
    assert choose(1, 20480, 2560) == choose(1, 262144, 2560) == choose(1, 3840, 15360) == "cores"  # gate/up, head
    assert choose(1, 8192, 3840) == "cores"                                                         # 12B q/k/v
    assert choose(1, 2560, 10240) is None and choose(1, 2048, 2560) is None                         # E4B down, q
    # 2 to 7 rows: the tensor-core kernel from 2M elements (input width a multiple of 64), else MLX's
    for rows in range(2, 8):
        assert choose(rows, 2048, 2560) == choose(rows, 20480, 2560) == "mma"
        assert choose(rows, 2048, 1536) == choose(rows, 1536, 2048) == "mma"                        # E2B q, o
        assert choose(rows, 512, 2560) is None                                                      # E4B k / v
    assert choose(5, 4096, 2080) == "cores"                                                         # 2080 % 64 != 0
    assert choose(8, 20480, 2560) is None and choose(9, 20480, 2560) is None                       # MLX's tiled kernel


def test_few_rows_tensor_cores_only_where_the_device_has_them(monkeypatch):
    """bfloat16 mma.sync needs compute capability 8.0: on an older GPU 2-7 rows take the CUDA-core kernel; where
    MLX does not report the capability the tensor cores are assumed."""
    from mlx_gemma4 import few_rows

    for info, expected in (({"compute_capability_major": 7}, "cores"), ({"compute_capability_major": 9}, "mma"),
                           ({}, "mma")):
        monkeypatch.setattr(mx, "device_info", lambda info=info: info)
        few_rows.tensor_cores.cache_clear()
        assert few_rows.choose(5, 20480, 2560) == expected
        assert few_rows.choose(1, 20480, 2560) == "cores"
    few_rows.tensor_cores.cache_clear()


def test_few_rows_settings():
    """MLX_GEMMA4_FEW_ROWS: "1" (the default rules), "0" (MLX's own everywhere), "mma" (tensor cores for all that
    fit); configure returns the setting it replaces and refuses anything else with the choices named."""
    from mlx_gemma4 import few_rows

    before = few_rows.configure("0")
    try:
        assert not few_rows.ENABLED and few_rows.configure("mma") == "0"
        assert few_rows.ENABLED and few_rows.CANDIDATE and few_rows.configure("1") == "mma"
        assert few_rows.ENABLED and not few_rows.CANDIDATE
        with pytest.raises(ValueError, match="expected one of 1, 0, mma"):
            few_rows.configure("fast")
    finally:
        few_rows.configure(before)


def _recording_kernels(monkeypatch):
    """few_rows' two kernels replaced by MLX's own matmul, recording (kernel, rows) per call, on a backend taken for
    a GPU (no widening); and a bfloat16 4-bit linear with a bias to send through them."""
    from mlx_gemma4 import few_rows

    calls = []

    def cores(x, w, scales, biases, group_size):
        calls.append(("cores", x.size // x.shape[-1]))
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=4)

    def mma(x, w, scales, biases):
        calls.append(("mma", x.size // x.shape[-1]))
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4)

    monkeypatch.setattr(few_rows, "matmul", cores)
    monkeypatch.setattr(few_rows, "mma_matmul", mma)
    monkeypatch.setattr(projection, "_widened", lambda x: False)
    lin = _quantized_linear(bias=True)
    lin.set_dtype(mx.bfloat16)
    return calls, lin


def test_projections_and_the_head_take_the_few_rows_kernels_on_cuda(monkeypatch):
    """On CUDA a projection or tied head the kernels fit (bfloat16, 4-bit) goes where few_rows.choose says:
    few_rows.matmul ("cores": with the weight, scales, biases and group size) or few_rows.mma_matmul ("mma"), the
    module's bias added after; 8 or 9 rows, float32, other backends, ENABLED off, or where choose says MLX's own do
    not. Outputs equal the module's own."""
    from mlx_gemma4 import few_rows

    calls, lin = _recording_kernels(monkeypatch)
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(512, 128), group_size=64, bits=4)
    emb.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, 5, 128)).astype(mx.bfloat16)
    project(lin, x)
    projection.head(emb, x)
    assert calls == []                                    # not CUDA
    monkeypatch.setattr(projection, "on_cuda", lambda: True)
    project(lin, x)
    assert calls == []                                    # too small to be faster
    monkeypatch.setattr(few_rows, "choose", lambda rows, n, k: "cores" if rows == 1 else "mma" if rows < 8 else None)
    for rows in (1, 5, 7):
        xr = mx.random.normal((1, rows, 128)).astype(mx.bfloat16)
        assert mx.array_equal(project(lin, xr), lin(xr)).item()
        assert mx.array_equal(projection.head(emb, xr), emb.as_linear(xr)).item()
    assert calls == [("cores", 1)] * 2 + [("mma", 5)] * 2 + [("mma", 7)] * 2
    project(lin, mx.random.normal((1, 8, 128)).astype(mx.bfloat16))
    project(lin, mx.random.normal((1, 9, 128)).astype(mx.bfloat16))
    project(lin, mx.random.normal((1, 5, 128)))          # float32
    monkeypatch.setattr(few_rows, "ENABLED", False)
    project(lin, x)
    assert len(calls) == 6


def test_the_mma_setting_takes_every_fitting_projection(monkeypatch):
    """MLX_GEMMA4_FEW_ROWS=mma (few_rows.CANDIDATE): on CUDA every 4-bit bfloat16 projection of 1 to 8 rows with an
    input width divisible by 64 goes to few_rows.mma_matmul, whatever its size; 9 rows, another width or another
    backend do not."""
    from mlx_gemma4 import few_rows

    calls, lin = _recording_kernels(monkeypatch)
    monkeypatch.setattr(few_rows, "CANDIDATE", True)
    x = mx.random.normal((1, 3, 128)).astype(mx.bfloat16)
    project(lin, x)
    assert calls == []                                    # not CUDA
    monkeypatch.setattr(projection, "on_cuda", lambda: True)
    for rows in (1, 3, 8):
        xr = mx.random.normal((1, rows, 128)).astype(mx.bfloat16)
        assert mx.array_equal(project(lin, xr), lin(xr)).item()
    project(lin, mx.random.normal((1, 9, 128)).astype(mx.bfloat16))
    assert calls == [("mma", 1), ("mma", 3), ("mma", 8)]
    narrow = nn.QuantizedLinear.from_linear(nn.Linear(96, 64, bias=False), group_size=32, bits=4)
    narrow.set_dtype(mx.bfloat16)
    assert projection._kernel_for(narrow, mx.zeros((2, 96), dtype=mx.bfloat16)) is None


def test_gated_is_act_of_the_fused_projection_a_slice_at_a_time(monkeypatch):
    """A fused gate/up projection inside dense_matmuls: act(gate, up) a slice of the intermediate width at a time
    (each slice's gate and up rows dequantized), queued as project's slices are; the same numbers as act of the
    whole projection's halves, and outside or on few rows exactly that."""
    lin = _quantized_linear(n_out=2 * 100)
    x = mx.random.normal((1, 300, 128))
    act = text.geglu
    gate, up = mx.split(lin(x), 2, axis=-1)
    ref = act(gate, up)
    monkeypatch.setattr(projection, "SLICE_BYTES", 2 * 30 * 128 * 4)   # 30 columns a slice: 4, the last short
    queued = []
    real_async = mx.async_eval
    monkeypatch.setattr(projection.mx, "async_eval", lambda *a: queued.append(a[0].shape) or real_async(*a))
    with dense_matmuls():
        out = projection.gated(lin, x, act)
    assert queued == [(1, 300, 30)] * 3 + [(1, 300, 10)]
    assert out.shape == (1, 300, 100) and mx.allclose(out, ref, atol=1e-5, rtol=1e-5).item()
    queued.clear()
    assert mx.array_equal(projection.gated(lin, x, act), ref).item() and not queued   # outside dense_matmuls
