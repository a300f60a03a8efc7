"""The Gemma 4 12B (``gemma4_unified``) processor: the Gemma 4 processor with the encoder-free model's media inputs.

Reference: transformers ``models/gemma4_unified/processing_gemma4_unified.py`` (``Gemma4UnifiedProcessor``). The
prompt side is Gemma 4's (same placeholders, same expansion in prompt order, same ``mm_token_type_ids``); images
and video frames become raw pixel patches (unified_vision.py) and audio raw waveform frames (unified_audio.py):

    image  -> boi + image_token * n + eoi                  n = the image's patches (one per soft token)
    audio  -> boa + audio_token * n + eoa                  n = ceil(samples / 640), any length, never split
    video  -> "mm:ss boi video_token*n eoi" per frame, joined by spaces

``Processor.from_pretrained`` (and so ``load()``) returns this class for a 12B checkpoint.
"""

from __future__ import annotations

from typing import Any

from .processor import Processor


class UnifiedProcessor(Processor):
    """Tokenizer + media preprocessors of a Gemma 4 12B checkpoint; called like :class:`Processor`, returning the
    same keys: ``input_ids``, ``mm_token_type_ids``, ``pixel_values`` [N, max_soft_tokens, 6912] +
    ``image_position_ids``, ``pixel_values_videos`` + ``video_position_ids`` (one row per frame),
    ``input_features`` [N, T, 640] raw waveform frames + ``input_features_mask`` [N, T]."""

    def _build(self, kind: str) -> Any:
        if kind == "image":
            from .unified_vision import UnifiedImageProcessor

            return UnifiedImageProcessor.from_dict(self._settings("image"))
        if kind == "audio":
            from .unified_audio import UnifiedAudioFeatureExtractor

            return UnifiedAudioFeatureExtractor.from_dict(self._settings("audio"))
        from .unified_vision import UnifiedVideoProcessor

        return UnifiedVideoProcessor.from_dict(self._settings("video"))
