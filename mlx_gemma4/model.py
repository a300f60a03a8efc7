"""Gemma4: the text decoder plus the optional vision and audio towers, joined as the reference joins them.

Reference: transformers ``Gemma4Model`` / ``Gemma4ForConditionalGeneration``. Placeholder tokens (image, video,
audio) are embedded as the pad token and then overwritten with the towers' soft tokens; the per-layer embeddings
(PLE) also see the pad id there. With ``use_bidirectional_attention == "vision"``, tokens of one image or video
frame see each other in the sliding layers only. The head is tied to the token embedding and soft-capped.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .config import ModelConfig
from .errors import InputError
from .layers import MultimodalEmbedder
from .text import TextModel


@partial(mx.compile, shapeless=True)
def _softcap(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


def _vision_blocks(is_vision: np.ndarray) -> np.ndarray:
    """Block id per position: consecutive vision tokens share one id; -1 for everything else."""
    starts = is_vision & ~np.concatenate([[False], is_vision[:-1]])
    return np.where(is_vision, np.cumsum(starts) - 1, -1).astype(np.int32)


class Gemma4(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._text_ids: mx.array | None = None
        self._decoder = None
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

    # -- public API -----------------------------------------------------------------------------------------------
    def make_cache(self) -> list[KVCache]:
        return make_cache(self.config.text_config)

    @property
    def layers(self):
        return self.language_model.layers

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
        logits_to_keep: int = 0,
        **unused,
    ) -> mx.array:
        """Logits (1, L, vocab) for ``input_ids`` (1, L); only the last ``logits_to_keep`` positions if > 0."""
        embeds, token_inputs, blocks = self.embed(
            input_ids, pixel_values, image_position_ids, pixel_values_videos, video_position_ids,
            input_features, input_features_mask,
        )
        h = self.language_model(embeds, token_inputs, cache, blocks, logits_to_keep=logits_to_keep)
        return self.logits(h)

    def decode(self, input_ids: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits for text tokens already on the device, without a host round trip (the decode loop's path).
        One token after a prefill goes through the compiled step (decode.py)."""
        ids, token_inputs = self._text_inputs(input_ids)
        if input_ids.shape[-1] == 1 and self._compiled.ready(cache):
            return self._compiled(ids, token_inputs, cache)
        lm = self.language_model
        return self.logits(lm(lm.embed_tokens(ids), token_inputs, cache))

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
        if self._decoder is None:
            from .decode import CompiledDecoder

            self._decoder = CompiledDecoder(self)
        return self._decoder

    def logits(self, h: mx.array) -> mx.array:
        out = self.lm_head(h) if "lm_head" in self else self.language_model.embed_tokens.as_linear(h)
        cap = self.config.text_config.final_logit_softcapping
        return _softcap(out, mx.array(cap, dtype=out.dtype)) if cap else out

    # -- embedding ---------------------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: mx.array,
        pixel_values=None,
        image_position_ids=None,
        pixel_values_videos=None,
        video_position_ids=None,
        input_features=None,
        input_features_mask=None,
    ) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """Token embeddings with soft tokens merged in, PLE token inputs, and vision block ids (or None)."""
        cfg = self.config
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] != 1:
            raise InputError("Only a batch of one prompt is supported: input_ids must have shape [1, L].")
        ids_np = np.array(input_ids[0])
        is_image = ids_np == cfg.image_token_id
        is_video = ids_np == cfg.video_token_id
        is_audio = ids_np == cfg.audio_token_id

        ids, token_inputs = self._text_inputs(mx.array(ids_np[None].astype(np.int32)))
        embeds = self.language_model.embed_tokens(ids)                             # (1, L, hidden)

        merges = []
        if pixel_values is not None:
            merges.append(("image", is_image, lambda: self._encode_images(pixel_values, image_position_ids)))
        if pixel_values_videos is not None:
            merges.append(("video", is_video,
                           lambda: self._encode_images(pixel_values_videos, video_position_ids)))
        if input_features is not None:
            merges.append(("audio", is_audio, lambda: self._encode_audio(input_features, input_features_mask)))
        for kind, mask, encode in merges:
            feats = encode()
            n_slots = int(mask.sum())
            if feats.shape[0] != n_slots:
                raise InputError(
                    f"The prompt has {n_slots} {kind} placeholder tokens but the {kind} inputs give {feats.shape[0]} "
                    f"soft tokens. Build inputs with the processor so the two agree."
                )
            embeds[:, mx.array(np.nonzero(mask)[0])] = feats.astype(embeds.dtype)[None]
        for kind, mask in (("image", is_image), ("video", is_video), ("audio", is_audio)):
            if mask.any() and kind not in {m[0] for m in merges}:
                raise InputError(f"The prompt has {kind} placeholder tokens but no {kind} inputs were given.")

        blocks = None
        if cfg.text_config.use_bidirectional_attention == "vision" and (is_image | is_video).any():
            blocks = mx.array(_vision_blocks(is_image | is_video))
        return embeds, token_inputs, blocks

    def _encode_images(self, pixel_values, position_ids) -> mx.array:
        if not hasattr(self, "vision_tower"):
            raise InputError("This model has no vision tower; it cannot take images or video.")
        from .vision import encode_images

        return encode_images(self.vision_tower, self.embed_vision, mx.array(pixel_values), mx.array(position_ids))

    def _encode_audio(self, features, mask) -> mx.array:
        if not hasattr(self, "audio_tower"):
            raise InputError("This model has no audio tower; it cannot take audio.")
        from .audio import encode_audio

        return encode_audio(self.audio_tower, self.embed_audio, mx.array(features), mx.array(mask))
