"""Gemma 4 audio tower in MLX: log-mel frames -> soft tokens in the text model's embedding space.

Reference: transformers ``models/gemma4/modeling_gemma4.py`` (``Gemma4AudioModel`` and the ``Gemma4Audio*``
classes, ``Gemma4ClippableLinear``, ``Gemma4MultimodalEmbedder``), a Universal-Speech-Model conformer:

1. two stride-2 3x3 convs over (time, mel) with LayerNorm + ReLU (4x fewer frames: one token per 40 ms),
   flattened and projected to ``hidden_size``;
2. conformer layers: half-step feed-forward, chunked local self-attention (each chunk of queries sees
   ``attention_context_left - 1`` past frames through a relative sinusoidal position bias, logits soft-capped,
   queries scaled per dimension), a light causal depthwise conv block, a second half-step feed-forward;
3. a linear output projection; ``MultimodalEmbedder`` then RMS-normalises and projects into text space.

Attribute names equal the Hugging Face parameter names (minus the leading ``model.``), so a checkpoint loads
into ``audio_tower`` / ``embed_audio`` after ``AudioModel.sanitize`` moves conv weights to channels-last.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import AudioConfig
from .layers import ClippableLinear, LayerNorm, MultimodalEmbedder, RMSNorm


def _clip_value(gradient_clipping: float, dtype: mx.Dtype) -> float:
    # The reference clamps with min(gradient_clipping, finfo(dtype).max) to stay finite in half precision.
    return min(gradient_clipping, mx.finfo(dtype).max)


class SubSampleConvLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = LayerNorm(out_channels, eps=eps, affine=True, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        # x: (B, T, F, C) channels-last; padded frames are zeroed before each conv.
        x = x * mask[:, :, None, None].astype(x.dtype)
        # As the reference: the (float32) features are cast to the conv's dtype, so the tower runs in the model's.
        x = nn.relu(self.norm(self.conv(x.astype(self.conv.weight.dtype))))  # (B, ceil(T/2), ceil(F/2), C_out)
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubSampleConvLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubSampleConvLayer(c0, c1, config.rms_norm_eps)
        # The reference sizes this as (c0 // 4) * c1, which equals the flattened (mel / 4) * c1 only when
        # c0 equals the number of mel bins (128 in every published checkpoint).
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = features[..., None]  # (B, T, F) -> (B, T, F, 1)
        x, mask = self.layer0(x, mask)
        x, mask = self.layer1(x, mask)
        b, t, f, c = x.shape
        x = x.reshape(b, t, f * c)  # (B, T', F', C) -> (B, T', F' * C), frequency-major like the reference
        return self.input_proj_linear(x), mask


def relative_position_embeddings(config: AudioConfig) -> mx.array:
    """Sinusoids for relative distances context//2 ... 0: (context // 2 + 1, hidden_size), [sin | cos]."""
    context = config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
    half = config.hidden_size // 2
    inv_timescales = np.exp(np.arange(half) * -(math.log(10_000.0) / max(half - 1, 1))).astype(np.float32)
    distances = np.arange(context // 2, -1, -1, dtype=np.float32)[:, None]  # (P, 1)
    scaled = distances * inv_timescales[None, :]  # (P, half)
    return mx.array(np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1))


