"""Gemma 4 vision tower and its projection into the text model's embedding space, in MLX.

Reference: transformers ``models/gemma4/modeling_gemma4.py`` (``Gemma4VisionModel``, ``Gemma4VisionPatchEmbedder``,
``Gemma4VisionAttention``, ``apply_multidimensional_rope``, ``Gemma4VisionPooler``, ``Gemma4MultimodalEmbedder``).

Patches (already flattened by the processor) are projected and given a learned 2-D position embedding, run
through a bidirectional encoder whose attention rotates the first half of each head by the patch's x and the
second half by its y, then averaged over ``pooling_kernel_size**2`` neighbouring patches into soft tokens.
Attribute names equal the Hugging Face parameter names, so checkpoints load without renaming.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig
from .layers import ClippableLinear, MultimodalEmbedder, RMSNorm, compute_dtype

_ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu": nn.gelu, "silu": nn.silu}


def axial_rope(positions: mx.array, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos, sin of shape (B, L, 1, head_dim) for (x, y) ``positions`` (B, L, 2).

    The first half of the head is rotated by x, the second by y; each half uses the usual rotate-half layout
    over ``head_dim // 4`` frequencies (the reference's H-H-W-W recomposition).
    """
    inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim // 2, 2, dtype=mx.float32) / (head_dim // 2)))  # (D/4,)
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # (B, L, 2, D/4)
    ax, ay = angles[..., 0, :], angles[..., 1, :]  # (B, L, D/4) each
    cos = mx.concatenate([mx.cos(ax), mx.cos(ax), mx.cos(ay), mx.cos(ay)], axis=-1)  # (B, L, D)
    sin = mx.concatenate([mx.sin(ax), mx.sin(ax), mx.sin(ay), mx.sin(ay)], axis=-1)  # (B, L, D)
    return cos[:, :, None, :], sin[:, :, None, :]  # (B, L, 1, D): broadcast over heads


