"""Gemma4: the text decoder plus the optional vision and audio towers, joined as the reference joins them.

Reference: transformers ``Gemma4Model`` / ``Gemma4ForConditionalGeneration``, and ``Gemma4UnifiedModel`` for the
encoder-free 12B (``gemma4_unified``), whose embedders (unified.py) stand where the towers stand. Placeholder
tokens (image, video, audio) are embedded as the pad token and then overwritten with the soft tokens; the
per-layer embeddings (PLE) also see the pad id there. With ``use_bidirectional_attention == "vision"``, tokens of
one image or video frame see each other: in the sliding layers only and within the window, or (gemma4_unified, as
its reference forward masks them) in every layer. The head is tied to the token embedding and soft-capped.

Besides the full forward (``model(**inputs)``, ``model(ids, cache=cache)``), generation calls two entry points:
``prefill`` (a prompt into the cache, in chunks; logits of its last token) and ``step`` (tokens after the cache,
one at a time through the compiled step of decode.py). Both run the text model's one forward pass, in parts.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Callable, Iterable

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from . import projection
from .cache import MAX_REWIND, KVCache, make_cache
from .checks import check_inputs
from .config import SLIDING, ModelConfig
from .decode import CompiledStep, fits_compiled_step
from .errors import ContextLengthError, InputError
from .layers import MultimodalEmbedder
from .media import BY_KIND, MEDIA, MEDIA_KEYS
from .text import TextModel


@partial(mx.compile, shapeless=True)
def _softcap(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


# Long passes are evaluated layer by layer: on GPU backends whose frees wait for the stream, one lazy graph over all
# layers keeps every layer's temporaries alive at once (an op's buffers are allocated when the host queues it and
# freed when the device has run it). Each layer is queued with async_eval as soon as it is built, and the host then
# waits for the layer queued ``ahead`` layers before it: the device always has the layers after that one to run
# while the host builds the next (it never drains, as a wait for the layer just queued would make it), and at
# most ``ahead + 1`` layers' temporaries are alive. ``ahead`` covers about this many token-layers (at least one
# layer), so short passes, whose layers take the device less time than the host takes to build them, queue more.
EVAL_EACH_LAYER_FROM = 64
QUEUED_TOKEN_LAYERS = 2048


def _eval_each_layer(n_tokens: int) -> Callable | None:
    if n_tokens < EVAL_EACH_LAYER_FROM:
        return None
    ahead = max(1, QUEUED_TOKEN_LAYERS // n_tokens)
    queued: deque[list[mx.array]] = deque()

    def after_layer(h: mx.array | None, layer_cache: KVCache | None) -> None:
        arrays = [a for a in (h, *(layer_cache.state if layer_cache is not None else ())) if a is not None]
        mx.async_eval(arrays)
        queued.append(arrays)
        if len(queued) > ahead:
            mx.eval(queued.popleft())  # queued before the layers still in flight: waits for it, not for them

    return after_layer


def _chunk_ends(L: int, chunk: int, vision_blocks: np.ndarray | None) -> list[int]:
    """Chunk end positions; a chunk never ends inside an image or video-frame block (its tokens attend to each
    other bidirectionally and must be in the same chunk)."""
    ends, s = [], 0
    while s < L:
        e = min(s + chunk, L)
        if vision_blocks is not None:
            while e < L and vision_blocks[e] >= 0 and vision_blocks[e] == vision_blocks[e - 1]:
                e += 1
        ends.append(e)
        s = e
    return ends


def _vision_blocks(is_vision: np.ndarray) -> np.ndarray:
    """Block id per position: consecutive vision tokens share one id; -1 for everything else."""
    starts = is_vision & ~np.concatenate([[False], is_vision[:-1]])
    return np.where(is_vision, np.cumsum(starts) - 1, -1).astype(np.int32)


class Gemma4(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._text_ids: mx.array | None = None
        self._compiled_step = None
        self._compiled_hidden_step = None
        self.dense_prefill: bool | None = None   # None: projection.default_enabled()
        self.language_model = TextModel(config.text_config)
        if not config.tied_head:
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.vision_config is not None:
            from .vision import VisionModel

            self.vision_tower = VisionModel(config.vision_config)
            self.embed_vision = MultimodalEmbedder(
                config.vision_config.hidden_size, config.text_config.hidden_size, config.vision_config.rms_norm_eps
            )
        if config.audio_config is not None:
            from .audio import AudioModel

            ac = config.audio_config
            self.audio_tower = AudioModel(ac)
            self.embed_audio = MultimodalEmbedder(ac.output_proj_dims or ac.hidden_size, config.text_config.hidden_size,
                                             ac.rms_norm_eps)
        # gemma4_unified (12B): no towers, raw patches / waveform frames through embedders (unified.py).
        if config.vision_embedder_config is not None:
            from .unified import VisionEmbedder

            vc = config.vision_embedder_config
            self.vision_embedder = VisionEmbedder(vc)
            self.embed_vision = MultimodalEmbedder(vc.mm_embed_dim, config.text_config.hidden_size, vc.rms_norm_eps)
        if config.audio_embedder_config is not None:
            ac = config.audio_embedder_config
            self.embed_audio = MultimodalEmbedder(ac.audio_embed_dim, config.text_config.hidden_size, ac.rms_norm_eps)

    # -- public API -----------------------------------------------------------------------------------------------
    def retrace(self) -> None:
        """Drop the compiled decode steps, so that the next step traces them again: after a change to how the
        graph is built (a setting the benchmarks A/B), which a traced step would not see."""
        self._compiled_step = self._compiled_hidden_step = None

    def make_cache(self, max_rewind: int = MAX_REWIND) -> list[KVCache]:
        """Empty caches for this model; sliding rings can rewind ``max_rewind`` tokens after any write."""
        return make_cache(self.config.text_config, max_rewind)

    def takes(self, tower: str) -> bool:
        """Whether this checkpoint has the tower (or, for the 12B, the embedder) for "vision" or "audio" input."""
        return ("vision_tower" in self or "vision_embedder" in self) if tower == "vision" else "embed_audio" in self

    def check_media(self, kinds: Iterable[str]) -> None:
        """Refuse media kinds ("image", "video", "audio") this model has no tower for, before any is read."""
        for kind in dict.fromkeys(kinds):
            if not self.takes(BY_KIND[kind].tower):
                raise InputError(f"This model has no {BY_KIND[kind].tower} tower; it cannot take {kind} input. Use "
                                 "a Gemma 4 checkpoint converted with its towers, or leave the "
                                 f"{BY_KIND[kind].arg} out.")

    @property
    def layers(self):
        return self.language_model.layers

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None, mm_token_type_ids=None,
                 num_soft_tokens_per_image=None, num_soft_tokens_per_video=None,
                 **media: mx.array | None) -> mx.array:
        """Logits (1, L, vocab) for every position of ``input_ids`` (1, L), after what ``cache`` holds.

        ``media`` are the processor's media outputs (media.MEDIA_KEYS). ``mm_token_type_ids`` and the 12B
        processor's soft-token counts are accepted because a processor returns them, and not needed: the soft-token
        positions are read off ``input_ids`` (and the padding rows off the position ids).
        """
        self.check_cache(cache)
        ids = self._check_ids(input_ids)
        self._check_room(cache, ids.size)   # before any tower runs
        embeds, token_inputs, blocks = self.embed(ids[None], **media)
        lm = self.language_model
        p = lm.begin(embeds, token_inputs, cache, blocks)
        lm.run(p, cache, range(len(lm.layers)), _eval_each_layer(p.h.shape[1]))
        return self.logits(lm.norm(p.h))

    def prefill(self, inputs: dict[str, Any], cache: list[KVCache], *, chunk_size: int = 2048, start: int = 0,
                should_stop: Callable[[], bool] | None = None,
                progress: Callable[[int, int], None] | None = None, with_hidden: bool = False) -> Any:
        """Run ``inputs["input_ids"][:, start:]`` (and its media) into ``cache``; logits (vocab,) of the last token
        (``with_hidden``: and its final-normed hidden state (1, 1, hidden), which a drafter starts from).

        ``inputs`` is the processor's output; ``start`` > 0 means ``cache`` already holds the first ``start``
        tokens (media for them must not be in ``inputs``). The prompt runs in chunks of about ``chunk_size`` tokens
        (longer where an image or video frame would be split: its tokens attend to each other). Chunks before the
        last stop before the KV-shared layers (those write no cache and their output is not read), and the layer
        before those only writes its K/V; in the last chunk that layer computes its output for the final position
        only, and the pass goes on with that one. ``should_stop()`` is asked before each chunk: when it turns
        true, prefill returns None and ``cache`` holds the chunks done so far (its ``offset`` says how many tokens).
        ``progress(done, total)`` (prompt tokens) is called before the first chunk and after each chunk but the last.
        """
        check_inputs(inputs)
        self.check_cache(cache)
        ids = mx.array(inputs["input_ids"])
        if ids.ndim == 1:
            ids = ids[None]
        ids = ids[:, start:]
        L = ids.shape[1]
        if L == 0:
            raise InputError(f"Nothing to prefill: the prompt has {start} tokens and all are already in the cache.")
        self._check_room(cache, L)
        media = {k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None}
        embeds, token_inputs, blocks = self.embed(ids, **media)
        lm = self.language_model
        first_shared = lm.config.first_kv_shared_layer
        # Long chunks' quantized projections on dequantized weights (projection.py): self.dense_prefill when set,
        # else where the backend gains.
        dense = projection.default_enabled() if self.dense_prefill is None else self.dense_prefill
        s = 0
        if progress is not None:
            progress(0, L)
        for e in _chunk_ends(L, chunk_size, None if blocks is None else np.array(blocks)):
            if should_stop is not None and should_stop():
                return None
            p = lm.begin(embeds[:, s:e], None if token_inputs is None else token_inputs[:, s:e], cache,
                         None if blocks is None else blocks[s:e])
            # The last layer before the KV-shared ones has its output read only at the prompt's last position.
            with projection.dense_matmuls(dense):
                lm.run(p, cache, range(first_shared), _eval_each_layer(e - s), narrow_last=1 if e == L else 0)
            if e == L:
                lm.run(p, cache, range(first_shared, len(lm.layers)))
                h = lm.norm(p.h)
                return (self.logits(h)[0, -1], h) if with_hidden else self.logits(h)[0, -1]
            mx.eval([c.state for c in cache])
            if progress is not None:
                progress(e, L)
            s = e

    def step(self, token_ids: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits (1, L, vocab) for text tokens ``token_ids`` (1, L) already on the device, after what ``cache``
        holds, without a host round trip (the decode loop's path). After a prefill, one token or a speculative
        verify's few run the compiled step (decode.py)."""
        L = token_ids.shape[-1]
        self._check_room(cache, L)
        ids, token_inputs = self._text_inputs(token_ids)
        if fits_compiled_step(cache, L):
            return self._compiled(ids, token_inputs, cache)
        lm = self.language_model
        return self.logits(lm(lm.embed(ids), token_inputs, cache))

    def step_hidden(self, token_ids: mx.array, cache: list[KVCache]) -> tuple[mx.array, mx.array]:
        """``step`` that also returns the final-normed hidden states (1, L, hidden), which a drafter reads:
        (logits (1, L, vocab), hidden states)."""
        L = token_ids.shape[-1]
        self._check_room(cache, L)
        ids, token_inputs = self._text_inputs(token_ids)
        if fits_compiled_step(cache, L):
            if self._compiled_hidden_step is None:
                self._compiled_hidden_step = CompiledStep(self, with_hidden=True)
            return self._compiled_hidden_step(ids, token_inputs, cache)
        lm = self.language_model
        h = lm(lm.embed(ids), token_inputs, cache)
        return self.logits(h), h

    def context_left(self, cache: list[KVCache] | None) -> int:
        """How many more positions fit in the context after what ``cache`` holds (the one bound everything uses)."""
        return self.config.text_config.max_position_embeddings - (cache[0].offset if cache else 0)

    def check_cache(self, cache: Any) -> None:
        """``cache`` must be None or what ``make_cache()`` gives: one cache per KV-producing layer, in order."""
        if cache is None:
            return
        from .cache import GlobalCache, SlidingCache

        tc = self.config.text_config
        want = [SlidingCache if t == SLIDING else GlobalCache for t in tc.layer_types[: tc.first_kv_shared_layer]]
        listed = isinstance(cache, (list, tuple))
        if not listed or len(cache) != len(want) or not all(isinstance(c, k) for c, k in zip(cache, want)):
            got = f"{type(cache).__name__} of {len(cache)}" if listed else type(cache).__name__
            raise InputError(f"cache must be the list model.make_cache() returns (for this model), or None; got {got} "
                             f"(this model keeps {len(want)} layer caches).")

    def _check_room(self, cache: list[KVCache] | None, n: int) -> None:
        left = self.context_left(cache)
        if n > left:
            limit = self.config.text_config.max_position_embeddings
            raise ContextLengthError(
                f"The prompt needs {limit - left + n} positions but the model's context is {limit}. "
                "Shorten the prompt (fewer or shorter media too; in a chat, drop earlier turns)."
            )

    def _text_inputs(self, input_ids: mx.array) -> tuple[mx.array, mx.array | None]:
        """Ids to embed (placeholder ids embed as pad, as in the reference; one gather through a table) and the
        token-identity half of the per-layer embeddings for them."""
        if self._text_ids is None:
            cfg = self.config
            table = np.arange(cfg.text_config.vocab_size, dtype=np.int32)
            for t in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id):
                if 0 <= t < table.size:
                    table[t] = cfg.text_config.pad_token_id
            self._text_ids = mx.array(table)
        ids = self._text_ids[input_ids]
        lm = self.language_model
        return ids, lm.per_layer_token_inputs(ids) if lm.ple_dim else None

    @property
    def _compiled(self):
        if self._compiled_step is None:
            self._compiled_step = CompiledStep(self)
        return self._compiled_step

    def logits(self, h: mx.array) -> mx.array:
        out = projection.project(self.lm_head, h) if "lm_head" in self \
            else projection.head(self.language_model.embed_tokens, h)
        cap = self.config.text_config.final_logit_softcapping
        return _softcap(out, mx.array(cap, dtype=out.dtype)) if cap else out

    # -- embedding ---------------------------------------------------------------------------------------------
    def embed(self, input_ids: mx.array, **media: mx.array | None) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """Token embeddings with soft tokens merged in, PLE token inputs, and vision block ids (or None).
        ``media``: the processor's media outputs by their keys (media.MEDIA_KEYS)."""
        unknown = set(media) - set(MEDIA_KEYS)
        if unknown:
            raise InputError(f"Unknown model input(s) {sorted(unknown)}; the model takes input_ids and "
                             f"{', '.join(MEDIA_KEYS)} (what the processor returns).")
        cfg = self.config
        ids_np = self._check_ids(input_ids)
        slots = {m.kind: ids_np == getattr(cfg, m.token_id_attr) for m in MEDIA}

        ids, token_inputs = self._text_inputs(mx.array(ids_np[None].astype(np.int32)))
        embeds = self.language_model.embed(ids)                                    # (1, L, hidden)

        for m in MEDIA:
            features, extra = (media.get(k) for k in m.inputs)
            mask = slots[m.kind]
            if features is None:
                if mask.any():
                    raise InputError(f"The prompt has {m.kind} placeholder tokens but no {m.kind} inputs were given.")
                continue
            if extra is None and (m.tower == "vision" or "audio_tower" in self):
                raise InputError(f"{m.inputs[0]} came without {m.inputs[1]}; pass the processor's whole output "
                                 "(model(**processor(text=..., ...))).")
            encode = self._encode_images if m.tower == "vision" else self._encode_audio
            feats = encode(features, extra)
            n_slots = int(mask.sum())
            if feats.shape[0] != n_slots:
                raise InputError(
                    f"The prompt has {n_slots} {m.kind} placeholder tokens but the {m.kind} inputs give "
                    f"{feats.shape[0]} soft tokens. Build inputs with the processor so the two agree."
                )
            embeds[:, mx.array(np.nonzero(mask)[0])] = feats.astype(embeds.dtype)[None]

        blocks = None
        is_vision = slots["image"] | slots["video"]
        if cfg.text_config.use_bidirectional_attention == "vision" and is_vision.any():
            blocks = mx.array(_vision_blocks(is_vision))
        return embeds, token_inputs, blocks

    def _check_ids(self, input_ids: Any) -> np.ndarray:
        """``input_ids`` (L,) or (1, L) of whole-number token ids in the vocabulary, as numpy (L,)."""
        try:
            ids = np.array(input_ids)
        except (TypeError, ValueError) as e:
            raise InputError(f"input_ids must be an array of token ids, shape [1, L]; got {type(input_ids).__name__} "
                             f"({e}). Build it with processor(text=...).") from e
        if ids.dtype.kind not in "iu":
            raise InputError(f"input_ids must hold whole-number token ids (int32); got dtype {ids.dtype}. Build it "
                             "with processor(text=...).")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise InputError("Only a batch of one prompt is supported: input_ids must have shape [1, L]; got "
                             f"{list(ids.shape)}.")
        if ids.shape[1] == 0:
            raise InputError("input_ids is empty: there is no token to run. Pass at least one token (a prompt "
                             "from processor(text=...) always starts with <bos>).")
        vocab = self.config.text_config.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise InputError(f"input_ids holds {bad.size} id(s) outside this model's vocabulary of {vocab} tokens "
                             f"(e.g. {int(bad[0])}); tokenize with this model's processor.")
        return ids[0]

    def _encode_images(self, pixel_values, position_ids) -> mx.array:
        if "vision_embedder" in self:
            from .unified import encode_patches

            return encode_patches(self.vision_embedder, self.embed_vision, mx.array(pixel_values),
                                  mx.array(position_ids))
        if "vision_tower" not in self:
            raise InputError("This model has no vision tower; it cannot take images or video.")
        from .vision import encode_images

        return encode_images(self.vision_tower, self.embed_vision, mx.array(pixel_values), mx.array(position_ids))

    def _encode_audio(self, features, mask) -> mx.array:
        if "audio_tower" in self:
            from .audio import encode_audio

            return encode_audio(self.audio_tower, self.embed_audio, mx.array(features), mx.array(mask))
        if "embed_audio" not in self:
            raise InputError("This model has no audio tower; it cannot take audio.")
        from .unified import encode_waveform

        width = self.config.audio_embedder_config.audio_embed_dim
        return encode_waveform(self.embed_audio, mx.array(features), None if mask is None else mx.array(mask), width)
