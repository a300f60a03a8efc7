"""Gemma 4 text decoder in MLX.

Reference: transformers ``models/gemma4/modeling_gemma4.py`` (Gemma4TextModel and its parts). Attribute names
follow the Hugging Face parameter names so checkpoints load without renaming. Sliding layers use the default RoPE
over ``head_dim``; full layers use proportional (partial) RoPE over ``global_head_dim``. The last
``num_kv_shared_layers`` layers have no K/V projections: they attend to the keys and values that the last earlier
layer of their type produced in the same forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import FULL, SLIDING, TextConfig
from .errors import ContextLengthError
from .layers import RMSNorm
from .moe import MoEBlock


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by a constant, rounded to the weight dtype as the reference does."""

    def __init__(self, num_embeddings: int, dims: int, scale: float):
        super().__init__(num_embeddings, dims)
        self.embed_scale = scale

    def __call__(self, ids: mx.array) -> mx.array:
        x = super().__call__(ids)
        return x * mx.array(self.embed_scale, dtype=x.dtype)


def _rope_freqs(head_dim: int, params: dict) -> mx.array:
    """Per-pair RoPE periods for ``mx.fast.rope`` (``inf`` = that pair is not rotated)."""
    theta = float(params.get("rope_theta", 10_000.0))
    factor = float(params.get("factor", 1.0))
    kind = params.get("rope_type", "default")
    if kind == "default":
        rotated = head_dim // 2
    elif kind == "proportional":
        # Proportional RoPE rotates the first partial_rotary_factor of the pairs, with exponents over the whole head_dim.
        rotated = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    else:
        raise ValueError(f"Unsupported rope_type {kind!r} for Gemma 4 text layers.")
    exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
    periods = factor * (theta**exponents)
    return mx.concatenate([periods, mx.full((head_dim // 2 - rotated,), mx.inf)])


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, x: mx.array) -> mx.array:
    """gelu_tanh(gate) * x as one fused kernel (and one graph node to build per call, which decode feels)."""
    return nn.gelu_approx(gate) * x


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


@dataclass
class LayerContext:
    """What every layer of one forward pass needs besides the hidden states."""

    offset: int | mx.array           # absolute position of the first query token
    masks: dict                      # layer type -> mask for sdpa (None, "causal" or a bool array)
    shared_kv: dict                  # layer type -> (keys, values) of the last producer of that type


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[idx]
        self.head_dim = cfg.layer_head_dims[idx]
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.layer_kv_heads[idx]
        self.is_shared = cfg.is_kv_shared(idx)
        self.k_eq_v = cfg.attention_k_eq_v and self.layer_type == FULL
        bias = cfg.attention_bias
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if not self.is_shared:
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self._freqs = _rope_freqs(self.head_dim, cfg.rope_parameters[self.layer_type])

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._freqs)

    def __call__(self, x: mx.array, ctx: LayerContext, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))  # (B, L, H, D)
        q = self._rope(q.transpose(0, 2, 1, 3), ctx.offset)                         # (B, H, L, D)

        if self.is_shared:
            k, v = ctx.shared_kv[self.layer_type]
        else:
            raw_k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)    # (B, L, Hkv, D)
            raw_v = raw_k if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
            k = self._rope(self.k_norm(raw_k).transpose(0, 2, 1, 3), ctx.offset)    # (B, Hkv, L, D)
            v = self.v_norm(raw_v).transpose(0, 2, 1, 3)                            # (B, Hkv, L, D)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            ctx.shared_kv[self.layer_type] = (k, v)

        # q/k norms replace the usual 1/sqrt(d) scaling in Gemma 4, hence scale=1.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=ctx.masks[self.layer_type])
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, idx: int):
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, idx)
        wide = cfg.use_double_wide_mlp and cfg.is_kv_shared(idx)
        self.mlp = MLP(hidden, cfg.intermediate_size * (2 if wide else 1))
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = mx.ones((1,))
        self.enable_moe = cfg.enable_moe_block
        if self.enable_moe:
            self.router, self.experts = MoEBlock.router_and_experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.ple_dim = cfg.hidden_size_per_layer_input
        if self.ple_dim:
            self.per_layer_input_gate = nn.Linear(hidden, self.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(self.ple_dim, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)

    def __call__(self, x: mx.array, per_layer_input: mx.array | None, ctx: LayerContext,
                 cache: KVCache | None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx, cache))

        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self.enable_moe:
            # The experts read the residual stream before the dense MLP, and the two outputs are summed.
            weights, indices = self.router(h)
            moe = self.experts(self.pre_feedforward_layernorm_2(h), indices, weights)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(ff)

        if self.ple_dim:
            gated = geglu(self.per_layer_input_gate(h), per_layer_input)
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar


class TextModel(nn.Module):
    """Gemma4TextModel: embeddings, decoder layers and the final norm (the head lives in model.Gemma4)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.hidden_size**0.5)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eval_every_layer_from = 64  # tokens
        self.ple_dim = cfg.hidden_size_per_layer_input
        if self.ple_dim:
            n = cfg.num_hidden_layers
            self.embed_tokens_per_layer = ScaledEmbedding(cfg.vocab_size_per_layer_input, n * self.ple_dim,
                                                          self.ple_dim**0.5)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n * self.ple_dim, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, cfg.rms_norm_eps)

    # -- per-layer embeddings (PLE) -------------------------------------------------------------------------
    def per_layer_token_inputs(self, ids: mx.array) -> mx.array:
        """Token-identity half of PLE: one table row per token, (B, L, n_layers, ple_dim)."""
        table = self.embed_tokens_per_layer
        rows = table(ids)
        return rows.reshape(*ids.shape, len(self.layers), self.ple_dim)

    def _combine_per_layer_inputs(self, embeds: mx.array, token_inputs: mx.array) -> mx.array:
        B, L, _ = embeds.shape
        proj = self.per_layer_model_projection(embeds) * (embeds.shape[-1] ** -0.5)
        proj = self.per_layer_projection_norm(proj.reshape(B, L, len(self.layers), self.ple_dim))
        return (proj + token_inputs.astype(proj.dtype)) * (2.0**-0.5)    # (B, L, n_layers, ple_dim)

    # -- forward ----------------------------------------------------------------------------------------------
    def __call__(
        self,
        embeds: mx.array,
        per_layer_token_inputs: mx.array | None = None,
        cache: list[KVCache] | None = None,
        vision_blocks: mx.array | None = None,
        logits_to_keep: int = 0,
        run_shared_layers: bool = True,
        step_context: LayerContext | None = None,
    ) -> mx.array | None:
        """Run the decoder on ``embeds`` (B, L, hidden) and return the final-normed hidden states.

        ``vision_blocks`` (L,) int32 marks vision soft tokens with a block id (-1 elsewhere); sliding layers let
        tokens of one block see each other when ``use_bidirectional_attention == "vision"``.
        ``logits_to_keep`` > 0 keeps only the last positions from the first KV-shared layer on: those layers
        write no cache, so earlier positions are not needed there. ``run_shared_layers=False`` stops before them
        (a prefill chunk whose logits nobody reads) and returns None. ``step_context`` replaces the offset and
        masks derived from ``cache`` (the compiled decode step passes traced ones; see decode.py).
        """
        cfg = self.config
        B, L, _ = embeds.shape
        if step_context is None:
            offset = cache[0].offset if cache else 0
            if offset + L > cfg.max_position_embeddings:
                raise ContextLengthError(
                    f"The prompt needs {offset + L} positions but the model handles {cfg.max_position_embeddings}. "
                    "Shorten the prompt or start a new conversation."
                )
            ctx = LayerContext(offset=offset, masks=self._masks(L, offset, cache, vision_blocks), shared_kv={})
        else:
            ctx = step_context
        per_layer = None
        if self.ple_dim:
            per_layer = self._combine_per_layer_inputs(embeds, per_layer_token_inputs)

        h = embeds
        first_shared = cfg.first_kv_shared_layer
        for i, layer in enumerate(self.layers):
            if i == first_shared:
                if not run_shared_layers:
                    return None
                if 0 < logits_to_keep < L:
                    h, per_layer, ctx = self._keep_last(h, per_layer, ctx, logits_to_keep, L)
            layer_cache = cache[i] if cache is not None and i < first_shared else None
            h = layer(h, per_layer[:, :, i] if per_layer is not None else None, ctx, layer_cache)
            if h.shape[1] >= self.eval_every_layer_from:
                # Long inputs: finish each layer before building the next. On GPU backends whose frees wait for
                # the stream, one lazy graph over all layers keeps every layer's temporaries alive at once.
                mx.eval(h, *((layer_cache.keys, layer_cache.values) if layer_cache is not None else ()))
        if not run_shared_layers:
            return None
        if 0 < logits_to_keep < h.shape[1]:
            h = h[:, -logits_to_keep:]
        return self.norm(h)

    def _masks(self, L: int, offset: int, cache, vision_blocks) -> dict:
        """One attention mask per layer type. Decoding one token needs none: every cached key is visible."""
        if L == 1:
            return {FULL: None, SLIDING: None}
        q_pos = mx.arange(offset, offset + L)
        window = self.config.sliding_window
        # Sliding caches hand back the previous window - 1 tokens (at most) before the new ones.
        prev = min(offset, window - 1) if cache else 0
        k_pos = mx.arange(offset - prev, offset + L)
        sliding = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        if vision_blocks is not None and self.config.use_bidirectional_attention == "vision":
            k_blocks = mx.concatenate([mx.full((prev,), -1, dtype=vision_blocks.dtype), vision_blocks])
            same = (vision_blocks[:, None] == k_blocks[None, :]) & (vision_blocks[:, None] >= 0)
            sliding = sliding | (same & (k_pos[None, :] > q_pos[:, None] - window))
        return {FULL: "causal", SLIDING: sliding}

    @staticmethod
    def _keep_last(h, per_layer, ctx: LayerContext, n: int, L: int):
        h = h[:, -n:]
        per_layer = per_layer[:, -n:] if per_layer is not None else None
        # sdpa's "causal" is aligned bottom-right, so it stays right when only the last queries remain.
        masks = {t: m[-n:] if isinstance(m, mx.array) else m for t, m in ctx.masks.items()}
        return h, per_layer, LayerContext(offset=ctx.offset + L - n, masks=masks, shared_kv=ctx.shared_kv)