def apply_axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate ``x`` (B, L, H, D): rotate-half separately within the x half and the y half."""
    q = x.shape[-1] // 4
    a, b, c, d = x[..., :q], x[..., q : 2 * q], x[..., 2 * q : 3 * q], x[..., 3 * q :]
    rotated = mx.concatenate([-b, a, -d, c], axis=-1)  # (B, L, H, D)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        if self.head_dim % 4:
            raise ValueError(f"Axial RoPE needs head_dim divisible by 4; got {self.head_dim}.")
        h, d, c = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.q_proj = ClippableLinear(h, self.num_heads * d, c)
        self.k_proj = ClippableLinear(h, self.num_kv_heads * d, c)
        self.v_proj = ClippableLinear(h, self.num_kv_heads * d, c)
        self.o_proj = ClippableLinear(self.num_heads * d, h, c)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim))  # (B, L, H, D)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim))  # (B, L, Hkv, D)
        v = self.v_norm(self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim))  # (B, L, Hkv, D)
        q = apply_axial_rope(q, cos, sin).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = apply_axial_rope(k, cos, sin).transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        v = v.transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        # q/k are RMS-normalized, so the reference uses no 1/sqrt(D) scaling.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)  # (B, H, L, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, self.num_heads * self.head_dim)  # (B, L, H*D)
        return self.o_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, i, c = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(h, i, c)
        self.up_proj = ClippableLinear(h, i, c)
        self.down_proj = ClippableLinear(i, h, c)
        self.act = _ACTIVATIONS[config.hidden_activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = float(config.rope_parameters["rope_theta"])
        self.layers = [VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array | None) -> mx.array:
        cos, sin = axial_rope(positions, self.head_dim, self.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class VisionPatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, pixel_values: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # Pixels arrive in [0, 1]; the model wants [-1, 1].
        x = self.input_proj((2 * (pixel_values - 0.5)).astype(compute_dtype(self.input_proj)))  # (B, L, h)
        clamped = mx.maximum(positions, 0)  # padding (-1) -> a valid row, zeroed below
        pos = self.position_embedding_table[0][clamped[..., 0]] + self.position_embedding_table[1][clamped[..., 1]]
        pos = mx.where(padding[..., None], mx.zeros((), dtype=pos.dtype), pos)  # (B, L, h)
        return x + pos


class VisionModel(nn.Module):
    """Patches -> soft tokens. ``__call__`` returns the valid soft tokens of every image, concatenated in
    batch order (each image's in row-major order of its pooled grid), as the reference's vision tower."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = VisionPatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def _pool_plan(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Where each patch pools to (flat over the batch) and which pooled cells hold real patches.

        Returns (cell index per patch [B*L], gather index of valid cells [T], cells per image)."""
        k = self.config.pooling_kernel_size
        B, L, _ = positions.shape
        cells = max(L // (k * k), 1)
        clamped = np.maximum(positions, 0)  # (B, L, 2)
        width = clamped[..., 0].max(axis=-1, keepdims=True) + 1  # (B, 1) patches per row
        cell = clamped[..., 0] // k + (width // k) * (clamped[..., 1] // k)  # (B, L)
        if cell.max(initial=0) >= cells:
            raise ValueError(f"Patch positions do not fit {cells} soft tokens; were they made by the processor?")
        flat = cell + cells * np.arange(B)[:, None]  # (B, L) index into (B * cells)
        used = np.zeros(B * cells, dtype=bool)
        used[flat.reshape(-1)] = True  # as the reference: a cell is kept if any patch (padding too) maps to it
        return flat.reshape(-1), np.nonzero(used)[0], cells

    def __call__(self, pixel_values: mx.array, position_ids: mx.array | np.ndarray) -> mx.array:
        """pixel_values (B, L, 3*p*p) in [0, 1]; position_ids (B, L, 2) as (x, y), (-1, -1) for padding.
        Returns (num_valid_soft_tokens, hidden_size)."""
        positions = np.asarray(position_ids).astype(np.int64)  # host copy: pooling layout is data-dependent
        if positions.ndim == 2:
            positions, pixel_values = positions[None], pixel_values[None]
        B, L, _ = positions.shape
        k2 = self.config.pooling_kernel_size**2
        flat_cell, keep, cells = self._pool_plan(positions)
        padding_np = (positions == -1).all(axis=-1)  # (B, L)
        # Columns that are padding in every image do no work: drop them before the encoder.
        real_cols = np.nonzero(~padding_np.all(axis=0))[0]
        n = int(real_cols[-1]) + 1 if real_cols.size else 1
        pixel_values = mx.array(pixel_values)[:, :n]  # (B, n, 3*p*p)
        pos = mx.array(positions[:, :n])  # (B, n, 2)
        padding = mx.array(padding_np[:, :n])  # (B, n)
        mask = None if not padding_np[:, :n].any() else (~padding)[:, None, None, :]  # (B, 1, 1, n) keys

        x = self.patch_embedder(pixel_values, pos, padding)  # (B, n, h)
        x = self.encoder(x, pos, mask)  # (B, n, h)
        x = mx.where(padding[..., None], mx.zeros((), dtype=x.dtype), x)

        # Average each k x k block of patches: scatter-add into its cell, then divide by k^2 (padding adds 0).
        h = x.shape[-1]
        idx = mx.array(flat_cell.reshape(B, L)[:, :n].reshape(-1))  # (B*n,)
        pooled = mx.zeros((B * cells, h), dtype=mx.float32).at[idx].add(x.reshape(B * n, h).astype(mx.float32))
        pooled = pooled[mx.array(keep)] / k2  # (T, h) valid soft tokens, batch-major
        # sqrt(hidden) scaling and standardization in float32, as the reference (float16 would overflow).
        pooled = pooled * math.sqrt(h)
        if self.config.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(x.dtype)


def encode_images(
    vision_tower: VisionModel,
    embed_vision: MultimodalEmbedder,
    pixel_values: mx.array | np.ndarray,
    position_ids: mx.array | np.ndarray,
) -> mx.array:
    """Processor output -> (total_soft_tokens, text_hidden), in the order the image placeholder tokens appear
    in the prompt (image by image; padding soft tokens already dropped), ready to scatter into them."""
    return embed_vision(vision_tower(mx.array(pixel_values), position_ids))
