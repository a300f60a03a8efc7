"""Image loading and preprocessing, checked against transformers' Gemma4ImageProcessorPil."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.errors import InputError
from mlx_gemma4.processing.image import SUPPORTED_SOFT_TOKENS, ImageProcessor, load_image
from tests.helpers import check_unusable_paths, raises_naming

SIZES = {"square": (64, 64), "wide_4to1": (400, 100), "tall_1to5": (60, 300), "tiny_8x8": (8, 8),
         "large_4000x3000": (4000, 3000)}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    # A smooth gradient plus noise: resampling differences would show up as pixel differences.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-20, 21, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def reference():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


@pytest.fixture(scope="module")
def images():
    return {name: _image(w, h, i) for i, (name, (w, h)) in enumerate(SIZES.items())}


@pytest.mark.parametrize("budget", SUPPORTED_SOFT_TOKENS)
def test_parity_with_reference(reference, images, budget):
    ours = ImageProcessor()
    for name, image in images.items():
        ref = reference(image, max_soft_tokens=budget, return_tensors="np")
        got = ours(image, max_soft_tokens=budget)
        assert got["num_soft_tokens_per_image"] == list(ref["num_soft_tokens_per_image"]), name
        assert got["image_position_ids"].shape == ref["image_position_ids"].shape, name
        np.testing.assert_array_equal(got["image_position_ids"], ref["image_position_ids"], err_msg=name)
        # Same Pillow resize of the same uint8 image and the same float64->float32 rescale: the values should
        # agree exactly; the tolerance only allows for a different float rounding order (1 ulp of 1.0).
        assert got["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-7, err_msg=name)


def test_batch_and_padding(images):
    out = ImageProcessor()([images["square"], images["wide_4to1"]], max_soft_tokens=70)
    assert out["pixel_values"].shape == (2, 630, 768)
    n = [t * 9 for t in out["num_soft_tokens_per_image"]]
    for i in range(2):
        assert (out["image_position_ids"][i, n[i]:] == -1).all()
        assert (out["pixel_values"][i, n[i]:] == 0).all()
        assert (out["image_position_ids"][i, : n[i]] >= 0).all()


def test_one_pixel_image_matches_reference(reference):
    image = Image.new("RGB", (1, 1), (200, 10, 30))
    ref = reference(image, max_soft_tokens=70, return_tensors="np")
    got = ImageProcessor()(image, max_soft_tokens=70)
    assert got["num_soft_tokens_per_image"] == list(ref["num_soft_tokens_per_image"])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=1e-7)


def test_from_dict_reads_nested_and_flat():
    nested = {"image_processor": {"max_soft_tokens": 560, "patch_size": 16, "pooling_kernel_size": 3,
                                  "image_processor_type": "Gemma4ImageProcessor"}, "image_seq_length": 280}
    assert ImageProcessor.from_dict(nested).max_soft_tokens == 560
    assert ImageProcessor.from_dict({"max_soft_tokens": 70, "resample": 3}).max_soft_tokens == 70
    assert ImageProcessor.from_dict({}) == ImageProcessor()
    with pytest.raises(InputError):
        ImageProcessor(max_soft_tokens=100)


def test_load_image_modes_and_exif(tmp_path):
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))  # fully transparent: composited onto white
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "P", "CMYK", "LA"):
        img = load_image(Image.new(mode, (5, 3)))
        assert img.mode == "RGB" and img.size == (5, 3)
    tall = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = tall.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    tall.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(str(tmp_path / "r.jpg")).size == (10, 20)


def test_a_file_url_is_read_as_its_path(tmp_path):
    _image(40, 30).save(tmp_path / "my cat.png")
    url = (tmp_path / "my cat.png").as_uri()   # file:///.../my%20cat.png
    assert np.array_equal(np.array(load_image(url)), np.array(load_image(tmp_path / "my cat.png")))


def test_bad_inputs_name_the_file(tmp_path, monkeypatch):
    check_unusable_paths(load_image, tmp_path, ".png", "not an image")
    _image(64, 64).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    raises_naming(load_image, tmp_path / "cut.jpg", "cut.jpg", "truncated")
    # Someone else turning on Pillow's lenient mode must not make us decode half an image.
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    raises_naming(load_image, tmp_path / "cut.jpg", "cut.jpg", "truncated")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # > limit warns, > 2x limit errors
    raises_naming(load_image, tmp_path / "full.jpg", "full.jpg", "too large")


def test_a_photo_over_pillows_warning_limit_is_read(tmp_path, monkeypatch):
    """Between Pillow's MAX_IMAGE_PIXELS and twice it Pillow only warns (a phone's 108 MP photo at the default):
    read, as the reference reads it, from a path, a PIL image, and for the app's probe."""
    from mlx_gemma4.processing.image import probe_image

    _image(64, 48).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)
    assert load_image(tmp_path / "big.png").size == (64, 48)
    assert load_image(Image.open(tmp_path / "big.png")).size == (64, 48)
    assert probe_image(tmp_path / "big.png") == (64, 48)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 2 - 1)
    raises_naming(load_image, tmp_path / "big.png", "big.png", "too large")
    with pytest.raises(InputError, match="too large"):
        load_image(Image.new("RGB", (64, 48)))


