"""Gemma 4 12B (``gemma4_unified``) processor references for the tests: the reference's own image / video code run
without torchvision, its audio feature extractor and placeholder expansion, and a 12B-shaped checkpoint directory.

The reference's image and video processors import torchvision at the top, which must not be installed here, so
their own functions and ``_preprocess`` methods are compiled from the reference source files and run with torch:
the resize they call is torch's bicubic interpolation on uint8, which is what torchvision's resize runs on CPU;
rescaling is TorchvisionBackend's own method. The audio feature extractor and the composite processor's
placeholder methods import as they are.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mlx_gemma4.processing.image import load_image
from tests.fixtures_tokenizer import make_tokenizer
from tests.helpers import reference_tokens


def _torch_resize(image, size, interpolation=None, antialias=True):
    # What torchvision's resize does on CPU for uint8 bicubic: torch's own uint8 interpolation, antialiased.
    batched = image if image.ndim == 4 else image[None]
    out = torch.nn.functional.interpolate(batched, size=list(size), mode="bicubic", antialias=antialias)
    return out if image.ndim == 4 else out[0]


def reference_code(module: str, functions: tuple[str, ...], cls: str, methods: tuple[str, ...]) -> SimpleNamespace:
    """Module-level ``functions`` and ``cls``'s ``methods`` of transformers' gemma4_unified ``module``, compiled from
    its source with torch, and a stand-in ``tvF`` whose resize is :func:`_torch_resize`."""
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import PILImageResampling
    from transformers.utils import TensorType

    folder = Path(importlib.util.find_spec("transformers.models.gemma4_unified").submodule_search_locations[0])
    tree = ast.parse((folder / f"{module}.py").read_text())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions]
    budgets = [n for n in tree.body if isinstance(n, ast.Assign)
               and ast.unparse(n.targets[0]) == "_SUPPORTED_SOFT_TOKENS"]
    [class_def] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    wanted += [n for n in class_def.body if isinstance(n, ast.FunctionDef) and n.name in methods]
    assert sorted(n.name for n in wanted) == sorted(functions + methods), "the reference file changed"
    wanted = budgets + wanted
    namespace = {"math": math, "torch": torch, "BatchFeature": BatchFeature, "TensorType": TensorType,
                 "PILImageResampling": PILImageResampling, "tvF": SimpleNamespace(resize=_torch_resize)}
    code = compile(ast.Module(body=wanted, type_ignores=[]), str(folder / f"{module}.py"), "exec")
    exec(code, namespace)  # noqa: S102  (the installed reference's own source, nothing else)

    class Backend:  # the processor object its methods run on: TorchvisionBackend's rescaling, torchvision's normalize
        rescale_and_normalize = TorchvisionBackend.rescale_and_normalize
        rescale = TorchvisionBackend.rescale
        _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor

        def normalize(self, image, mean, std, inplace=False):  # torchvision: (x - mean) / std per channel
            mean, std = torch.as_tensor(mean).view(-1, 1, 1), torch.as_tensor(std).view(-1, 1, 1)
            return (image - mean) / std

    for name in methods:
        setattr(Backend, name, namespace[name])
    return SimpleNamespace(backend=Backend(), **{k: namespace[k] for k in functions})


@functools.cache
def image_reference() -> SimpleNamespace:
    return reference_code("image_processing_gemma4_unified",
                          ("get_aspect_ratio_preserving_size", "convert_image_to_patches", "pad_along_first_dim",
                           "patches_merge"),
                          "Gemma4UnifiedImageProcessor", ("aspect_ratio_preserving_resize", "_preprocess"))


@functools.cache
def video_reference() -> SimpleNamespace:
    return reference_code("video_processing_gemma4_unified",
                          ("get_aspect_ratio_preserving_size", "convert_video_to_patches", "pad_to_max_patches",
                           "patches_merge"),
                          "Gemma4UnifiedVideoProcessor", ("aspect_ratio_preserving_resize", "_preprocess"))


def _run(reference: SimpleNamespace, tensors: list, budget: int, do_normalize: bool) -> dict:
    """``_preprocess`` with the processor's defaults (those of the 12B's processor_config.json), as numpy."""
    out = reference.backend._preprocess(
        tensors, do_resize=True, resample="bicubic", do_rescale=True, rescale_factor=1 / 255,
        do_normalize=do_normalize, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), return_tensors=None,
        patch_size=16, max_soft_tokens=budget, pooling_kernel_size=3)
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def reference_images(images: list, budget: int) -> dict:
    """The reference image processor's output for these images (decoded as ours are: RGB, EXIF applied)."""
    tensors = [torch.from_numpy(np.array(load_image(i))).permute(2, 0, 1).contiguous() for i in images]  # (C, H, W)
    return _run(image_reference(), tensors, budget, do_normalize=False)


