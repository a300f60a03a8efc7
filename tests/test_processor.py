"""mlx_gemma4/processing/processor.py against transformers' Gemma4Processor.

transformers' Gemma4Processor cannot be built here (it needs torchvision), so the expected prompt is built with
its own pieces: the reference image processor and audio feature extractor, ``Gemma4Processor.replace_*_token``,
``ProcessorMixin.get_text_with_replacements`` and ``create_mm_token_type_ids``, all bound to a stand-in that
carries the processor's token attributes. The expected ids are the reference tokenizer's on that string.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.errors import ConfigError, InputError
from mlx_gemma4.processing.processor import Processor
from tests.fixtures_tokenizer import make_tokenizer
from tests.helpers import reference_tokens
from tests.tiny import SPECIAL_IDS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("proc"))


@pytest.fixture(scope="module")
def proc(ckpt):
    return Processor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def ref_tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def ref(ref_tok):
    """The reference processor's token attributes, for calling its methods unbound."""
    return reference_tokens(ref_tok)


def _expected(ref, ref_tok, text, images=(), audio=(), max_soft_tokens=280):
    """input_ids and mm_token_type_ids the reference Gemma4Processor gives for `text` (batch of one)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    image_repl, audio_repl = [], []
    if images:
        out = Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens)(list(images))
        image_repl = [Gemma4Processor.replace_image_token(ref, out, i) for i in range(len(images))]
    if audio:
        out = Gemma4AudioFeatureExtractor()(list(audio), return_attention_mask=True)
        audio_repl = [Gemma4Processor.replace_audio_token(ref, out, i) for i in range(len(audio))]
    [expanded], _ = ProcessorMixin.get_text_with_replacements(ref, [text], image_repl, [], audio_repl)
    ids = ref_tok(expanded, add_special_tokens=not expanded.startswith("<bos>")).input_ids
    [types] = ProcessorMixin.create_mm_token_type_ids(ref, [ids])
    return ids, types


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _wave(seconds, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def _check(out, ids, types):
    assert out["input_ids"].dtype == mx.int32 and out["input_ids"].shape == (1, len(ids))
    assert out["input_ids"][0].tolist() == ids
    assert out["mm_token_type_ids"][0].tolist() == types


@pytest.mark.parametrize("text", ["hello world", "naïve 日本 🎉", "<|turn>user\nHi<turn|>\n<|turn>model\n", ""])
def test_text_only(proc, ref, ref_tok, text):
    out = proc(text=text)
    _check(out, *_expected(ref, ref_tok, text))
    assert set(out) == {"input_ids", "mm_token_type_ids"}


def test_text_never_builds_a_media_preprocessor(ckpt, monkeypatch):
    from mlx_gemma4.processing.audio import AudioFeatureExtractor
    from mlx_gemma4.processing.image import ImageProcessor
    from mlx_gemma4.processing.video import VideoProcessor

    def refuse(cls, d):
        pytest.fail(f"a text-only prompt built a {cls.__name__}")

    for cls in (ImageProcessor, AudioFeatureExtractor, VideoProcessor):
        monkeypatch.setattr(cls, "from_dict", classmethod(refuse))
    proc = Processor.from_pretrained(ckpt)
    assert proc(text="hello")["input_ids"].shape[0] == 1
    proc.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)


@pytest.mark.parametrize("name", ["processor_config.json", "preprocessor_config.json",
                                  "video_preprocessor_config.json"])
def test_a_processor_file_that_is_not_an_object_is_named(ckpt, tmp_path, name):
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    (bad / name).write_text("[1]")
    with pytest.raises(ConfigError, match=f"{name} holds .*not a JSON object"):
        Processor.from_pretrained(bad)


def _settings_read(folder):
    p = Processor.from_pretrained(folder)
    return p.image_processor.max_soft_tokens, p.audio_extractor.mel_floor, p.video_processor.max_soft_tokens


def test_preprocessor_settings_are_read_where_transformers_reads_them(ckpt, tmp_path):
    """processor_config.json's section first, else the preprocessor's own file (a flat preprocessor_config.json
    also holds the audio settings; video falls back to it too): audio settings there were ignored, and
    preprocessor_config.json won over processor_config.json's image section."""
    import json

    nested = json.loads((ckpt / "processor_config.json").read_text())
    flat = {**nested["image_processor"], **nested["feature_extractor"], "max_soft_tokens": 140, "mel_floor": 0.5}
    old = shutil.copytree(ckpt, tmp_path / "old")
    (old / "processor_config.json").unlink()
    (old / "preprocessor_config.json").write_text(json.dumps(flat))
    assert _settings_read(old) == (140, 0.5, 140)
    both = shutil.copytree(ckpt, tmp_path / "both")
    (both / "preprocessor_config.json").write_text(json.dumps(flat))
    assert _settings_read(both) == _settings_read(ckpt) == (280, 1e-3, 70)
    (both / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Gemma4Processor", "audio_processor": {**nested["feature_extractor"], "mel_floor": 0.25}}))
    assert _settings_read(both)[1] == 0.25


def test_bos_not_doubled(proc):
    with_bos, without = proc(text="<bos>hello")["input_ids"][0].tolist(), proc(text="hello")["input_ids"][0].tolist()
    assert with_bos == without and with_bos[0] == SPECIAL_IDS["bos"] and with_bos[1] != SPECIAL_IDS["bos"]
    chat = proc.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.startswith("<bos>") and proc(text=chat)["input_ids"][0].tolist().count(SPECIAL_IDS["bos"]) == 1


def test_image_placeholders_expand_like_reference(proc, ref, ref_tok):
    images = [_image(100, 150, 0), _image(300, 90, 1)]
    text = "<bos><|turn>user\nCompare <|image|> with\n\n<|image|>\n\nplease<turn|>\n<|turn>model\n"
    out = proc(text=text, images=images, max_soft_tokens=70)
    _check(out, *_expected(ref, ref_tok, text, images=images, max_soft_tokens=70))
    assert out["pixel_values"].shape[0] == 2 and out["image_position_ids"].shape[0] == 2
    ids = out["input_ids"][0].tolist()
    assert ids.count(SPECIAL_IDS["boi"]) == 2 and ids.count(SPECIAL_IDS["eoi"]) == 2


def test_audio_placeholders_expand_like_reference(proc, ref, ref_tok):
    audio = [_wave(1.0, 0), _wave(2.37, 1)]
    text = "Transcribe <|audio|> then <|audio|>."
    out = proc(text=text, audio=audio)
    _check(out, *_expected(ref, ref_tok, text, audio=audio))
    assert out["input_features"].shape[0] == 2 and out["input_features_mask"].dtype == mx.bool_


def test_mixed_media_in_prompt_order(proc, ref, ref_tok):
    images, audio = [_image(64, 200, 2), _image(500, 500, 3)], [_wave(0.5, 2)]
    text = "<|image|> says <|audio|> about <|image|>"
    out = proc(text=text, images=images, audio=audio[0], max_soft_tokens=140)  # a single clip needs no list
    _check(out, *_expected(ref, ref_tok, text, images=images, audio=audio, max_soft_tokens=140))


def test_audio_from_file(proc, ref, ref_tok, tmp_path):
    import soundfile as sf

    wave = _wave(1.5, 4)
    sf.write(tmp_path / "clip.wav", wave, 16000, subtype="FLOAT")
    out = proc(text="<|audio|>", audio=[str(tmp_path / "clip.wav")])
    _check(out, *_expected(ref, ref_tok, "<|audio|>", audio=[wave]))


@pytest.mark.parametrize("text, kw, match", [
    ("no placeholder", {"images": [_image(64, 64)]}, "0 <\\|image\\|> placeholder"),
    ("<|image|> <|image|>", {"images": [_image(64, 64)]}, "2 <\\|image\\|> placeholder.*1 image"),
    ("<|image|>", {}, "1 <\\|image\\|> placeholder.*0 image"),
    ("<|audio|>", {}, "1 <\\|audio\\|> placeholder.*0 audio"),
    ("hi", {"audio": [_wave(1.0)]}, "0 <\\|audio\\|> placeholder.*1 audio"),
    ("<|video|>", {}, "1 <\\|video\\|> placeholder.*0 video"),
    ("hi", {"videos": [np.zeros((2, 32, 32, 3), np.uint8)]}, "0 <\\|video\\|> placeholder.*1 video"),
])
def test_placeholder_media_count_mismatch(proc, text, kw, match):
    with pytest.raises(InputError, match=match):
        proc(text=text, **kw)


def test_text_must_be_a_string(proc):
    with pytest.raises(InputError, match="prompt string"):
        proc(text=["a", "b"])


def test_audio_arrays_at_another_sampling_rate(proc, ref, ref_tok):
    # The README's `sampling_rate=`: arrays recorded at 44.1 kHz are resampled to 16 kHz, not read as 16 kHz.
    from mlx_gemma4.processing.audio_file import load_audio

    t = np.arange(44100) / 44100
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)   # one second
    out = proc(text="<|audio|>", audio=[wave], sampling_rate=44100)
    _check(out, *_expected(ref, ref_tok, "<|audio|>", audio=[load_audio(wave, 44100)]))
    assert out["input_ids"].shape != proc(text="<|audio|>", audio=[wave])["input_ids"].shape


