"""Gemma 4's assistant drafter: a few decoder layers that draft tokens for speculative decoding.

Reference: transformers ``models/gemma4_assistant/`` (``Gemma4AssistantForCausalLM``; the unified variant differs
only in its target). The drafter has no cache and no prefill of its own. Its input is the target's token
embedding of the last token beside the target's last (final-normed) hidden state, projected down
(``pre_projection``); every layer is KV-shared with the *target*: it attends to the keys and values of the target's
last producer layer of its type, at one constant position (the last token's). Its final hidden state, projected
back up (``post_projection``), stands in for the target's hidden state when it drafts the next token.

The head is the tied embedding, or, with ``use_ordered_embeddings``, a centroid-masked head: a small linear scores
``num_centroids`` token clusters, and only the tokens of the ``centroid_intermediate_top_k`` best clusters get
logits (the rest get the smallest of those minus one). Drafting takes the argmax, so it needs only those
logits (``draft_token``); ``__call__`` returns the full row as the reference does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, Mask
from .config import FULL, SLIDING, TextConfig
from .config_checks import Section
from .errors import ConfigError, InputError, with_article
from .layers import RMSNorm
from .projection import head, project
from .text import DecoderLayer

logger = logging.getLogger(__name__)

ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
EXTERNAL = -1   # kv_producers entry of a drafter layer: its K/V come from the target model


@dataclass
class AssistantConfig(Section):
    text_config: TextConfig
    model_type: str = "gemma4_assistant"
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        t = self.text_config
        # Every drafter layer reads the target's K/V; TextConfig's own KV-sharing rule (an earlier producer in the
        # same model) does not apply, so the producers are marked external here.
        t.num_kv_shared_layers = t.num_hidden_layers
        t.kv_producers = [EXTERNAL] * t.num_hidden_layers
        for name, value in (("hidden_size_per_layer_input", t.hidden_size_per_layer_input),
                            ("enable_moe_block", t.enable_moe_block), ("use_double_wide_mlp", t.use_double_wide_mlp)):
            if value:
                raise ConfigError(f"config.json: an assistant's text_config.{name} must be 0/false; got {value!r}. "
                                  "Is this an assistant checkpoint? Download it again.")
        if self.use_ordered_embeddings:
            if self.centroid_intermediate_top_k > self.num_centroids or t.vocab_size % self.num_centroids:
                raise ConfigError(
                    f"config.json: num_centroids ({self.num_centroids}) must divide vocab_size ({t.vocab_size}) and "
                    f"be at least centroid_intermediate_top_k ({self.centroid_intermediate_top_k}). Fix those "
                    "entries or download the checkpoint again.")

    @classmethod
    def _normalize(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("model_type") not in ASSISTANT_TYPES:
            raise ConfigError(f"config.json has model_type={d.get('model_type')!r}; an assistant drafter is one of "
                              f"{ASSISTANT_TYPES}. Point load_assistant at a checkpoint such as "
                              "google/gemma-4-e2b-it-assistant.")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError("An assistant config.json needs a 'text_config' section; this file has none.")
        # The text config validates its own KV sharing; the drafter's is set in __post_init__. A drafter has no
        # per-layer embeddings, so their table size (0 in its config) is not read.
        text = {k: v for k, v in d["text_config"].items() if k != "vocab_size_per_layer_input"}
        text["num_kv_shared_layers"] = 0
        return {**d, "text_config": text, "raw": d,
                "quantization": d.get("quantization") or d.get("quantization_config")}

    @classmethod
    def from_file(cls, path: str | Path) -> AssistantConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            d = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read {file}: {e}. Is this an assistant checkpoint directory?") from e
        return cls.from_dict(d)


def is_assistant_dir(path: str | Path) -> bool:
    """Whether ``path`` holds an assistant drafter's config.json."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") in ASSISTANT_TYPES
    except (OSError, ValueError, AttributeError):
        return False


class MaskedEmbedder(nn.Module):
    """The centroid-masked head (``use_ordered_embeddings``): logits for the tokens of the best clusters only."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        hidden, vocab = cfg.text_config.hidden_size, cfg.text_config.vocab_size
        self.top_k = cfg.centroid_intermediate_top_k
        self.num_centroids = cfg.num_centroids
        self.centroids = nn.Linear(hidden, cfg.num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)

    def selected(self, h: mx.array, rows: Callable[[mx.array], mx.array]) -> tuple[mx.array, mx.array]:
        """(token ids, logits) of the best clusters' tokens for one position ``h`` (hidden,). ``rows(ids)`` gives
        the head's embedding rows for ``ids``."""
        scores = project(self.centroids, h)                                         # (C,)
        best = mx.argpartition(-scores, self.top_k - 1)[: self.top_k]               # (top_k,) unordered
        clusters = self.token_ordering.reshape(self.num_centroids, -1)              # (C, vocab // C)
        ids = clusters[best].reshape(-1)                                            # (top_k * vocab // C,)
        return ids, rows(ids) @ h

    def full(self, h: mx.array, rows: Callable[[mx.array], mx.array], vocab: int) -> mx.array:
        """The whole logit row (vocab,) as the reference builds it."""
        ids, logits = self.selected(h, rows)
        out = mx.full((vocab,), logits.min() - 1.0, dtype=logits.dtype)
        out[ids] = logits
        return out


