"""Gemma 4 text decoder in MLX.

Reference: transformers ``models/gemma4/modeling_gemma4.py`` (Gemma4TextModel and its parts). Attribute names
follow the Hugging Face parameter names so checkpoints load without renaming. Sliding layers use the default RoPE
over ``head_dim``; full layers use proportional (partial) RoPE over ``global_head_dim``. The last
``num_kv_shared_layers`` layers have no K/V projections: they attend to the keys and values that their producer
(``config.kv_producers``: the last earlier layer of their type) wrote in the same forward pass. Caches are asked
for masks and K/V through their methods (cache.py); nothing here knows how a cache lays out its buffers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import decode_attention
from .cache import KVCache, Mask, window_mask
from .config import FULL, SLIDING, TextConfig
from .layers import RMSNorm
from .moe import MoEBlock
from .projection import gated, project


def _scaled(x: mx.array, scale: float) -> mx.array:
    """An embedding lookup times its constant, the constant rounded to the lookup's dtype as the reference does."""
    return x * mx.array(scale, dtype=x.dtype)


def _rope_freqs(head_dim: int, params: dict) -> mx.array:
    """Per-pair RoPE periods for ``mx.fast.rope`` (``inf`` = that pair is not rotated)."""
    theta = float(params.get("rope_theta", 10_000.0))
    factor = float(params.get("factor", 1.0))
    kind = params.get("rope_type", "default")
    if kind == "default":
        rotated = head_dim // 2
    elif kind == "proportional":
        # Proportional RoPE rotates the first partial_rotary_factor of the pairs, exponents over the whole head_dim.
        rotated = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    else:
        raise ValueError(f"Unsupported rope_type {kind!r} for Gemma 4 text layers.")
    exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
    periods = factor * (theta**exponents)
    return mx.concatenate([periods, mx.full((head_dim // 2 - rotated,), mx.inf)])


def _fused_attention_sizes() -> tuple[int, int, int]:
    """Where mx.fast's attention is the better path on the default device, as MLX 0.32 has it: (head size up to
    which it has a fused kernel for any number of queries; head size up to which a few-query (decode) pass takes
    mx.fast; and how many query rows, the query heads of one K/V head counted, such a pass may have). None on the
    CPU. CUDA: fused 128; for few queries at any head size mx.fast's own fallback beats the written-out math below
    (an H200, 12B decode 79.9 against 73.5 tok/s: it keeps one query row per batch entry, which MLX runs as
    matrix-vector products). Metal: fused 128, and 256 for up to 8 queries (32 rows)."""
    if mx.default_device() != mx.gpu:
        return 0, 0, 0
    return (128, 256, 32) if mx.metal.is_available() else (128, 1 << 30, 1 << 30)


def attention(q: mx.array, k: mx.array, v: mx.array, mask: Mask, heads_last: bool = False) -> mx.array:
    """softmax(q k^T, masked) v for q (B, H, L, D) and k, v (B, Hkv, N, D), scale 1 (Gemma 4's q/k norms replace
    1/sqrt(d)). Where the backend has a fused kernel for this head size, mx.fast's; elsewhere (Gemma 4's 256 and
    512 wide heads on CUDA and the CPU, 512 on Metal) MLX would run its unfused fallback, and this is that math
    written out, with the query heads that share a K/V head stacked into one matmul instead of a broadcast batch,
    and no multiply by a scale of 1: the same numbers, from fewer and larger kernels. On CUDA, a few queries (a
    decode step, a verify) take decode_attention.py's two kernels instead of MLX's ~11-node fallback.
    ``heads_last``: (B, L, H * D) instead, what the output projection reads (the decode kernels write it so)."""
    if decode_attention.fits(q, k, v, mask):   # CUDA, a few queries: two kernels of our own
        return decode_attention.attend(q, k, v, mask, heads_last)
    out = _attention(q, k, v, mask)
    if heads_last:
        B, H, L, D = out.shape
        return out.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    return out


def _attention(q: mx.array, k: mx.array, v: mx.array, mask: Mask) -> mx.array:
    B, H, L, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    rep = H // Hkv
    fused, few_queries, few_rows = _fused_attention_sizes()
    if D <= fused or (L <= 8 and L * rep <= few_rows and D <= few_queries):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    scores = q.reshape(B, Hkv, rep * L, D) @ k.swapaxes(-1, -2)                  # (B, Hkv, rep * L, N)
    if mask is not None:
        if isinstance(mask, str):  # "causal": the queries are the last L positions, as sdpa aligns it
            mask = mx.arange(N - L, N)[:, None] >= mx.arange(N)[None]
        lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
        scores = mx.where(mask, scores.reshape(B, Hkv, rep, L, N), lowest).reshape(B, Hkv, rep * L, N)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(B, H, L, v.shape[-1])


def last_queries(mask: Mask, n: int) -> Mask:
    """``mask`` (one row per query) for its last ``n`` queries only; sdpa's "causal" is aligned bottom-right, so it
    stays as it is."""
    return mask[..., -n:, :] if isinstance(mask, mx.array) else mask


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, x: mx.array) -> mx.array:
    """gelu_tanh(gate) * x as one fused kernel (and one graph node to build per call, which decode feels)."""
    return nn.gelu_approx(gate) * x


def fuse_linears(*linears: nn.Module | None) -> nn.Module | None:
    """One projection computing all of ``linears``' outputs side by side, or None when they cannot share one
    matmul (a missing one, a bias, different types or quantization). Same numbers: every output column of a
    (quantized) matmul is computed on its own."""
    first = linears[0]
    if any(m is None or type(m) is not type(first) or "bias" in m for m in linears):
        return None
    kind = [(getattr(m, "bits", None), getattr(m, "group_size", None), getattr(m, "mode", None)) for m in linears]
    if len(set(kind)) != 1:
        return None
    fused = copy.copy(first)
    for name in ("weight", "scales", "biases"):
        if name in first:
            fused[name] = mx.concatenate([m[name] for m in linears], axis=0)       # (sum of outputs, ...)
    return fused


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            return project(self.down_proj, gated(self.gate_up_proj, x, geglu))
        return project(self.down_proj, geglu(project(self.gate_proj, x), project(self.up_proj, x)))

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by one projection to both (``gate_up_proj``): one matmul per call instead
        of two, which decoding (bound by kernel launches) feels. Done after loading."""
        fused = fuse_linears(self.get("gate_proj"), self.get("up_proj"))
        if fused is not None:
            del self["gate_proj"], self["up_proj"]
            self.gate_up_proj = fused


@dataclass
class Pass:
    """One forward pass through the decoder layers: the residual stream and what the layers need besides it."""

    h: mx.array                         # (B, L, hidden) residual stream
    per_layer: mx.array | None          # (B, L, n_layers, ple_dim) per-layer inputs (PLE), or None
    offset: int | mx.array              # absolute position of h[:, 0] (traced in the compiled step)
    masks: dict[str, Mask]              # layer type -> sdpa mask over the keys its layers attend to
    kvs: dict[int, tuple]               # producer layer -> (keys, values) that KV-shared layers read

    def keep_last(self, n: int) -> None:
        """Drop all but the last ``n`` queries (the layers after this write no cache, so only the positions whose
        output is read matter)."""
        L = self.h.shape[1]
        if n >= L:
            return
        self.h = self.h[:, -n:]
        if self.per_layer is not None:
            self.per_layer = self.per_layer[:, -n:]
        self.masks = {t: last_queries(m, n) for t, m in self.masks.items()}
        self.offset = self.offset + L - n


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

    def __call__(self, x: mx.array, offset: int | mx.array, mask: Mask, cache: KVCache | None = None,
                 shared_kv: tuple[mx.array, mx.array] | None = None, queries: int | None = None
                 ) -> tuple[mx.array | None, tuple[mx.array, mx.array]]:
        """Attention output and the (keys, values) attended to: this layer's own (written to ``cache``), or
        ``shared_kv`` for a KV-shared layer. ``queries``: only the last this many positions of ``x`` ask (``mask``
        still has a row for every position; 0: none, the layer only writes its K/V and returns None for its
        output); the keys and values are those of every position."""
        B, L, _ = x.shape
        Lq = L if queries is None else queries
        if "qkv_proj" in self:
            q_out = self.n_heads * self.head_dim
            cuts = [q_out] if self.k_eq_v else [q_out, q_out + self.n_kv_heads * self.head_dim]
            q, *kv = mx.split(project(self.qkv_proj, x), cuts, axis=-1)
            q = q[:, L - Lq:]
        else:
            q, kv = (project(self.q_proj, x[:, L - Lq:]) if Lq else None), None

        if self.is_shared:
            k, v = shared_kv
        else:
            if not kv:
                kv = [project(self.k_proj, x)] if self.k_eq_v else [project(self.k_proj, x), project(self.v_proj, x)]
            raw_k = kv[0].reshape(B, L, self.n_kv_heads, self.head_dim)             # (B, L, Hkv, D)
            raw_v = raw_k if self.k_eq_v else kv[1].reshape(B, L, self.n_kv_heads, self.head_dim)
            k = self._rope(self.k_norm(raw_k).transpose(0, 2, 1, 3), offset)        # (B, Hkv, L, D)
            v = self.v_norm(raw_v).transpose(0, 2, 1, 3)                            # (B, Hkv, L, D)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        if Lq == 0:
            return None, (k, v)

        q = self.q_norm(q.reshape(B, Lq, self.n_heads, self.head_dim))              # (B, Lq, H, D)
        q = self._rope(q.transpose(0, 2, 1, 3), offset + L - Lq)                    # (B, H, Lq, D)
        if Lq < L:
            mask = last_queries(mask, Lq)
        return project(self.o_proj, attention(q, k, v, mask, heads_last=True)), (k, v)

    def fuse(self) -> None:
        """Replace q_proj, k_proj (and v_proj) by one projection (``qkv_proj``), as MLP.fuse does; a KV-shared
        layer has only q_proj and stays as it is. Done after loading."""
        if self.is_shared:
            return
        names = ["q_proj", "k_proj"] if self.k_eq_v else ["q_proj", "k_proj", "v_proj"]
        fused = fuse_linears(*(self.get(n) for n in names))
        if fused is None:
            return
        for n in names:
            del self[n]
        self.qkv_proj = fused


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

    def __call__(self, x: mx.array, per_layer_input: mx.array | None, offset: int | mx.array, mask: Mask,
                 cache: KVCache | None = None, shared_kv: tuple[mx.array, mx.array] | None = None,
                 queries: int | None = None) -> tuple[mx.array | None, tuple[mx.array, mx.array]]:
        """The layer's output and the (keys, values) its attention read. ``queries``: the layer writes the K/V of
        every position of ``x`` but computes its output for the last this many only (0: no output, None)."""
        attn, kv = self.self_attn(self.input_layernorm(x), offset, mask, cache, shared_kv, queries)
        if attn is None:
            return None, kv
        if queries is not None and queries < x.shape[1]:
            x = x[:, -queries:]
            per_layer_input = None if per_layer_input is None else per_layer_input[:, -queries:]
        h = x + self.post_attention_layernorm(attn)

        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self.enable_moe:
            # The experts read the residual stream before the dense MLP, and the two outputs are summed.
            weights, indices = self.router(h)
            moe = self.experts(self.pre_feedforward_layernorm_2(h), indices, weights)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(ff)

        if self.ple_dim:
            gated = geglu(project(self.per_layer_input_gate, h), per_layer_input)
            h = h + self.post_per_layer_input_norm(project(self.per_layer_projection, gated))
        return h * self.layer_scalar, kv


class TextModel(nn.Module):
    """Gemma4TextModel: embeddings, decoder layers and the final norm (the head lives in model.Gemma4)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        # Plain (or, once quantized, nn.QuantizedEmbedding) tables; their constant scales are applied here, in
        # embed() and per_layer_token_inputs(), so quantizing needs no special module.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = cfg.hidden_size**0.5
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        first_shared = cfg.first_kv_shared_layer
        # The producers whose K/V a shared layer reads (only those are kept for the rest of a pass).
        self._read_by_shared = set(cfg.kv_producers[first_shared:])
        self._first_of_type = {}
        for i, t in enumerate(cfg.layer_types[:first_shared]):
            self._first_of_type.setdefault(t, i)
        self.ple_dim = cfg.hidden_size_per_layer_input
        if self.ple_dim:
            n = cfg.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, n * self.ple_dim)
            self.ple_scale = self.ple_dim**0.5
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n * self.ple_dim, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, cfg.rms_norm_eps)

    def fuse(self) -> None:
        """Join the projections that read the same input in every layer (Attention.fuse, MLP.fuse): how load()
        leaves a model."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def embed(self, ids: mx.array) -> mx.array:
        """Token embeddings (B, L, hidden), scaled by sqrt(hidden)."""
        return _scaled(self.embed_tokens(ids), self.embed_scale)

    # -- per-layer embeddings (PLE) -------------------------------------------------------------------------
    def per_layer_token_inputs(self, ids: mx.array) -> mx.array:
        """Token-identity half of PLE: one table row per token, scaled by sqrt(ple_dim), (B, L, n_layers, ple_dim).
        The table is an embedding on the device or ple.MappedPerLayerEmbedding reading a mapped file."""
        rows = _scaled(self.embed_tokens_per_layer(ids), self.ple_scale)
        return rows.reshape(*ids.shape, len(self.layers), self.ple_dim)

    def _combine_per_layer_inputs(self, embeds: mx.array, token_inputs: mx.array) -> mx.array:
        B, L, _ = embeds.shape
        proj = project(self.per_layer_model_projection, embeds) * (embeds.shape[-1] ** -0.5)
        proj = self.per_layer_projection_norm(proj.reshape(B, L, len(self.layers), self.ple_dim))
        return (proj + token_inputs.astype(proj.dtype)) * (2.0**-0.5)    # (B, L, n_layers, ple_dim)

    # -- forward ----------------------------------------------------------------------------------------------
    def __call__(self, embeds: mx.array, per_layer_token_inputs: mx.array | None = None,
                 cache: list[KVCache] | None = None, vision_blocks: mx.array | None = None) -> mx.array:
        """Final-normed hidden states (B, L, hidden) for ``embeds`` (B, L, hidden) after what ``cache`` holds.

        ``vision_blocks`` (L,) int32 marks vision soft tokens with a block id (-1 elsewhere); sliding layers let
        tokens of one block see each other when ``use_bidirectional_attention == "vision"``. Callers that need
        less than every layer at every position (prefill) run the same pass in parts: ``begin``, ``run``,
        ``Pass.keep_last``, ``norm``.
        """
        p = self.begin(embeds, per_layer_token_inputs, cache, vision_blocks)
        self.run(p, cache, range(len(self.layers)))
        return self.norm(p.h)

    def begin(self, embeds: mx.array, per_layer_token_inputs: mx.array | None = None,
              cache: list[KVCache] | None = None, vision_blocks: mx.array | None = None) -> Pass:
        """A pass over ``embeds`` placed after what ``cache`` holds, with one mask per layer type from the caches."""
        L = embeds.shape[1]
        per_layer = None
        if self.ple_dim:
            per_layer = self._combine_per_layer_inputs(embeds, per_layer_token_inputs)
        offset = cache[0].offset if cache else 0
        return Pass(embeds, per_layer, offset, self._masks(L, cache, vision_blocks), {})

    def run(self, p: Pass, cache: list[KVCache] | None, layers: range,
            after_layer: Callable[[mx.array | None, KVCache | None], None] | None = None,
            narrow_last: int | None = None) -> None:
        """Run ``layers`` (consecutive, in order) over ``p``. A KV-shared layer reads the K/V its producer
        (``config.kv_producers``) wrote earlier in the same pass. ``after_layer(h, layer_cache)`` is called after
        each layer (prefill evaluates there for long inputs). ``narrow_last=n``: the last of ``layers`` writes
        the K/V of every position but computes its output for the last ``n`` only, and the pass goes on with
        those (``Pass.keep_last``); 0: it only writes its K/V and ``p.h`` becomes None (nothing after it reads
        more: prefill's last layer before the KV-shared ones, or the last of all)."""
        producers = self.config.kv_producers
        for i in layers:
            src = producers[i]
            layer_cache = cache[i] if cache is not None and src == i else None
            args = (p.h, p.per_layer[:, :, i] if p.per_layer is not None else None, p.offset,
                    p.masks[self.config.layer_types[i]], layer_cache, p.kvs[src] if src != i else None)
            queries = narrow_last if i == layers[-1] else None
            if queries:
                p.keep_last(queries)
            p.h, kv = self.layers[i](*args, queries=queries)
            if i in self._read_by_shared:
                p.kvs[i] = kv
            if after_layer is not None:
                after_layer(p.h, layer_cache)

    def _masks(self, L: int, cache: list[KVCache] | None, vision_blocks: mx.array | None) -> dict[str, Mask]:
        """One mask per layer type, asked of the first cache of that type (all caches of a type hold the same
        positions)."""
        cfg = self.config
        blocks = vision_blocks if cfg.use_bidirectional_attention == "vision" else None
        # gemma4 opens vision blocks in the sliding layers only; gemma4_unified's reference forward in every layer.
        every = cfg.vision_block_layers == "every"
        if cache:
            return {t: cache[i].make_mask(L, blocks if t == SLIDING or every else None)
                    for t, i in self._first_of_type.items()}
        if L == 1:
            return {FULL: None, SLIDING: None}
        full = window_mask(L, 0, 0, L + 1, blocks) if every and blocks is not None else "causal"
        return {FULL: full, SLIDING: window_mask(L, 0, 0, cfg.sliding_window, blocks, not every)}
