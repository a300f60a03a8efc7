"""Small layers the text decoder and both towers share.

Reference: transformers ``Gemma4RMSNorm``, ``Gemma4ClippableLinear`` and ``Gemma4MultimodalEmbedder``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .projection import project


def compute_dtype(linear: nn.Module) -> mx.Dtype:
    """The dtype a linear layer computes in: its weight's, or its scales' when the weight is packed (affine
    quantization, the only kind loaded). The reference casts a tower's raw input to its first projection's weight
    dtype; this is that dtype here."""
    weight = linear.weight
    return weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else linear.scales.dtype


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: ``x / rms(x) * weight`` (weight initialised to one, not offset by one as in Gemma 3).
    The fused kernel accumulates in float32 whatever the input dtype, as the reference's upcast does; it rounds
    ``x / rms(x)`` to the input dtype before the weight multiplies it (the reference rounds once, after), so in
    half precision a weighted norm can differ from the reference's by a unit in the last place."""

    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.get("weight"), self.eps)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm arithmetic in half precision: normalized, scaled and shifted in float32, rounded once.
    (MLX's fused kernel rounds the normalized value to the input dtype before the affine part, which moves a
    quarter of bfloat16 outputs by one unit in the last place.) Same parameters as ``nn.LayerNorm``."""

    def __call__(self, x: mx.array) -> mx.array:
        w, b = (None if a is None else a.astype(mx.float32) for a in (self.get("weight"), self.get("bias")))
        return mx.fast.layer_norm(x.astype(mx.float32), w, b, self.eps).astype(x.dtype)


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output are clamped to bounds stored in the checkpoint (when the tower's
    config says ``use_clipped_linears``); the bounds start unbounded."""

    def __init__(self, in_dims: int, out_dims: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if self.clipped:
            x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        x = project(self.linear, x)
        if self.clipped:
            x = mx.clip(x, self.output_min.astype(x.dtype), self.output_max.astype(x.dtype))
        return x


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> text embedding space: a scale-free RMSNorm, then a bias-free projection. ``in_dims`` is the
    tower's output width (``output_proj_dims`` for audio, ``hidden_size`` for vision)."""

    def __init__(self, in_dims: int, text_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dims, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dims, text_hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