def reference_videos(videos: list[np.ndarray], budget: int) -> dict:
    """The reference video processor's output for these (T, H, W, 3) uint8 videos (frames already sampled)."""
    tensors = [torch.from_numpy(np.array(v)).permute(0, 3, 1, 2).contiguous() for v in videos]  # (T, C, H, W)
    return _run(video_reference(), tensors, budget, do_normalize=True)


def reference_audio(clips: list[np.ndarray]) -> dict:
    """Gemma4UnifiedAudioFeatureExtractor's output for these 16 kHz clips."""
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    return Gemma4UnifiedAudioFeatureExtractor()(list(clips))


def unified_processor_config() -> dict:
    """processor_config.json as Gemma4UnifiedProcessor's save_pretrained nests it (the reference's defaults)."""
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    vision = {"do_convert_rgb": True, "do_rescale": True, "do_resize": True, "image_mean": [0.0, 0.0, 0.0],
              "image_std": [1.0, 1.0, 1.0], "patch_size": 16, "pooling_kernel_size": 3, "resample": 3,
              "rescale_factor": 1 / 255}
    return {
        "processor_class": "Gemma4UnifiedProcessor", "image_seq_length": 280, "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": {**vision, "image_processor_type": "Gemma4UnifiedImageProcessor", "do_normalize": False,
                            "max_soft_tokens": 280},
        "feature_extractor": Gemma4UnifiedAudioFeatureExtractor().to_dict(),
        "video_processor": {**vision, "video_processor_type": "Gemma4UnifiedVideoProcessor", "do_normalize": True,
                            "do_sample_frames": True, "max_soft_tokens": 70, "num_frames": 4},
    }


def unified_dir(path: Path, *, config: dict | None = None, processor_config: dict | None = None) -> Path:
    """A checkpoint directory with the test tokenizer, a 12B processor_config.json and, if given, config.json."""
    make_tokenizer(path, processor_config=False)
    (path / "processor_config.json").write_text(json.dumps(processor_config or unified_processor_config()))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def expected_ids(ref_tok, text: str, image_out=None, video_out=None, audio_out=None) -> tuple:
    """input_ids and mm_token_type_ids Gemma4UnifiedProcessor gives for `text` and its media outputs."""
    from transformers.models.gemma4_unified import processing_gemma4_unified as unified
    from transformers.processing_utils import ProcessorMixin

    P = unified.Gemma4UnifiedProcessor
    ref = reference_tokens(ref_tok)

    def runs(out, method, key):
        return [method(ref, out, i) for i in range(len(out[key]))] if out is not None else []

    image_repl = runs(image_out, P.replace_image_token, "num_soft_tokens_per_image")
    video_repl = runs(video_out, P.replace_video_token, "num_soft_tokens_per_video")
    audio_repl = runs(audio_out, P.replace_audio_token, "input_features_mask")
    [expanded], _ = ProcessorMixin.get_text_with_replacements(ref, [text], image_repl, video_repl, audio_repl)
    ids = ref_tok(expanded, add_special_tokens=not expanded.startswith("<bos>")).input_ids
    [types] = ProcessorMixin.create_mm_token_type_ids(ref, [ids])
    return ids, types
