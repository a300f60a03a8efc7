"""Image loading and Gemma 4 image preprocessing (numpy + Pillow only).

Reference: transformers ``models/gemma4/image_processing_pil_gemma4.py`` (``Gemma4ImageProcessorPil``).
Each image is resized, keeping its aspect ratio, to the largest size whose sides are multiples of
``pooling_kernel_size * patch_size`` and whose patch count fits ``max_soft_tokens * pooling_kernel_size**2``;
pixels are scaled to [0, 1] (the model itself maps them to [-1, 1]); the image is cut into flattened
``patch_size x patch_size x 3`` patches in row-major order, each with its (x, y) grid position; and the patch
list is padded to the budget with zero patches at position (-1, -1).

One deliberate difference: the reference's ``convert("RGB")`` clips 16-bit and float images (a 16-bit PNG
comes out almost all white, a float TIFF in [0, 1] all black); here they are scaled to 8 bits first
(:func:`to_8bit`). 8-bit images are processed exactly as in the reference.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError
from .files import host_array, media_path, refuse_item

logger = logging.getLogger(__name__)

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)

ImageInput = Union[str, Path, Image.Image, np.ndarray]

# Pillow's truncated-image switch is process-global; hold it off while we force a full decode.
_TRUNCATION_LOCK = threading.Lock()


def _name(src: Any) -> str:
    if isinstance(src, Image.Image):
        return str(getattr(src, "filename", "") or "<in-memory image>")
    if isinstance(src, (str, Path)):
        return str(Path(src).expanduser())
    return "<image array>"


# Modes that hold more than 8 bits per pixel; Pillow's convert("RGB") clips them instead of scaling.
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def to_8bit(pixels: np.ndarray, name: str, full_scale: float | None = None) -> np.ndarray:
    """Pixels of any numeric dtype -> uint8 of the same shape, scaled (never clipped) to 0-255.

    ``full_scale`` is the value that means white (65535 for 16-bit images). Without it the range is read off
    the values: floats in [0, 1] are fractions of white, values in [0, 255] are 8-bit, integers in [0, 65535]
    16-bit; anything else is stretched from its minimum (black) to its maximum (white).
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    integer = np.issubdtype(pixels.dtype, np.integer)
    if not (integer or np.issubdtype(pixels.dtype, np.floating)):
        raise InputError(f"{name}: pixels of dtype {pixels.dtype} are not numbers. Pass uint8 pixels.")
    with np.errstate(invalid="ignore"):  # NaN and infinities are reported just below, not warned about
        x = pixels.astype(np.float64)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise InputError(f"{name}: {bad} pixel values are NaN or infinite. Replace them first "
                         "(e.g. with np.nan_to_num) or save the image as an 8-bit PNG.")
    lo, hi = float(x.min()), float(x.max())
    if full_scale is None and lo >= 0:
        if not integer and hi <= 1.0:
            full_scale = 1.0
        elif hi <= 255:
            full_scale = 255.0
        elif integer and hi <= 65535:
            full_scale = 65535.0
    if full_scale is not None:
        y = x * (255.0 / full_scale)
    elif hi > lo:
        y = (x / 2 - lo / 2) * (255.0 / (hi / 2 - lo / 2))  # halves: hi - lo may overflow near float64's max
    else:  # one value outside every known range: black below zero, white above
        y = np.full_like(x, 0.0 if lo < 0 else 255.0)
    return np.rint(np.clip(y, 0, 255)).astype(np.uint8)


