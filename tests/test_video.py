"""Video loading and preprocessing.

transformers' Gemma4VideoProcessor cannot be imported here (it needs torchvision, which must not be installed),
so parity is checked piece by piece against the reference code that does import: frame sampling against
``video_utils.default_sample_indices_fn``, timestamps against ``VideoMetadata.timestamps``, the prompt text
against ``Gemma4Processor.replace_video_token``, and each frame's pixels against ``Gemma4ImageProcessorPil`` at
the video budget (the video processor applies the same resize / rescale / patchify per frame, but through
torchvision's resize, which we do not reproduce bit for bit).
"""

from __future__ import annotations

from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.errors import InputError
from mlx_gemma4.processing.video import VideoProcessor, load_video, sample_indices, video_prompt_text
from tests.helpers import check_unusable_paths, raises_naming


def _write_video(path, frames: int = 40, fps: int = 10, size=(64, 48), fmt: str | None = None,
                 codec: str = "mpeg4") -> None:
    w, h = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            pixels = np.clip(rng.integers(0, 60, (h, w, 3)) + i * 4, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    _write_video(path)
    return path


def test_sampling_matches_reference():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total, n in [(40, 32), (32, 32), (100, 32), (1000, 32), (33, 7), (5, 1)]:
        ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
        assert sample_indices(total, n) == ref.tolist()
    for total, fps, video_fps in [(300, 1.0, 30.0), (10, 0.5, 25.0), (90, 2.0, 29.97)]:
        ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
        assert sample_indices(total, None, fps=fps, video_fps=video_fps) == ref.tolist()
    # Shorter than the frame budget: the reference raises; we keep every frame.
    assert sample_indices(10, 32) == list(range(10))


def test_prompt_text_matches_replace_video_token():
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata

    fake = SimpleNamespace(boi_token="<boi>", video_token="<|video|>", eoi_token="<eoi>")
    for fps, indices in [(10.0, [0, 1, 2, 15, 37]), (29.97, [0, 900, 1850, 4000]), (None, [0, 24, 48])]:
        meta = VideoMetadata(total_num_frames=5000, fps=fps, frames_indices=indices)
        ref = Gemma4Processor.replace_video_token(fake, {"num_soft_tokens_per_video": [3], "video_metadata": [meta]}, 0)
        stamps = [i / (fps or 24) for i in indices]
        assert video_prompt_text(3, stamps, "<boi>", "<|video|>", "<eoi>") == ref


def test_decode_sample_and_preprocess(video_path):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.video_utils import VideoMetadata

    video = load_video(video_path)
    assert video.total_num_frames == 40 and video.fps == 10.0
    assert video.frame_indices == (np.arange(32) * 40 // 32).tolist()
    assert video.frames.shape == (32, 48, 64, 3) and video.frames.dtype == np.uint8
    meta = VideoMetadata(total_num_frames=40, fps=10.0, frames_indices=video.frame_indices)
    assert video.timestamps == meta.timestamps

    out = VideoProcessor()(str(video_path))
    assert out["num_frames_per_video"] == [32]
    assert out["pixel_values_videos"].shape == (32, 630, 768)
    assert out["video_position_ids"].shape == (32, 630, 2)
    assert out["timestamps"] == [meta.timestamps]
    ref = Gemma4ImageProcessorPil()([Image.fromarray(f) for f in video.frames[:3]], max_soft_tokens=70,
                                    return_tensors="np")
    assert out["num_soft_tokens_per_video"] == [ref["num_soft_tokens_per_image"][0]]
    np.testing.assert_array_equal(out["video_position_ids"][:3], ref["image_position_ids"])
    np.testing.assert_allclose(out["pixel_values_videos"][:3], ref["pixel_values"], rtol=0, atol=1e-7)
    # The kept frames are exactly the source frames at those indices (decoded here independently).
    with av.open(str(video_path)) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    np.testing.assert_array_equal(video.frames, every[video.frame_indices])


def test_frame_lists_and_batches(video_path):
    frames = [Image.new("RGB", (40, 30), (i * 10, 0, 0)) for i in range(5)]
    out = VideoProcessor(num_frames=3)([frames, str(video_path)], max_soft_tokens=140)
    assert out["num_frames_per_video"] == [3, 3]
    assert out["timestamps"][0] == [0 / 24, 1 / 24, 3 / 24]  # indices 0, 1, 3 of 5, unknown fps -> 24
    assert out["timestamps"][1] == [0.0, 1.3, 2.6]
    assert out["pixel_values_videos"].shape == (6, 140 * 9, 768)
    single = VideoProcessor()(frames)  # one video as a list of frames
    assert single["num_frames_per_video"] == [5]
    assert VideoProcessor.from_dict({"video_processor": {"num_frames": 8, "max_soft_tokens": 140}}).num_frames == 8


def test_bad_inputs(tmp_path, video_path):
    check_unusable_paths(load_video, tmp_path, ".mp4", "not a video")
    data = video_path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cut.mp4"):
        load_video(tmp_path / "cut.mp4")
    with av.open(str(tmp_path / "voice.wav"), "w") as container:  # audio only
        stream = container.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    raises_naming(load_video, tmp_path / "voice.wav", "voice.wav", "no video stream")
    with pytest.raises(InputError, match="no frames"):
        load_video([])
    with pytest.raises(InputError, match="same size"):
        load_video([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))])