class AudioAttention(nn.Module):
    """Chunked local self-attention with a Transformer-XL style relative position term."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.logit_cap = config.attention_logit_cap
        self.invalid_logit = config.attention_invalid_logits_value
        # Queries carry 1/sqrt(d) and a learned per-dimension softplus scale; both sides a base-2 log factor.
        self.q_scale = (self.head_dim ** -0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        dims = self.num_heads * self.head_dim
        self.q_proj = ClippableLinear(config.hidden_size, dims, config.use_clipped_linears)
        self.k_proj = ClippableLinear(config.hidden_size, dims, config.use_clipped_linears)
        self.v_proj = ClippableLinear(config.hidden_size, dims, config.use_clipped_linears)
        self.post = ClippableLinear(config.hidden_size, config.hidden_size, config.use_clipped_linears)
        self.relative_k_proj = nn.Linear(config.hidden_size, dims, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def _context_windows(self, x: mx.array) -> mx.array:
        """(B, T, H, D) -> (B, NB, context, H, D): for block n, frames n*chunk - past ... n*chunk + chunk-1 + future."""
        b, t, h, d = x.shape
        nb = -(-t // self.chunk)
        x = mx.pad(x, [(0, 0), (self.past, self.future + self.chunk - 1), (0, 0), (0, 0)])
        idx = mx.arange(nb)[:, None] * self.chunk + mx.arange(self.context)[None, :]  # (NB, context)
        return x[:, idx]  # (B, NB, context, H, D)

    def _rel_shift(self, x: mx.array) -> mx.array:
        """(B, H, NB, C, P) scores per distance slot -> (B, H, NB, C, context) scores per key slot.

        Padding each row to context + 1 and re-reading the flat buffer with stride ``context`` shifts row i
        right by i, so key slot j of query i lands on distance slot j - i (zero where no distance applies)."""
        b, h, nb, c, p = x.shape
        x = mx.pad(x, [(0, 0)] * 4 + [(0, self.context + 1 - p)])  # (B, H, NB, C, context + 1)
        x = x.reshape(b, h, nb, c * (self.context + 1))[..., : c * self.context]
        return x.reshape(b, h, nb, c, self.context)

    def __call__(self, x: mx.array, pos_embed: mx.array, allowed: mx.array) -> mx.array:
        # x: (B, T, hidden); pos_embed: (P, hidden); allowed: (B, NB, C, context) bool.
        b, t, _ = x.shape
        h, d, c = self.num_heads, self.head_dim, self.chunk
        q = self.q_proj(x).astype(mx.float32).reshape(b, t, h, d)  # (B, T, H, D)
        k = self.k_proj(x).astype(mx.float32).reshape(b, t, h, d)
        v = self.v_proj(x).astype(mx.float32).reshape(b, t, h, d)
        q = q * self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32))
        k = k * self.k_scale

        nb = -(-t // c)
        q = mx.pad(q, [(0, 0), (0, nb * c - t), (0, 0), (0, 0)]).reshape(b, nb, c, h, d)  # (B, NB, C, H, D)
        q = q.transpose(0, 3, 1, 2, 4)  # (B, H, NB, C, D)
        k = self._context_windows(k).transpose(0, 3, 1, 4, 2)  # (B, H, NB, D, context)
        v = self._context_windows(v).transpose(0, 3, 1, 2, 4)  # (B, H, NB, context, D)

        rel_k = self.relative_k_proj(pos_embed.astype(x.dtype)).astype(mx.float32)  # (P, H * D)
        rel_k = rel_k.reshape(-1, h, d).transpose(1, 2, 0)  # (P, H, D) -> (H, D, P)
        content = q @ k  # (B, H, NB, C, context)
        position = (q.reshape(b, h, nb * c, d) @ rel_k).reshape(b, h, nb, c, -1)  # (B, H, NB, C, P)
        logits = content + self._rel_shift(position)
        logits = mx.tanh(logits / self.logit_cap) * self.logit_cap
        logits = mx.where(allowed[:, None], logits, mx.array(self.invalid_logit, mx.float32))
        weights = mx.softmax(logits, axis=-1, precise=True)
        out = (weights @ v).transpose(0, 2, 3, 1, 4)  # (B, H, NB, C, D) -> (B, NB, C, H, D)
        out = out.reshape(b, nb * c, h * d)[:, :t]  # (B, T, H * D)
        return self.post(out.astype(x.dtype))


class FeedForward(nn.Module):
    """Macaron half-step: x + residual_weight * norm(W2 act(W1 norm(x)))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.ffw_layer_1 = ClippableLinear(config.hidden_size, 4 * config.hidden_size, config.use_clipped_linears)
        self.ffw_layer_2 = ClippableLinear(4 * config.hidden_size, config.hidden_size, config.use_clipped_linears)
        self.pre_layer_norm = RMSNorm(config.hidden_size)
        self.post_layer_norm = RMSNorm(config.hidden_size)
        self.residual_weight = config.residual_weight
        self.gradient_clipping = config.gradient_clipping
        self.act = _activation(config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        lim = _clip_value(self.gradient_clipping, x.dtype)
        y = self.pre_layer_norm(mx.clip(x, -lim, lim))
        y = self.ffw_layer_2(self.act(self.ffw_layer_1(y)))
        y = self.post_layer_norm(mx.clip(y, -lim, lim))
        return x + y * self.residual_weight


class LightConv1d(nn.Module):
    """GLU, a causal depthwise conv over time, norm, activation, projection; residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.linear_start = ClippableLinear(hidden, 2 * hidden, config.use_clipped_linears)
        self.linear_end = ClippableLinear(hidden, hidden, config.use_clipped_linears)
        self.kernel_size = config.conv_kernel_size
        self.depthwise_conv1d = nn.Conv1d(hidden, hidden, config.conv_kernel_size, groups=hidden, bias=False)
        self.pre_layer_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.conv_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.gradient_clipping = config.gradient_clipping
        self.act = _activation(config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear_start(self.pre_layer_norm(x))  # (B, T, 2 * hidden)
        a, gate = mx.split(y, 2, axis=-1)
        y = a * mx.sigmoid(gate)  # (B, T, hidden)
        y = mx.pad(y, [(0, 0), (self.kernel_size - 1, 0), (0, 0)])  # causal: only past frames
        y = self.depthwise_conv1d(y)  # (B, T, hidden)
        lim = _clip_value(self.gradient_clipping, y.dtype)
        y = self.act(self.conv_norm(mx.clip(y, -lim, lim)))
        return x + self.linear_end(y)


class ConformerLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = AudioAttention(config)
        self.lconv1d = LightConv1d(config)
        self.norm_pre_attn = RMSNorm(config.hidden_size)
        self.norm_post_attn = RMSNorm(config.hidden_size)
        self.norm_out = RMSNorm(config.hidden_size)
        self.gradient_clipping = config.gradient_clipping

    def __call__(self, x: mx.array, pos_embed: mx.array, allowed: mx.array) -> mx.array:
        lim = _clip_value(self.gradient_clipping, self.norm_pre_attn.weight.dtype)
        x = self.feed_forward1(x)
        y = self.self_attn(self.norm_pre_attn(mx.clip(x, -lim, lim)), pos_embed, allowed)
        x = x + self.norm_post_attn(mx.clip(y, -lim, lim))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(mx.clip(x, -lim, lim))


def _activation(name: str):
    acts = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx,
            "relu": nn.relu}
    if name not in acts:
        raise ValueError(f"Unsupported audio hidden_act {name!r}; expected one of {sorted(acts)}")
    return acts[name]


class AudioModel(nn.Module):
    """The audio encoder: ``(features (B, T, mel), mask (B, T)) -> (soft tokens (B, T/4, out), mask (B, T/4))``."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.layers = [ConformerLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)
        self._pos_embed = relative_position_embeddings(config)  # leading "_": not a parameter

    def attention_mask(self, valid: mx.array) -> mx.array:
        """(B, T) valid frames -> (B, NB, chunk, context) bool: key frame allowed for query frame.

        A key is allowed when it is a real (unpadded) frame of this clip, at most ``attention_context_left - 1``
        frames before the query counting the query itself, or at most ``attention_context_right - 1`` after it,
        exactly the reference's sliding-window-and-padding mask folded into blocks."""
        c = self.config
        b, t = valid.shape
        past, chunk = c.attention_context_left - 1, c.attention_chunk_size
        context = chunk + past + c.attention_context_right
        nb = -(-t // chunk)
        q_pos = (mx.arange(nb) * chunk)[:, None] + mx.arange(chunk)[None, :]  # (NB, C)
        k_pos = (mx.arange(nb) * chunk - past)[:, None] + mx.arange(context)[None, :]  # (NB, context)
        dist = q_pos[:, :, None] - k_pos[:, None, :]  # (NB, C, context)
        window = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < c.attention_context_right))
        inside = (k_pos >= 0) & (k_pos < t)  # (NB, context)
        key_valid = valid[:, mx.clip(k_pos, 0, t - 1)] & inside  # (B, NB, context)
        query_real = (q_pos < t)[:, :, None]  # (NB, C, 1): rows past the end see nothing
        return window[None] & query_real[None] & key_valid[:, :, None, :]  # (B, NB, C, context)

    def __call__(self, input_features: mx.array, input_features_mask: mx.array) -> tuple[mx.array, mx.array]:
        x, valid = self.subsample_conv_projection(input_features, input_features_mask.astype(mx.bool_))
        allowed = self.attention_mask(valid)
        for layer in self.layers:
            x = layer(x, self._pos_embed, allowed)
        return self.output_proj(x), valid  # (B, T', output_proj_dims), (B, T')

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Move PyTorch-layout conv weights to MLX's channels-last layout; keys may carry any prefix.

        Idempotent: a weight already in MLX layout is left alone. (Layouts are ambiguous only for a 2-D conv
        with 3 input channels or a depthwise kernel of size 1; no Gemma 4 config has either.)"""
        out = {}
        for key, w in weights.items():
            if key.endswith(("subsample_conv_projection.layer0.conv.weight",
                             "subsample_conv_projection.layer1.conv.weight")) and w.ndim == 4:
                if w.shape[2:] == (3, 3) and w.shape[1:3] != (3, 3):
                    w = w.transpose(0, 2, 3, 1)  # (out, in, kh, kw) -> (out, kh, kw, in)
            elif key.endswith("lconv1d.depthwise_conv1d.weight") and w.ndim == 3:
                if w.shape[1] == 1 and w.shape[2] != 1:
                    w = w.transpose(0, 2, 1)  # (C, 1, K) -> (C, K, 1)
            out[key] = w
        return out


# Segments (30 s clips) through the tower at once: its activations grow with the batch (the subsampling convs
# alone hold ~200 MB per segment at real sizes), so a long recording goes through a few segments at a time.
SEGMENTS_PER_BATCH = 4


def encode_audio(audio_tower: AudioModel, embed_audio: MultimodalEmbedder, input_features: mx.array,
                 input_features_mask: mx.array, batch_size: int = SEGMENTS_PER_BATCH) -> mx.array:
    """Soft tokens for every valid frame, clip by clip in batch order: (total_soft_tokens, text_hidden).

    This is the order the reference scatters them into the audio placeholder positions (it keeps
    ``features[mask]``, row-major), and the count per clip equals the processor's placeholder count.
    Rows go through the tower ``batch_size`` at a time, each batch evaluated before the next, so peak memory
    does not grow with the recording's length (only the soft tokens themselves do)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    out = []
    for start in range(0, input_features.shape[0], batch_size):
        hidden, valid = audio_tower(input_features[start:start + batch_size],
                                    input_features_mask[start:start + batch_size])
        embeds = embed_audio(hidden)  # (B, T', text_hidden)
        b, t, dim = embeds.shape
        keep = np.flatnonzero(np.array(valid.reshape(-1)))  # valid positions, row-major
        tokens = embeds.reshape(b * t, dim)[mx.array(keep, dtype=mx.int32)]  # (valid in batch, text_hidden)
        mx.eval(tokens)
        out.append(tokens)
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=0)  # (total_soft_tokens, text_hidden)
