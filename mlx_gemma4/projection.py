"""How a projection runs, per backend: the module call, except where MLX's quantized matmul has a faster path.

**Prefill on dequantized weights.** On MLX 0.32's CUDA backend a 4-bit matmul over many rows runs its Ampere-style
kernel (``qmm_sm80``; the Hopper one needs a quantization group as long as the input), while a dense bfloat16 matmul
runs cuBLAS: on an H200, a 1,059-token 12B prefill took 202 ms with quantized matmuls and 84 ms with each weight
dequantized for its matmul (benchmarks/parts.py, "A/B prefill ms"). Decoding (one row, or a verify's few) keeps the
quantized kernels, which read a quarter of the bytes.

Dequantized weights are big (the 12B's gate/up projection is 236 MB in bfloat16), and a GPU backend frees a
buffer only once the device has run the op that used it, so the host must not queue many of them ahead of the
device. Each weight is dequantized a slice of its output rows at a time (at most ``SLICE_BYTES``), each slice's
output is queued as soon as it is built, and the host then waits for the slice queued before it: at most two
slices are alive, and the device always has the next one to run while the host builds the one after. Measured on
an H100 (benchmarks/dense_prefill.py, 12 layers at real width, 1,059 tokens; prefill ms / peak MB over start):

    setting                          12B            E4B
    quantized matmuls                51.1 / 574     16.9 / 343
    128 MB slices, 2 queued          35.6 / 496     11.2 / 297     <- the default
    64 MB slices, 2 queued           42.4 / 530     17.8 / 263     (each wait costs host time)
    whole weights, 2 queued          27.2 / 893     11.5 / 297
    whole weights, no waits          23.4 / 2141    10.0 / 736

Only ``prefill`` turns it on (``dense_matmuls``), where ``default_enabled()`` says (not on Metal), for projections
of at least ``DENSE_FROM_ROWS`` rows; elsewhere, and inside compiled or one-graph passes, projections
are the plain module call.

**A few rows on CUDA: our kernels, else padded to 8.** A 4-bit bfloat16 projection on 1 to 7 rows runs on one of
few_rows.py's kernels where it beats MLX's own (``few_rows.choose``: the wide projections at one row on CUDA cores,
all but the smallest at 2-7 rows on tensor cores); what they do not take is handled as below. MLX 0.32's CUDA
backend runs a quantized matmul of fewer than 8 rows as one matrix-vector pass per row (each pass reads the whole
weight) and one of 8 or more on a tiled kernel that reads it once, so a speculative verify of k + 1 tokens grew ~2.6
ms per token on an H200's E4B. A wide projection (output at least ``PAD_FROM_OUT``: the fused gate/up, the tied
head) on 2 to 7 rows runs on them padded with zero rows to 8 instead (on an H100, E4B's gate/up at 5 rows 0.16
against 0.25 ms); a narrow one (the down projection, whose tiled kernel has too few output tiles to fill the device:
0.24 against 0.18 ms) keeps the per-row passes.

**Float32 inputs on the CPU.** MLX's CPU backend runs a 4-bit matmul about 8x faster on float32 inputs than on
bfloat16 ones (this project's 2-core machine: the 262,144 x 256 head of one token 59 against 471 ms; a 2,048 x
16,384 projection 31 against 236 ms), so there a bfloat16 or float16 input is widened for the quantized matmul and
its output rounded back (``project``, ``head``): what decoding a 4-bit model on the CPU waits for.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import few_rows

DENSE_FROM_ROWS = 256
PAD_ROWS_TO = 8        # CUDA: a quantized matmul of 2 to 7 rows runs on its rows padded with zeros to this many
PAD_FROM_OUT = 8192    # ... where its output is at least this wide (0: every one; None: none)
SLICE_BYTES = 128 << 20
QUEUED_SLICES = 2   # slices alive at once (the host waits for the one queued before); 0: never wait here

_queue: ContextVar[deque | None] = ContextVar("dense_prefill_queue", default=None)


def default_enabled() -> bool:
    """Whether prefill dequantizes its weights by default: everywhere but Metal, whose quantized matmul has its own
    many-row kernel. On the CUDA backend see above; on the CPU backend a 4-bit matmul of 256 x 1024 x 4096 took
    7.5 s in bfloat16 against 0.39 s dequantized (0.93 against 0.87 s in float32) on this project's 2-core test
    machine."""
    return not (mx.default_device() == mx.gpu and mx.metal.is_available())


@contextmanager
def dense_matmuls(enabled: bool = True):
    """Inside, ``project`` runs quantized projections of at least DENSE_FROM_ROWS rows on dequantized weights,
    evaluating as it goes (so not inside mx.compile or a graph meant to stay lazy)."""
    token = _queue.set(deque() if enabled else None)
    try:
        yield
    finally:
        _queue.reset(token)


def _widened(x: mx.array) -> bool:
    """Whether a quantized matmul on ``x`` runs on float32 inputs instead (the CPU backend; see above)."""
    return x.dtype in (mx.bfloat16, mx.float16) and mx.default_device() == mx.cpu


def _few_rows(x: mx.array, n_out: int) -> int:
    """How many rows ``x`` has where a quantized matmul to ``n_out`` outputs runs them padded (see above), else 0."""
    rows = x.size // x.shape[-1]
    if not 2 <= rows < PAD_ROWS_TO or PAD_FROM_OUT is None or n_out < PAD_FROM_OUT:
        return 0
    return rows if on_cuda() else 0


def on_cuda() -> bool:
    """Whether work goes to MLX's CUDA backend (the few-rows and decode attention kernels' only home)."""
    cuda = getattr(mx, "cuda", None)   # (not in every MLX build)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def _padded(fn, x: mx.array, rows: int) -> mx.array:
    """``fn`` of ``x``'s ``rows`` rows padded with zeros to PAD_ROWS_TO, cut back to those rows."""
    flat = mx.pad(x.reshape(rows, x.shape[-1]), [(0, PAD_ROWS_TO - rows), (0, 0)])
    out = fn(flat)
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def _kernel_for(module: nn.Module, x: mx.array) -> str | None:
    """Which of the few-rows kernels (few_rows.py) runs this quantized matmul, if any: on CUDA, in the format they
    take (``few_rows.fits``), where ``few_rows.choose`` finds one faster than MLX's own."""
    w = module["weight"]
    if not (few_rows.ENABLED and on_cuda() and few_rows.fits(x, w, module["scales"], module.get("biases"),
                                                              module.group_size, module.bits, module.mode)):
        return None
    k = x.shape[-1]
    return few_rows.choose(x.size // k, w.shape[0], k)


def _kernel(module: nn.Module, x: mx.array, which: str) -> mx.array:
    if which == "mma":
        return few_rows.mma_matmul(x, module["weight"], module["scales"], module["biases"])
    return few_rows.matmul(x, module["weight"], module["scales"], module["biases"], module.group_size)


def head(table: nn.Module, h: mx.array) -> mx.array:
    """Logits of ``h`` through a tied embedding table (``table.as_linear``), widened on the CPU and on the
    few-rows kernel or padded on CUDA as ``project``."""
    if not isinstance(table, nn.QuantizedEmbedding):
        return table.as_linear(h)
    if _widened(h):
        return table.as_linear(h.astype(mx.float32)).astype(h.dtype)
    which = _kernel_for(table, h)
    if which:
        return _kernel(table, h, which)
    rows = _few_rows(h, table["weight"].shape[0])
    return _padded(table.as_linear, h, rows) if rows else table.as_linear(h)


def project(linear: nn.Module, x: mx.array) -> mx.array:
    """``linear(x)``; inside ``dense_matmuls``, a quantized ``linear`` over many rows runs on its dequantized
    weight, a slice of output rows at a time, with at most two slices in flight; on the CPU, a quantized ``linear``
    on bfloat16 / float16 inputs runs on them widened to float32; on CUDA, a wide one on 2 to 7 rows runs on
    them padded to 8."""
    if not isinstance(linear, nn.QuantizedLinear):
        return linear(x)
    queue = _queue.get()
    if queue is None or x.size // x.shape[-1] < DENSE_FROM_ROWS:
        if _widened(x):
            return linear(x.astype(mx.float32)).astype(x.dtype)
        which = _kernel_for(linear, x)
        if which:
            out = _kernel(linear, x, which)
            return out + linear["bias"] if "bias" in linear else out
        rows = _few_rows(x, linear["weight"].shape[0])
        return _padded(linear, x, rows) if rows else linear(x)
    n_out = linear["weight"].shape[0]
    rows = _slice_rows(linear, x)
    outs = []
    for s in range(0, n_out, rows):
        e = min(s + rows, n_out)
        out = x @ _dequantized(linear, s, e, x.dtype).T
        if "bias" in linear:
            out = out + linear["bias"][s:e]
        outs.append(_queued(queue, out))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def gated(linear: nn.Module, x: mx.array, act: Callable[[mx.array, mx.array], mx.array]) -> mx.array:
    """``act(gate, up)`` of a fused gate/up projection (``linear``'s first half of outputs the gate, its second the
    up). Inside ``dense_matmuls``, for a quantized ``linear`` over many rows, a slice of the intermediate width at a
    time: the slice's gate and up rows dequantized (together at most ``SLICE_BYTES``), ``act`` applied at once and
    the result queued as ``project`` queues its slices, so the whole gate/up output (twice the activation) is
    never alive. On an H100 (session 13, six 12B layers at 1,059 tokens, 30 prefills each, a busy host whose
    peaks moved by 100 MB from run to run), the lowest peak went from 484 to 427 MB over the start (KV 45 MB)
    at the same speed. The same numbers as the whole projection: each output column is computed on its own."""
    queue = _queue.get()
    if queue is None or not isinstance(linear, nn.QuantizedLinear) or "bias" in linear \
            or x.size // x.shape[-1] < DENSE_FROM_ROWS:
        gate, up = mx.split(project(linear, x), 2, axis=-1)
        return act(gate, up)
    n = linear["weight"].shape[0] // 2
    rows = max(1, _slice_rows(linear, x) // 2)
    outs = []
    for s in range(0, n, rows):
        e = min(s + rows, n)
        gate = x @ _dequantized(linear, s, e, x.dtype).T
        up = x @ _dequantized(linear, n + s, n + e, x.dtype).T
        outs.append(_queued(queue, act(gate, up)))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def _slice_rows(linear: nn.Module, x: mx.array) -> int:
    """How many of ``linear``'s output rows make a slice of at most SLICE_BYTES, dequantized to ``x``'s dtype."""
    in_dims = linear["scales"].shape[-1] * linear.group_size
    return max(1, SLICE_BYTES // (in_dims * x.dtype.size))


def _dequantized(linear: nn.Module, s: int, e: int, dtype: mx.Dtype) -> mx.array:
    """Output rows ``s:e`` of a quantized ``linear``'s weight, dequantized to ``dtype``."""
    biases = linear.get("biases")
    return mx.dequantize(linear["weight"][s:e], linear["scales"][s:e], None if biases is None else biases[s:e],
                         group_size=linear.group_size, bits=linear.bits, mode=linear.mode).astype(dtype)


def _queued(queue: deque, out: mx.array) -> mx.array:
    """``out`` queued on the device; then the host waits for the slice queued before it (QUEUED_SLICES)."""
    if QUEUED_SLICES:
        mx.async_eval(out)
        queue.append(out)
        if len(queue) >= QUEUED_SLICES:
            mx.eval(queue.popleft())   # the slice before this one: the device goes on with this one meanwhile
    return out