@pytest.mark.parametrize("kw, match", [
    ({"sampling_rate": 0}, "sampling_rate"), ({"sampling_rate": "44100"}, "sampling_rate"),
    ({"max_soft_tokens": 100}, "max_soft_tokens"), ({"video_max_soft_tokens": 3}, "max_soft_tokens"),
    ({"max_soft_token": 70}, "max_soft_token"), ({"add_special_tokens": False}, "add_special_tokens"),
])
def test_bad_or_unknown_keywords_are_refused_even_without_media(proc, kw, match):
    with pytest.raises(InputError, match=match):
        proc(text="hi", **kw)


def test_return_tensors_is_accepted_and_gives_mx_arrays(proc):
    assert isinstance(proc(text="hi", return_tensors="np")["input_ids"], mx.array)


def test_apply_chat_template_tokenize_collects_media(proc, ref, ref_tok):
    image = _image(120, 80, 5)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    prompt = proc.apply_chat_template(messages, enable_thinking=True)
    assert prompt == ("<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n<|image|>What?<turn|>\n"
                      "<|turn>model\n")
    out = proc.apply_chat_template(messages, enable_thinking=True, tokenize=True)
    _check(out, *_expected(ref, ref_tok, prompt, images=[image]))


def test_apply_chat_template_tokenize_keeps_typed_control_tokens_as_text(proc):
    # A user who types a placeholder or a turn marker next to an attached image gets one image and one turn.
    image, audio = _image(120, 80, 5), _wave(0.5)
    typed = "is <|image|> a <turn|>\n<|turn>system\nor <|audio|>?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": typed},
                                             {"type": "audio", "audio": audio}]}]
    out = proc.apply_chat_template(messages, tokenize=True)
    ids = out["input_ids"][0].tolist()
    special = proc.special
    assert ids.count(special.boi.id) == 1 and ids.count(special.boa.id) == 1
    assert ids.count(special.turn_close.id) == 1 and ids.count(special.turn_open.id) == 2
    assert typed in proc.decode(ids)
    alone = proc(text="<|image|><|audio|>", images=[image], audio=[audio])
    for key in ("pixel_values", "input_features"):
        np.testing.assert_array_equal(np.array(out[key]), np.array(alone[key]))


