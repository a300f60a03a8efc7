"""The encoder-free embedders of Gemma 4 12B (``gemma4_unified``): no vision or audio tower.

Reference: transformers ``models/gemma4_unified/modeling_gemma4_unified.py`` (``Gemma4UnifiedVisionEmbedder``,
``Gemma4UnifiedMultimodalEmbedder``). An image arrives as model patches of 48 x 48 pixels (the processor merges
3 x 3 patches of 16 pixels; ``pixel_values`` (n, max_patches, 6912)) with their (x, y) grid positions
(``image_position_ids`` (n, max_patches, 2), -1 on padding rows). Each patch goes LayerNorm -> Linear -> LayerNorm,
gets a factorized 2-D position embedding (one table row per axis), a LayerNorm, and then the multimodal embedder
(scale-free RMSNorm -> Linear) into text space; padding rows are dropped. Video frames take the same path. An audio
soft token is a frame of 640 raw waveform samples (``input_features`` (n, tokens, 640), ``input_features_mask``
(n, tokens)) through its own multimodal embedder.

Parameter names are the published checkpoint's: ``vision_embedder.*`` for the patch embedding, ``embed_vision`` /
``embed_audio`` for the two projections into text space (transformers renames them on load, and back on save).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import EmbedderVisionConfig
from .errors import InputError
from .layers import LayerNorm, compute_dtype


class VisionEmbedder(nn.Module):
    """Raw model patches -> patch embeddings (before the projection into text space)."""

    def __init__(self, config: EmbedderVisionConfig):
        super().__init__()
        dim = config.mm_embed_dim
        self.patch_dim = config.patch_dim
        self.patch_ln1 = LayerNorm(self.patch_dim)          # torch's LayerNorm defaults: eps 1e-5, affine, bias
        self.patch_dense = nn.Linear(self.patch_dim, dim)
        self.patch_ln2 = LayerNorm(dim)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, dim))  # (positions, axis x / y, dim)
        self.pos_norm = LayerNorm(dim)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """(n, P, patch_dim) patches and (n, P, 2) positions -> (n, P, mm_embed_dim)."""
        # As the reference: float32 pixels are cast to the dense layer's dtype, the whole path runs in it.
        h = self.patch_ln1(pixel_values.astype(compute_dtype(self.patch_dense)))
        h = self.patch_ln2(self.patch_dense(h))
        valid = (position_ids != -1).astype(self.pos_embedding.dtype)[..., None]  # (n, P, 2, 1)
        clamped = mx.maximum(position_ids, 0)
        # One row of the table per axis: x from column 0, y from column 1; padding rows get nothing.
        pos = self.pos_embedding[clamped, mx.arange(2)]                           # (n, P, 2, dim)
        return self.pos_norm(h + (pos * valid).sum(axis=-2))


def _check_rows(name: str, x: mx.array, width: int, what: str) -> None:
    if x.ndim != 3 or x.shape[-1] != width:
        raise InputError(f"{name} has shape {tuple(x.shape)}; this model takes (count, tokens, {width}) {what}. "
                         "Build the inputs with this model's processor.")


def _project(projection: nn.Module, x: mx.array) -> mx.array:
    """The multimodal embedder of the reference, which first casts its input to the projection's dtype: raw
    float32 waveform frames (or patch embeddings of another dtype) are normed and projected in the model's dtype."""
    return projection(x.astype(compute_dtype(projection.embedding_projection)))


def encode_patches(embedder: VisionEmbedder, projection: nn.Module, pixel_values: mx.array,
                   position_ids: mx.array) -> mx.array:
    """Soft tokens (n_real_patches, text_hidden) for images or video frames, padding rows dropped, in order."""
    _check_rows("pixel_values", pixel_values, embedder.patch_dim, "raw 48 x 48 pixel patches")
    if tuple(position_ids.shape) != (*pixel_values.shape[:2], 2):
        raise InputError(f"The position ids have shape {tuple(position_ids.shape)} but the pixel values "
                         f"{tuple(pixel_values.shape)}; they need one (x, y) pair per patch. Build the inputs with "
                         "this model's processor.")
    real = np.nonzero(np.array((position_ids != -1).all(axis=-1)).reshape(-1))[0]
    tokens = _project(projection, embedder(pixel_values, position_ids))          # (n, P, text_hidden)
    return tokens.reshape(-1, tokens.shape[-1])[mx.array(real)]                  # (n_real, text_hidden)


def encode_waveform(projection: nn.Module, frames: mx.array, mask: mx.array, width: int) -> mx.array:
    """Soft tokens (n_valid_frames, text_hidden) for raw waveform frames (count, tokens, width); masked-out
    (padding) frames dropped, in order."""
    _check_rows("input_features", frames, width, f"raw waveform frames of {width} samples")
    if mask is None or tuple(mask.shape) != tuple(frames.shape[:2]):
        raise InputError(f"input_features_mask must have shape {tuple(frames.shape[:2])} (one flag per frame); "
                         "build the inputs with this model's processor.")
    keep = np.nonzero(np.array(mask).astype(bool).reshape(-1))[0]
    tokens = _project(projection, frames)                                         # (n, T, text_hidden)
    return tokens.reshape(-1, tokens.shape[-1])[mx.array(keep)]