def test_decompression_bomb_is_a_clear_error_everywhere(bomb_png, monkeypatch):
    for src in (bomb_png, str(bomb_png)):
        raises_naming(load_image, src, "huge.png", "too large")
    with pytest.raises(InputError, match="too large"):
        ImageProcessor()([bomb_png])
    # A PIL image the caller opened (or made) over the limit is refused the same way.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)
    with pytest.raises(InputError, match="too large.*MAX_IMAGE_PIXELS"):
        load_image(Image.new("RGB", (64, 64)))


def test_any_pillow_decode_failure_is_an_input_error(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    _image(16, 16).save(tmp_path / "ok.png")

    def broken(self):
        raise IndexError("tile index out of range")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    raises_naming(load_image, tmp_path / "ok.png", "ok.png", "corrupt")


def test_closed_image_says_it_is_closed():
    image = _image(8, 8)
    image.close()
    with pytest.raises(InputError, match="closed") as e:
        load_image(image)
    assert "corrupt" not in str(e.value)


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _image(20, 10).save(tmp_path / "photo.png")
    assert load_image("~/photo.png").size == (20, 10)


def _gray(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(load_image(image)).astype(int)  # (H, W, 3)
    assert (rgb == rgb[..., :1]).all()
    return rgb[..., 0]


def test_16_bit_png_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)  # (4, 256)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    got = _gray(tmp_path / "deep.png")
    np.testing.assert_allclose(got, ramp / 257, atol=0.51)
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "deep32.tif")  # mode I: a 16-bit range in 32 bits
    np.testing.assert_allclose(_gray(tmp_path / "deep32.tif"), ramp / 257, atol=0.51)


def test_float_tiff_is_scaled_from_its_range(tmp_path):
    unit = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0)  # (4, 256) in [0, 1]
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    np.testing.assert_allclose(_gray(tmp_path / "unit.tif"), unit * 255, atol=0.51)
    wide = unit * 10 - 3  # any other range: its minimum is black and its maximum white
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    np.testing.assert_allclose(_gray(tmp_path / "wide.tif"), unit * 255, atol=0.51)
    assert len(np.unique(_gray(tmp_path / "wide.tif"))) == 256


def test_arrays_of_other_dtypes_are_scaled():
    unit = np.linspace(0, 1, 64)[None, :, None].repeat(3, 0).repeat(3, 2)  # (3, 64, 3) float64 in [0, 1]
    np.testing.assert_allclose(np.asarray(load_image(unit)), unit * 255, atol=0.51)
    np.testing.assert_allclose(np.asarray(load_image((unit * 255).astype(np.float32))), unit * 255, atol=0.51)
    np.testing.assert_allclose(np.asarray(load_image((unit * 65535).astype(np.uint16))), unit * 255, atol=0.51)
    np.testing.assert_array_equal(np.asarray(load_image(np.full((2, 2, 1), True)))[..., 0], 255)
    with pytest.raises(InputError, match="NaN"):
        load_image(np.full((4, 4), np.nan, np.float32))