def _high_bit_to_8bit(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit or 32-bit grayscale image as 8-bit "L" (or "LA" when one gray value is transparent)."""
    pixels = np.asarray(image)  # (H, W) uint16 / int32 / float32
    gray = Image.fromarray(to_8bit(pixels, name, 65535.0 if image.mode.startswith("I;16") else None))
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8))
        gray = Image.merge("LA", (gray, alpha))
    return gray


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """RGB view of ``image``; transparency is composited onto white, as the reference's ``convert_to_rgb``.

    16-bit and float grayscale images are scaled to 8 bits first (the reference's plain ``convert("RGB")``
    clips them to white or black); 8-bit images convert exactly as in the reference.
    """
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_8bit(image, name)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _bomb_error(name: str, e: Exception | str) -> InputError:
    return InputError(
        f"{name}: the image is too large to open safely ({e}). Downscale it first, or raise "
        f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) if you trust the file."
    )


def _decode_error(name: str, e: Exception) -> InputError:
    """What a Pillow failure means for the user (Pillow raises many types; each gets one clear message)."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _bomb_error(name, e)
    if isinstance(e, ValueError) and "closed" in str(e):
        return InputError(f"{name}: the PIL image was closed before it was passed in, so its pixels are gone. "
                          "Pass it while it is open (inside its `with` block), or pass image.copy().")
    if isinstance(e, MemoryError):
        return InputError(f"{name}: not enough memory to decode the image. Downscale it first.")
    return InputError(f"{name}: the image data is truncated or corrupt ({type(e).__name__}: {e}). Re-save or "
                      "re-download the file (a PNG or JPEG).")


def _check_pixel_count(image: Image.Image, name: str) -> None:
    """Refuse what Pillow refuses to open: over twice ``MAX_IMAGE_PIXELS`` (~179 megapixels by default). Between
    the limit and twice it Pillow only warns, and phones take such photos (108 and 200 MP modes): they are read, as
    the reference reads them."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > 2 * limit:
        raise _bomb_error(name, f"{image.width}x{image.height} pixels, over twice Pillow's limit of {limit}")


def _force_load(image: Image.Image, name: str) -> None:
    """Decode every pixel now, so a truncated file fails here instead of decoding partially."""
    with _TRUNCATION_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # see _check_pixel_count
                image.load()
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, struct.error, IndexError, ...
            raise _decode_error(name, e) from e
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _from_array(src: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, C) array of any numeric dtype as an 8-bit PIL image (see :func:`to_8bit`)."""
    if src.ndim not in (2, 3) or src.size == 0 or (src.ndim == 3 and src.shape[2] not in (1, 2, 3, 4)):
        raise InputError(f"An image array must be non-empty HxW or HxWxC with C in 1-4; got shape {src.shape}. "
                         "Pass uint8 HxWx3 pixels.")
    pixels = to_8bit(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src, "<image array>")
    return Image.fromarray(np.ascontiguousarray(pixels))  # L, LA, RGB or RGBA


def load_image(src: ImageInput) -> Image.Image:
    """Open ``src`` (a path, a PIL image or an HxW / HxWxC array) as a fully decoded 8-bit RGB PIL image.

    EXIF orientation is applied, so this is the picture the model sees (draw on this one). High-bit-depth and
    float pixels are scaled to 8 bits. Anything unusable raises :class:`InputError` naming the file.
    """
    src = host_array(src)
    name = _name(src)
    if isinstance(src, np.ndarray):
        image = _from_array(src)
    elif isinstance(src, Image.Image):
        image = src
        _check_pixel_count(image, name)
    elif isinstance(src, (str, Path)):
        image = _open_path(media_path(src, "image"))
    else:
        refuse_item("image", src)
    _force_load(image, name)
    if image.width < 1 or image.height < 1:
        raise InputError(f"{name}: the image has no pixels ({image.width}x{image.height}).")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a malformed EXIF block should not hide an otherwise good image
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
    try:
        return to_rgb(image, name)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: cannot convert its {image.mode} pixels to RGB ({e}). Save it as an RGB "
                         "PNG or JPEG.") from e