class DrafterModel(nn.Module):
    """The drafter's decoder (``model.*`` in the checkpoint): layers and final norm; ``embed_tokens`` is its head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Assistant(nn.Module):
    """``Gemma4AssistantForCausalLM``: one drafting step from (token embedding, hidden state, target K/V)."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        t = config.text_config
        self.model = DrafterModel(t)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(config)
        self._compiled_draft = None   # draft_step.CompiledDraft, made on first use

    def hidden(self, embed: mx.array, hidden: mx.array, position: int | mx.array,
               target_kv: dict[str, tuple[mx.array, mx.array]], masks: dict[str, Mask] | None = None) -> mx.array:
        """The drafter's final-normed hidden state (1, 1, hidden) for one step.

        ``embed`` / ``hidden`` (1, 1, backbone_hidden): the target's (scaled) embedding of the last token and the
        state that predicted it; ``position``: that token's position (traced in the compiled step); ``target_kv``:
        layer type -> (keys, values) (1, Hkv, n, D) of the target's last producer of that type, either already cut
        to what the drafter may see (see ``visible``; no ``masks``) or whole buffers with ``masks``: layer type ->
        which of their slots it sees (draft_step.py).
        """
        x = project(self.pre_projection, mx.concatenate([embed, hidden], axis=-1))  # (1, 1, hidden)
        types = self.config.text_config.layer_types
        for layer, t in zip(self.model.layers, types):
            x, _ = layer(x, None, position, None if masks is None else masks[t], None, target_kv[t])
        return self.model.norm(x)

    def visible(self, kind: str, n: int) -> int:
        """How many of the target's ``n`` latest K/V positions of layer type ``kind`` the drafter attends to. Its
        sliding layers take a window of ``sliding_window + 1`` positions (the reference's bidirectional window
        seen from the query's side)."""
        return min(n, self.config.text_config.sliding_window + 1) if kind == SLIDING else n

    def __call__(self, embed: mx.array, hidden: mx.array, position: int,
                 target_kv: dict[str, tuple[mx.array, mx.array]]) -> tuple[mx.array, mx.array]:
        """(logits (1, 1, vocab), projected hidden state (1, 1, backbone_hidden)): the reference's outputs."""
        h = self.hidden(embed, hidden, position, target_kv)
        vocab = self.config.text_config.vocab_size
        if "masked_embedding" in self:
            logits = self.masked_embedding.full(h[0, 0], self.model.embed_tokens, vocab)[None, None]
        else:
            logits = head(self.model.embed_tokens, h)
        return logits, project(self.post_projection, h)

    def draft_token(self, embed: mx.array, hidden: mx.array, position: int | mx.array,
                    target_kv: dict[str, tuple[mx.array, mx.array]], masks: dict[str, Mask] | None = None
                    ) -> tuple[mx.array, mx.array]:
        """(greedy token (), projected hidden state): the cheapest path to the drafter's argmax (the masked head
        scores only its selected tokens). Arguments as ``hidden``'s."""
        h = self.hidden(embed, hidden, position, target_kv, masks)
        if "masked_embedding" in self:
            ids, logits = self.masked_embedding.selected(h[0, 0], self.model.embed_tokens)
            token = ids[mx.argmax(logits)]
        else:
            token = mx.argmax(head(self.model.embed_tokens, h[0, 0]))
        return token, project(self.post_projection, h)

    def draft_step(self, target, producers: dict[str, KVCache], compiled: bool = True, at: mx.array | None = None
                   ) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
        """The drafting step of a round after what ``producers`` (layer type -> the cache of ``target``'s last
        producer layer of that type) hold: ``step(token, hidden) -> (greedy draft, projected hidden state)``, all
        lazy, every call at the caches' next position (or at ``at``, a position on the device: see
        ``CompiledDraft.bind``; compiled step only). It runs the compiled step (draft_step.py; traced once per
        shape, kept for the last target drafted for) where it fits and ``compiled`` is left on, else op by op."""
        from .draft_step import CompiledDraft, fits_compiled_draft

        if compiled and fits_compiled_draft(producers):
            held = self._compiled_draft
            if held is None or held.target() is not target:
                held = self._compiled_draft = CompiledDraft(target, self)
            return held.bind(producers, at)
        if at is not None:
            raise ValueError("A position on the device needs the compiled drafting step.")
        position = next(iter(producers.values())).offset
        kv = {t: c.recent(self.visible(t, position)) for t, c in producers.items()}
        embed = target.language_model.embed
        return lambda token, hidden: self.draft_token(embed(token.reshape(1, 1)), hidden, position, kv)

    def fuse(self) -> None:
        """Join each layer's gate and up projections into one (MLP.fuse): a drafting step is a chain of small
        kernels, each of which a fast device feels. Done after loading, as for the target (TextModel.fuse)."""
        for layer in self.model.layers:
            layer.mlp.fuse()

    def check_fits(self, target) -> None:
        """Raise InputError unless this drafter was made for ``target`` (a Gemma4): hidden sizes, vocabulary and
        the K/V shapes of the layers it reads."""
        if not hasattr(getattr(getattr(target, "config", None), "text_config", None), "hidden_size"):
            raise InputError(f"target must be the model that load(DIR) returns (the first of model, processor); "
                             f"got {with_article(type(target).__name__)}.")
        tc, dc = target.config.text_config, self.config.text_config
        problems = []
        if self.config.backbone_hidden_size != tc.hidden_size:
            problems.append(f"it expects a target hidden size of {self.config.backbone_hidden_size}, the model has "
                            f"{tc.hidden_size}")
        if dc.vocab_size != tc.vocab_size:
            problems.append(f"its vocabulary has {dc.vocab_size} tokens, the model's {tc.vocab_size}")
        first_shared = tc.first_kv_shared_layer
        for kind in (SLIDING, FULL):
            mine = [i for i, t in enumerate(dc.layer_types) if t == kind]
            theirs = [i for i, t in enumerate(tc.layer_types[:first_shared]) if t == kind]
            if mine and not theirs:
                problems.append(f"it reads {kind} K/V the model does not produce")
            elif mine and dc.layer_head_dims[mine[0]] != tc.layer_head_dims[theirs[-1]]:
                problems.append(f"its {kind} head size is {dc.layer_head_dims[mine[0]]}, the model's "
                                f"{tc.layer_head_dims[theirs[-1]]}")
            elif mine and dc.num_attention_heads % tc.layer_kv_heads[theirs[-1]]:
                problems.append(f"its {dc.num_attention_heads} heads do not group over the model's "
                                f"{tc.layer_kv_heads[theirs[-1]]} {kind} K/V heads")
        if problems:
            raise InputError("This assistant does not fit the model: " + "; ".join(problems) + ". Use the "
                             "assistant published for this model's size (google/gemma-4-e2b-it-assistant for E2B, "
                             "and so on for E4B, 12B, 26B-A4B and 31B).")