@pytest.mark.parametrize("name, fmt, codec", [("clip.ts", "mpegts", "mpeg2video"), ("clip.ogv", "ogg", "libvpx"),
                                              ("clip", "mp4", "mpeg4"), ("clip.dat", "matroska", "mpeg4")])
def test_videos_are_read_by_content_not_name(tmp_path, name, fmt, codec):
    _write_video(tmp_path / name, frames=6, fps=3, fmt=fmt, codec=codec)
    out = VideoProcessor()([str(tmp_path / name)])  # a list of videos, as processor(videos=[...]) passes them
    assert out["num_frames_per_video"] == [6]
    assert out["pixel_values_videos"].shape[0] == 6


def test_a_download_cut_short_is_refused_not_read_in_part(tmp_path):
    # A web MP4 keeps its index at the front ("faststart"): cut short, it still opens and promises every frame,
    # but only the start decodes. Read in part, the model would answer about the first seconds as the whole video.
    path = tmp_path / "web.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(40):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    assert len(load_video(path, num_frames=8).frames) == 8  # whole, it reads
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 3 // 4])
    raises_naming(load_video, tmp_path / "cut.mp4", "cut.mp4", "truncated")
    with pytest.raises(InputError, match="promises 40 frames"):
        VideoProcessor()(str(tmp_path / "cut.mp4"))


def test_a_stream_that_changes_size_is_scaled_to_its_first_frame(tmp_path):
    # Two MPEG-TS clips of different sizes joined byte for byte, as a stream that changes resolution part way.
    _write_video(tmp_path / "a.ts", frames=6, size=(64, 48), fmt="mpegts", codec="mpeg2video")
    _write_video(tmp_path / "b.ts", frames=6, size=(32, 48), fmt="mpegts", codec="mpeg2video")
    joined = tmp_path / "joined.ts"
    joined.write_bytes((tmp_path / "a.ts").read_bytes() + (tmp_path / "b.ts").read_bytes())
    video = load_video(joined, num_frames=None)
    assert video.frames.shape[1:] == (48, 64, 3) and len(video.frames) > 6  # frames of both parts
    with av.open(str(tmp_path / "a.ts")) as container:
        first = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    # Frames of the first size are untouched (the join costs the first part its last frame).
    np.testing.assert_array_equal(video.frames[:5], first[:5])
    out = VideoProcessor()(str(joined))
    assert out["num_frames_per_video"] == [len(video.frames)]


def test_a_phone_video_stored_turned_is_read_upright(tmp_path, video_path):
    # A phone stores a portrait video landscape, with a display matrix in the MP4 track header saying "turn it
    # 90 degrees clockwise" (the matrix an iPhone writes); the model must see the video upright.
    import struct

    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    quarter_turn = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    data = video_path.read_bytes()
    at = data.index(identity, data.index(b"tkhd"))
    (tmp_path / "portrait.mp4").write_bytes(data[:at] + quarter_turn + data[at + 36:])
    stored, turned = load_video(video_path, num_frames=4), load_video(tmp_path / "portrait.mp4", num_frames=4)
    assert turned.frames.shape == (4, 64, 48, 3)  # (T, H, W, C): taller than wide
    np.testing.assert_array_equal(turned.frames, np.rot90(stored.frames, k=-1, axes=(1, 2)))  # clockwise