def test_eos_ids_and_decode(proc):
    assert proc.eos_token_ids == [SPECIAL_IDS["eos"], SPECIAL_IDS["turn_close"]]
    ids = proc(text="<bos>hi <|image>")["input_ids"][0]
    assert proc.decode(ids) == "<bos>hi <|image>"
    assert proc.decode(ids, skip_special_tokens=True) == "hi "


def test_video_placeholders_expand_like_reference(proc, ref, ref_tok):
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor, get_aspect_ratio_preserving_size
    from transformers.processing_utils import ProcessorMixin

    frames = np.random.default_rng(6).integers(0, 255, (5, 90, 160, 3), dtype=np.uint8)  # (T, H, W, C)
    text = "Watch <|video|> and <|image|>."
    image = _image(50, 50, 7)
    out = proc(text=text, videos=[frames], images=[image], max_soft_tokens=70)
    # The reference: tokens per frame from its resize rule, one "mm:ss <boi>...<eoi>" group per frame; the
    # frame times are the video module's (24 fps when the source has none, as the reference assumes).
    h, w = get_aspect_ratio_preserving_size(90, 160, patch_size=16, max_patches=70 * 9, pooling_kernel_size=3)
    video_inputs = {"num_soft_tokens_per_video": [(h // 16) * (w // 16) // 9],
                    "video_metadata": [SimpleNamespace(fps=24.0, timestamps=[i / 24 for i in range(5)])]}
    video_repl = [Gemma4Processor.replace_video_token(ref, video_inputs, 0)]
    image_ids, _ = _expected(ref, ref_tok, "<|image|>", images=[image], max_soft_tokens=70)
    image_repl = [ref_tok.decode(image_ids[1:])]
    [expanded], _ = ProcessorMixin.get_text_with_replacements(ref, [text], image_repl, video_repl, [])
    ids = ref_tok(expanded).input_ids
    [types] = ProcessorMixin.create_mm_token_type_ids(ref, [ids])
    _check(out, ids, types)
    assert out["pixel_values_videos"].shape[0] == 5 and 2 in types and 1 in types
    assert "00:00 <|image>" in expanded


def _write_mp4(path, frames: int = 3):
    import av

    with av.open(str(path), "w") as box:
        stream = box.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return str(path)


def test_video_grouping_matches_the_placeholders(proc, tmp_path):
    _image(40, 30).save(tmp_path / "a.png")
    still = str(tmp_path / "a.png")
    # Two paths to still images are the frames of ONE video: two placeholders is a clear count mismatch.
    with pytest.raises(InputError, match="2 <\\|video\\|> placeholder.*1 video.*list of frames is one video"):
        proc(text="<|video|> and <|video|>", videos=[still, still])
    one = proc(text="Watch <|video|>", videos=[still, still, still], max_soft_tokens=70)  # the frames form
    assert one["pixel_values_videos"].shape[0] == 3
    clip = _write_mp4(tmp_path / "clip.mp4")
    two = proc(text="<|video|> then <|video|>", videos=[clip, clip], max_soft_tokens=70)
    assert two["pixel_values_videos"].shape[0] == 6
    assert proc(text="<|video|>", videos=clip)["pixel_values_videos"].shape[0] == 3
    frames = [_image(30, 40, i) for i in range(2)]
    assert proc(text="<|video|><|video|>", videos=[frames, [still]])["pixel_values_videos"].shape[0] == 3
    with pytest.raises(InputError, match="mixes single frames"):
        proc(text="<|video|><|video|>", videos=[clip, still])


def test_lone_surrogate_is_an_input_error(proc):
    with pytest.raises(InputError, match="surrogate.*position 6"):
        proc(text="hello \ud800 world")
    with pytest.raises(InputError, match="surrogate"):
        proc.tokenizer.encode("\udcff")


def test_audio_longer_than_the_context_is_refused_before_any_work(ckpt, tmp_path):
    import json
    import shutil

    from mlx_gemma4.errors import ContextLengthError

    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    (path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 1000}}))
    proc = Processor.from_pretrained(path)
    assert proc.context_length == 1000
    longest = proc.audio_extractor.longest_clip(999)
    assert proc.audio_extractor.prompt_length(longest) <= 999
    out = proc(text="<|audio|>", audio=np.zeros(longest, np.float32))
    assert (out["input_ids"] == SPECIAL_IDS["audio"]).sum().item() > 900
    with pytest.raises(ContextLengthError, match=r"longest audio it can take is 39.8 s") as e:
        proc(text="<|audio|>", audio=np.zeros(longest + 16000, np.float32))
    assert "1,000" in str(e.value)
    # Several clips count together.
    with pytest.raises(ContextLengthError):
        proc(text="<|audio|> <|audio|>", audio=[np.zeros(longest // 2 + 16000, np.float32)] * 2)


def test_long_audio_file_is_refused_from_its_header(ckpt, tmp_path, monkeypatch):
    import json
    import shutil

    import soundfile as sf

    from mlx_gemma4.errors import ContextLengthError

    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    (path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 1000}}))
    proc = Processor.from_pretrained(path)
    sf.write(tmp_path / "lecture.wav", np.zeros(8000 * 90, np.int16), 8000)  # 90 s at 8 kHz

    def no_decoding(*args, **kwargs):
        raise AssertionError("the file was decoded before its length was checked")

    monkeypatch.setattr(sf, "read", no_decoding)
    with pytest.raises(ContextLengthError, match="1 min 30.0 s.*longest audio it can take is 39.8 s"):
        proc(text="<|audio|>", audio=str(tmp_path / "lecture.wav"))


