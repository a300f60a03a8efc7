"""Tiny random-weight Gemma 4 12B-style (``gemma4_unified``, encoder-free) reference checkpoints and their inputs.

The text decoder is the 31B-style dense family of tests/tiny.py (k_eq_v global layers with one KV head, window 8)
with the reference's bidirectional vision blocks; vision is the patch embedder (48 x 48 pixel model patches, 6,912
values each) with a small embedding width; audio is 640-sample waveform frames (the size the feature extractor
cuts). Inputs are laid out as transformers' Gemma4UnifiedProcessor lays them out: transformers' image and video
processors for this model need torchvision (not installed here), so pixel patches and their grid positions are
built by hand in that layout (one row per 48 x 48 patch, (x, y) positions, -1 on padding rows); audio comes from
the reference's own Gemma4UnifiedAudioFeatureExtractor.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mlx_gemma4.demo import SPECIAL_IDS
from tests import helpers, tiny

UNIFIED_TEXT = dict(tiny.TEXT_FAMILIES["dense"], use_bidirectional_attention="vision")
UNIFIED_VISION = dict(mm_embed_dim=32, output_proj_dims=32, mm_posemb_size=64)
UNIFIED_AUDIO: dict = {}
PATCH_DIM = 48 * 48 * 3
FRAME = 640


def make_config(vision: dict | None = UNIFIED_VISION, audio: dict | None = UNIFIED_AUDIO, **text_overrides):
    from transformers import Gemma4UnifiedConfig

    text = copy.deepcopy(UNIFIED_TEXT)
    text.update(text_overrides)
    return Gemma4UnifiedConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        boi_token_id=SPECIAL_IDS["boi"], eoi_token_id=SPECIAL_IDS["eoi"], image_token_id=SPECIAL_IDS["image"],
        video_token_id=SPECIAL_IDS["video"], boa_token_id=SPECIAL_IDS["boa"], eoa_token_index=SPECIAL_IDS["eoa"],
        audio_token_id=SPECIAL_IDS["audio"],
    )


def make_model(vision: dict | None = UNIFIED_VISION, audio: dict | None = UNIFIED_AUDIO, seed: int = 0,
               **text_overrides):
    """A float32 Gemma4UnifiedForConditionalGeneration in eval mode with random weights."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    config = make_config(vision, audio, **text_overrides)
    config._attn_implementation = "eager"
    model = Gemma4UnifiedForConditionalGeneration(config).float().eval()
    tiny.randomize(model, seed)
    return model


def make_text_model(seed: int = 0, **text_overrides):
    """The text-only form: Gemma4UnifiedForCausalLM (model_type gemma4_unified_text)."""
    from transformers import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    torch.manual_seed(seed)
    text = copy.deepcopy(UNIFIED_TEXT)
    text.update(text_overrides)
    config = Gemma4UnifiedTextConfig(**text)
    config._attn_implementation = "eager"
    model = Gemma4UnifiedForCausalLM(config).float().eval()
    tiny.randomize(model, seed)
    return model


# -- inputs in the processor's layout -------------------------------------------------------------------------
def patches(grids: list[tuple[int, int]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values (n, max_patches, 6912) float32 in [0, 1] and image_position_ids (n, max_patches, 2) int32 for
    images whose merged patch grids are ``grids`` (rows, cols): row-major (x, y) positions, padding rows zero
    with position -1."""
    rng = np.random.default_rng(seed)
    longest = max(r * c for r, c in grids)
    pixels = np.zeros((len(grids), longest, PATCH_DIM), np.float32)
    positions = np.full((len(grids), longest, 2), -1, np.int32)
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        pixels[i, :n] = rng.random((n, PATCH_DIM), dtype=np.float32)
        ys, xs = np.divmod(np.arange(n), cols)
        positions[i, :n] = np.stack([xs, ys], axis=-1)
    return pixels, positions


def waveform_frames(seconds: list[float], seed: int = 0) -> dict[str, np.ndarray]:
    """input_features (n, frames, 640) and input_features_mask from the reference's feature extractor."""
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    rng = np.random.default_rng(seed)
    waves = []
    for s in seconds:
        t = np.arange(int(16000 * s)) / 16000
        waves.append((0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    out = Gemma4UnifiedAudioFeatureExtractor()(waves, sampling_rate=16000, return_tensors="np")
    return {"input_features": out["input_features"].astype(np.float32),
            "input_features_mask": out["input_features_mask"]}


def prompt(*parts: str | tuple[str, int], seed: int = 0) -> np.ndarray:
    """input_ids (1, L) int32: ``bos``, then per part either a few random ordinary tokens (a str, its length the
    count of words) or ``(kind, n)``: boi/boa, n soft-token placeholders of ``kind`` ("image", "video",
    "audio"), eoi/eoa."""
    rng = np.random.default_rng(seed)
    ids = [SPECIAL_IDS["bos"]]
    for part in parts:
        if isinstance(part, str):
            ids += rng.integers(5, 250, len(part.split())).tolist()
        else:
            kind, n = part
            open_, close = ("boa", "eoa") if kind == "audio" else ("boi", "eoi")
            ids += [SPECIAL_IDS[open_]] + [SPECIAL_IDS[kind]] * n + [SPECIAL_IDS[close]]
    return np.array([ids], np.int32)


def token_types(input_ids: np.ndarray) -> np.ndarray:
    """mm_token_type_ids as the processor returns them: 1 image, 2 video, 3 audio, 0 text."""
    out = np.zeros_like(input_ids)
    for kind, t in (("image", 1), ("video", 2), ("audio", 3)):
        out[input_ids == SPECIAL_IDS[kind]] = t
    return out


def reference_logits(hf, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The reference's logits for processor-layout inputs (numpy), mm_token_type_ids included (the reference
    opens the bidirectional vision blocks from them)."""
    types = token_types(np.asarray(inputs["input_ids"]))
    return helpers.reference_logits(hf, {**inputs, "mm_token_type_ids": types})
