"""Image and video preprocessing of Gemma 4 12B (``gemma4_unified``): raw pixel patches for the encoder-free model.

Reference: transformers ``models/gemma4_unified/image_processing_gemma4_unified.py`` and
``video_processing_gemma4_unified.py``. The resize rule, the token budgets and the video frame sampling are Gemma 4's
(image.py, video.py). What changes is the patching: the 12B model has no vision tower to pool ``k x k`` groups of
16-pixel patches, so each soft token gets one ``k*16``-pixel patch (48 x 48 x 3 = 6,912 values, pixel rows
(y, x, c) inside), in row-major order with its (x, y) position on that coarser grid, padded to ``max_soft_tokens``
rows with zero patches at (-1, -1). The reference cuts 16-pixel patches and regroups them (``patches_merge``);
cutting ``k*16``-pixel patches directly gives the same values in the same order.

Pixel arithmetic follows the reference's torch backend, so values match bit for bit: float32 ``x * rescale_factor``,
or, when normalizing too (the video default, an identity), ``(x - mean / rescale_factor) / (std / rescale_factor)``.
Resizing uses Pillow's bicubic filter, as Gemma 4's video frames do (the reference uses torchvision's antialiased
bicubic; the two round their passes differently, so resized pixels differ by a 1/255 step here and there, two
at most).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .image import ImageInput, ImageProcessor, pad_patches, patch_positions, patchify
from .video import VideoProcessor


class UnifiedImageProcessor(ImageProcessor):
    """Gemma 4 12B image preprocessing; defaults are ``Gemma4UnifiedImageProcessor``'s (those of Gemma 4).

    ``__call__`` returns ``pixel_values`` float32 [N, max_soft_tokens, (k*p)**2 * 3], ``image_position_ids``
    int64 [N, max_soft_tokens, 2] and ``num_soft_tokens_per_image``.
    """

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        """(C, H, W) uint8 -> float32 in the reference's float32 arithmetic (rescale fused into normalize)."""
        x = pixels.astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)[:, None, None]  # (C, 1, 1)
        std = np.asarray(self.image_std, np.float32)[:, None, None]  # (C, 1, 1)
        if self.do_rescale and self.do_normalize:
            inverse = np.float32(1.0 / self.rescale_factor)
            return (x - mean * inverse) / (std * inverse)
        if self.do_rescale:
            return x * np.float32(self.rescale_factor)
        if self.do_normalize:
            return (x - mean) / std
        return x

    def preprocess_one(self, image: ImageInput, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One image -> (patches [max_soft_tokens, (k*p)**2 * 3] float32, positions [max_soft_tokens, 2] int64,
        soft tokens)."""
        pixels = self.pixels(image, max_soft_tokens)  # (C, H, W)
        side = self.patch_size * self.pooling_kernel_size
        _, h, w = pixels.shape
        if h % side or w % side or (h // side) * (w // side) > max_soft_tokens:
            raise InputError(f"A {w}x{h} image cannot be cut into at most {max_soft_tokens} patches of {side} "
                             "pixels; keep do_resize on in the processor config, or resize the image to multiples "
                             f"of {side} pixels within the budget first.")
        patches = patchify(pixels, side)  # (h/side * w/side, side*side*C)
        positions = patch_positions(h // side, w // side)
        num_soft = patches.shape[0]
        patches, positions = pad_patches(patches, positions, max_soft_tokens)
        return patches, positions, num_soft


def _unified_frame_processor() -> UnifiedImageProcessor:
    # Gemma4UnifiedVideoProcessor's frame settings: a 70-token budget, and a normalisation that is the identity.
    return UnifiedImageProcessor(max_soft_tokens=70, do_normalize=True)


@dataclass
class UnifiedVideoProcessor(VideoProcessor):
    """Gemma 4 12B video preprocessing: Gemma 4's frame sampling and prompt stamps, each frame patched as a
    12B image. ``pixel_values_videos`` is float32 [total_frames, max_soft_tokens, (k*p)**2 * 3]."""

    frames: ImageProcessor = field(default_factory=_unified_frame_processor)