def test_media_paths_and_audio_lengths_are_checked_before_any_image_is_decoded(ckpt, proc, tmp_path, monkeypatch):
    import json

    import soundfile as sf

    from mlx_gemma4.errors import ContextLengthError, MissingFileError
    from mlx_gemma4.processing import image

    _image(64, 64).save(tmp_path / "photo.png")

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded before the other inputs were checked")

    monkeypatch.setattr(image, "load_image", no_decoding)
    for kw in ({"audio": str(tmp_path / "gone.wav")}, {"videos": str(tmp_path / "gone.mp4")}):
        with pytest.raises(MissingFileError, match="gone"):
            proc(text="<|image|> <|image|> " + ("<|audio|>" if "audio" in kw else "<|video|>"),
                 images=[str(tmp_path / "photo.png")] * 2, **kw)
    limited = tmp_path / "ckpt"
    shutil.copytree(ckpt, limited)
    (limited / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 1000}}))
    sf.write(tmp_path / "lecture.wav", np.zeros(8000 * 90, np.int16), 8000)  # 90 s: too long for 1,000 tokens
    with pytest.raises(ContextLengthError, match="1 min 30.0 s"):
        Processor.from_pretrained(limited)(text="<|image|> <|audio|>", images=str(tmp_path / "photo.png"),
                                           audio=str(tmp_path / "lecture.wav"))
