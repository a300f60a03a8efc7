"""Mixture-of-experts block of Gemma 4 26B-A4B.

Reference: transformers ``Gemma4TextRouter`` and ``Gemma4TextExperts``. The router normalises the residual stream
(no learned scale), multiplies by a learned scale and 1/sqrt(hidden), takes a softmax over experts, keeps the
top-k, renormalises them to sum to one and multiplies each by its expert's learned scale. Each expert is a gated
GELU MLP whose gate and up projections are stored fused (``gate_up_proj``: gate first, then up).
The decoder layer adds the experts' output to the dense MLP's (see text.DecoderLayer).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.eps = eps
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = mx.ones((hidden,))
        self.per_expert_scale = mx.ones((num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        h = mx.fast.rms_norm(x, None, self.eps) * (self.scale * x.shape[-1] ** -0.5)
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)          # (..., E)
        idx = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(probs, idx, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        weights = weights * self.per_expert_scale[idx]
        return weights, idx                                                  # (..., K), (..., K)


class Experts(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = SwitchLinear(hidden, 2 * intermediate, num_experts, bias=False)
        self.down_proj = SwitchLinear(intermediate, hidden, num_experts, bias=False)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, 1, 1, shape[-1])                                   # (N, 1, 1, hidden)
        idx = indices.reshape(-1, indices.shape[-1])                         # (N, K)
        n_tokens, k = idx.shape
        # Sorting token-expert pairs by expert lets gather_mm read each expert's weights once per run.
        do_sort = n_tokens * k >= 64
        if do_sort:
            flat = idx.flatten()
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]                                 # (N*K, 1, hidden)
            idx = flat[order]
        gu = _project(self.gate_up_proj, x, idx, do_sort)
        gate, up = mx.split(gu, 2, axis=-1)
        y = _project(self.down_proj, nn.gelu_approx(gate) * up, idx, do_sort)
        if do_sort:
            y = y[inverse].reshape(n_tokens, k, 1, shape[-1])
        y = y.squeeze(-2)                                                    # (N, K, hidden)
        w = weights.reshape(n_tokens, k)[..., None].astype(y.dtype)
        return (y * w).sum(axis=-2).reshape(shape)


def _project(layer: nn.Module, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
    """``layer(x, idx)``. MLX's CPU gather_mm (0.32) multiplies float32 only, so there an unquantized bfloat16 or
    float16 expert stack is multiplied in float32 and the result cast back (the quantized kernel takes them all)."""
    w = layer.get("weight") if isinstance(layer, SwitchLinear) else None
    if w is None or w.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return layer(x, idx, sorted_indices=sorted_indices)
    y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx,
                     sorted_indices=sorted_indices)
    return y.astype(x.dtype)


class MoEBlock:
    """Namespace for building the router/experts pair that a decoder layer holds as two attributes."""

    @staticmethod
    def router_and_experts(cfg) -> tuple[Router, Experts]:
        return (
            Router(cfg.hidden_size, cfg.num_experts, cfg.top_k_experts, cfg.rms_norm_eps),
            Experts(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts),
        )