def _open_path(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # see _check_pixel_count
            return Image.open(path)
    except UnidentifiedImageError as e:
        raise InputError(
            f"{path} is not an image Pillow can read. Use a PNG, JPEG, WebP, GIF or BMP file."
        ) from e
    except PermissionError as e:
        raise InputError(f"{path}: cannot read the file ({e}). Check its permissions.") from e
    except Exception as e:
        raise _decode_error(str(path), e) from e


def probe_image(path: str | Path) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied) when Pillow reads ``path`` as an image, else None.

    Reads the header and checks the data where the format allows (no full decode). An image over Pillow's
    decompression-bomb limit raises :class:`InputError`, as :func:`load_image` would.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # see _check_pixel_count
            with Image.open(path) as im:
                width, height = im.size
                im.verify()  # must come first: it works on the freshly opened file
            with Image.open(path) as im:
                orientation = im.getexif().get(0x0112, 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(str(path), e) from e
    except Exception:  # not an image, or one Pillow cannot parse: either way not usable as an image
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def aspect_ratio_preserving_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """Largest (height, width), both multiples of ``pooling_kernel_size * patch_size``, with at most
    ``max_patches`` patches and roughly the input's aspect ratio (the reference's rule, edge cases included)."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    target_h = int(math.floor(factor * height / side)) * side
    target_w = int(math.floor(factor * width / side)) * side
    if target_h == 0 and target_w == 0:
        raise InputError(f"Cannot resize a {width}x{height} image to a multiple of {side} pixels.")
    # A very thin image: one pooled row (or column), as long as the ratio allows, within the budget.
    max_side = (max_patches // pooling_kernel_size**2) * side
    if target_h == 0:
        target_h, target_w = side, min(int(math.floor(width / height)) * side, max_side)
    elif target_w == 0:
        target_h, target_w = min(int(math.floor(height / width)) * side, max_side), side
    if target_h * target_w > target_px:
        raise InputError(f"Resizing {width}x{height} to {target_w}x{target_h} exceeds {max_patches} patches.")
    return target_h, target_w


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W) -> (num_patches, patch_size * patch_size * C), patches row-major, pixels (py, px, c) inside."""
    c, h, w = image.shape
    ph, pw = h // patch_size, w // patch_size
    x = image.reshape(c, ph, patch_size, pw, patch_size)  # (C, ph, p, pw, p)
    x = x.transpose(1, 3, 2, 4, 0)  # (ph, pw, p, p, C)
    return x.reshape(ph * pw, patch_size * patch_size * c)  # (ph*pw, p*p*C)


def patch_positions(patches_high: int, patches_wide: int) -> np.ndarray:
    """(patches_high * patches_wide, 2) int64 grid positions as (x, y), row-major like :func:`patchify`."""
    xs, ys = np.meshgrid(np.arange(patches_wide), np.arange(patches_high), indexing="xy")  # (ph, pw) each
    return np.stack([xs, ys], axis=-1).reshape(patches_high * patches_wide, 2)  # (ph*pw, 2)


def pad_patches(patches: np.ndarray, positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to ``length`` rows: zero patches at position (-1, -1), which the model treats as padding."""
    extra = length - patches.shape[0]
    if extra <= 0:
        return patches, positions
    patches = np.pad(patches, [(0, extra), (0, 0)], constant_values=0)
    positions = np.pad(positions, [(0, extra), (0, 0)], constant_values=-1)
    return patches, positions


def _settings(d: dict[str, Any], section: str) -> dict[str, Any]:
    """The processor settings from a preprocessor_config.json (flat) or processor_config.json (nested)."""
    if isinstance(d.get(section), dict):
        return d[section]
    return d


@dataclass
class ImageProcessor:
    """Gemma 4 image preprocessing; defaults are ``Gemma4ImageProcessorPil``'s."""

    max_soft_tokens: int = 280
    patch_size: int = 16
    pooling_kernel_size: int = 3
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def __post_init__(self) -> None:
        self.check_budget(self.max_soft_tokens)

    @staticmethod
    def check_budget(max_soft_tokens: Any) -> int:
        """``max_soft_tokens`` as an int if it is a supported budget; InputError otherwise."""
        ok = isinstance(max_soft_tokens, numbers.Integral) and not isinstance(max_soft_tokens, bool)
        if not ok or int(max_soft_tokens) not in SUPPORTED_SOFT_TOKENS:
            raise InputError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}; got {max_soft_tokens!r}.")
        return int(max_soft_tokens)

    def budget(self, max_soft_tokens: Any = None) -> int:
        """The budget to use: ``max_soft_tokens`` if given (checked), else this processor's default."""
        return self.max_soft_tokens if max_soft_tokens is None else self.check_budget(max_soft_tokens)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessor:
        """Build from the checkpoint's processor_config.json / preprocessor_config.json contents."""
        s = _settings(d, "image_processor")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in s if k not in names)
        if unknown:
            logger.debug("ImageProcessor: ignoring keys %s", unknown)
        return cls(**{k: v for k, v in s.items() if k in names and v is not None})

    def max_patches(self, max_soft_tokens: int) -> int:
        return max_soft_tokens * self.pooling_kernel_size**2

    def target_size(self, height: int, width: int, max_soft_tokens: int | None = None) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        budget = self.budget(max_soft_tokens)
        return aspect_ratio_preserving_size(
            height, width, self.patch_size, self.max_patches(budget), self.pooling_kernel_size
        )

    def pixels(self, image: ImageInput, max_soft_tokens: int) -> np.ndarray:
        """One image loaded, resized to fit ``max_soft_tokens`` and scaled: (C, H, W) float32."""
        img = load_image(image)
        if self.do_resize:
            h, w = self.target_size(img.height, img.width, max_soft_tokens)
            if (h, w) != (img.height, img.width):
                img = img.resize((w, h), resample=self.resample)
        return self.scale(np.asarray(img).transpose(2, 0, 1))  # (H, W, C) -> (C, H, W), still uint8

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        """(C, H, W) uint8 -> float32, rescaled and normalized as configured."""
        if self.do_rescale:
            # float64 then float32, as the reference's rescale, so values match bit for bit.
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]  # (C, 1, 1)
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]  # (C, 1, 1)
            pixels = ((pixels - mean) / std).astype(np.float32)
        return pixels.astype(np.float32, copy=False)

    def preprocess_one(self, image: ImageInput, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One image -> (patches [max_patches, p*p*3] float32, positions [max_patches, 2] int64, soft tokens)."""
        pixels = self.pixels(image, max_soft_tokens)
        p = self.patch_size
        patches = patchify(pixels, p)
        positions = patch_positions(pixels.shape[1] // p, pixels.shape[2] // p)
        num_soft = patches.shape[0] // self.pooling_kernel_size**2
        patches, positions = pad_patches(patches, positions, self.max_patches(max_soft_tokens))
        return patches, positions, num_soft

    def __call__(self, images: ImageInput | Sequence[ImageInput], max_soft_tokens: int | None = None) -> dict:
        """Preprocess one image or a list. Returns numpy arrays:

        - ``pixel_values``: float32 [num_images, max_patches, patch_size**2 * 3]
        - ``image_position_ids``: int64 [num_images, max_patches, 2], (x, y), padding (-1, -1)
        - ``num_soft_tokens_per_image``: list[int]
        """
        budget = self.budget(max_soft_tokens)
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise InputError(f"Cannot use {type(images).__name__} as images; pass an image or a list of them.")
        if len(images) == 0:
            raise InputError("No images to preprocess: pass an image (a path, a PIL image or an array) or a "
                             "list of them.")
        out = [self.preprocess_one(image, budget) for image in images]
        return {
            "pixel_values": np.stack([o[0] for o in out]),  # (N, max_patches, p*p*3)
            "image_position_ids": np.stack([o[1] for o in out]),  # (N, max_patches, 2)
            "num_soft_tokens_per_image": [o[2] for o in out],
        }