def test_animated_webp_is_a_video_of_its_frames(tmp_path):
    # FFmpeg has no decoder for animated WebP (stickers, web animations); Pillow reads its frames.
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(6, 30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((6, 30, 40)) < 0.5, 0, 255)  # some pixels fully transparent
    frames = [Image.fromarray(f) for f in rgba]
    frames[0].save(tmp_path / "sticker.webp", save_all=True, append_images=frames[1:], duration=250, lossless=True)
    video = load_video(tmp_path / "sticker.webp", num_frames=3)
    assert video.frame_indices == [0, 2, 4] and video.total_num_frames == 6
    assert video.fps == 4.0 and video.timestamps == [0.0, 0.5, 1.0]  # 250 ms a frame
    expected = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255)  # transparency on white, as images
    np.testing.assert_array_equal(video.frames, expected[[0, 2, 4]])
    out = VideoProcessor()(str(tmp_path / "sticker.webp"))
    assert out["num_frames_per_video"] == [6]
    # Its last frame's data wiped: Pillow still opens the file, then fails on that frame.
    data = bytearray((tmp_path / "sticker.webp").read_bytes())
    last = data.rindex(b"ANMF") + 60
    data[last:last + 400] = bytes(400)
    (tmp_path / "broken.webp").write_bytes(bytes(data))
    raises_naming(load_video, tmp_path / "broken.webp", "broken.webp", "truncated or corrupt")


def test_audio_only_and_frameless_files_say_so(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "voice.mp4", np.zeros(1600, np.float32), 16000, format="WAV")  # misnamed audio
    raises_naming(load_video, tmp_path / "voice.mp4", "voice.mp4", "no video stream .audio only")
    with av.open(str(tmp_path / "empty.avi"), "w") as container:  # a stream header and no frames
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(InputError, match="no frames") as e:
        load_video(tmp_path / "empty.avi")
    assert "empty.avi" in str(e.value) and "not permitted" not in str(e.value)


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_video(tmp_path / "home.mp4", frames=3)
    assert load_video("~/home.mp4").total_num_frames == 3


def test_grouping_one_video_or_several(tmp_path, video_path):
    from mlx_gemma4.processing.video import group_videos

    for i in range(3):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / f"f{i}.png")
    still = [str(tmp_path / f"f{i}.png") for i in range(3)]
    frames = [Image.new("RGB", (40, 30)) for _ in range(2)]
    arrays = np.zeros((4, 30, 40, 3), np.uint8)
    assert group_videos(str(video_path)) == [str(video_path)]
    assert group_videos(still) == [still]  # paths to still images are the frames of one video
    assert group_videos(frames) == [frames]
    assert len(group_videos([str(video_path), str(video_path)])) == 2
    assert len(group_videos([still, frames, arrays])) == 3
    assert len(group_videos(arrays)) == 1
    out = VideoProcessor()(still)
    assert out["num_frames_per_video"] == [3]
    with pytest.raises(InputError, match="mixes single frames"):
        group_videos([str(video_path), still[0]])
    with pytest.raises(InputError, match="no such file"):
        group_videos([still[0], str(tmp_path / "gone.png")])


def test_video_processor_holds_an_image_processor():
    from mlx_gemma4.processing.image import ImageProcessor

    vp = VideoProcessor.from_dict({"video_processor": {"max_soft_tokens": 140, "patch_size": 16, "num_frames": 4,
                                                       "resample": 2}})
    assert isinstance(vp.frames, ImageProcessor)
    assert (vp.max_soft_tokens, vp.frames.resample, vp.num_frames) == (140, 2, 4)
    assert VideoProcessor().frames == ImageProcessor(max_soft_tokens=70, do_normalize=True)
    for bad in ({"num_frames": 0}, {"fps": -1.0}, {"num_frames": 2.5}):
        with pytest.raises(InputError):
            VideoProcessor(**bad)