def assistant_recipe(model: Assistant, bits: int, group_size: int) -> dict:
    """The quantization section for a drafter: its decoder layers, head (the tied embedding) and projections at
    ``bits``; the centroid scorer stays in the output dtype (a few thousand rows that pick which tokens get
    logits at all). A module whose input size ``group_size`` does not divide stays unquantized."""
    from .quantize import _quantizable, check_settings

    check_settings(bits, group_size)
    q: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, m in _quantizable(model):
        if path.startswith("masked_embedding.") or m.weight.shape[-1] % group_size:
            q[path] = False
    return q


def assistant_jobs(names, config: AssistantConfig):
    """The converter's jobs for a drafter checkpoint: our names are the checkpoint's; the tied head is dropped."""
    from .weights import TensorJob

    return [TensorJob(n, (n,)) for n in sorted(names) if n != "lm_head.weight"]


def load_assistant(path: str | Path, target=None, **hub_kwargs) -> Assistant:
    """The drafter in ``path`` (a converted or raw assistant checkpoint dir, or a hub id); with ``target`` (a
    model from ``load``), check that it fits it (generation checks again when both are used)."""
    from .hub import resolve
    from .quantize import apply_quantization
    from .weights import load_into, read_safetensors, safetensors_files

    path = resolve(path, **hub_kwargs)
    config = AssistantConfig.from_file(path)
    model = Assistant(config)
    weights = {k: v for k, v in read_safetensors(safetensors_files(path)).items() if k != "lm_head.weight"}
    key = "masked_embedding.token_ordering"
    if key in weights:
        weights[key] = weights[key].astype(mx.int32)
    apply_quantization(model, weights=weights)
    load_into(model, weights)
    model.fuse()
    model.eval()
    if target is not None:
        model.check_fits(target)
    return model
