"""app/attachments.py: pasted paths in every spelling a terminal uses, checked by content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from app.attachments import AttachmentError, check, parse_prompt


def make_png(path: Path) -> Path:
    Image.new("RGB", (8, 6), "red").save(path)
    return path


def make_wav(path: Path, seconds: float = 0.5) -> Path:
    sf.write(path, np.zeros(int(16000 * seconds), np.float32), 16000)
    return path


def make_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as box:
        stream = box.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return path


@pytest.fixture
def media(tmp_path):
    d = tmp_path / "my files"
    d.mkdir()
    return {
        "png": make_png(d / "cat photo.png"),
        "wav": make_wav(d / "voice.wav"),
        "mp4": make_mp4(d / "clip.mp4"),
        "txt": (d / "notes.txt"),
        "fake": (d / "fake.png"),
    }


@pytest.fixture(autouse=True)
def _text_files(media):
    media["txt"].write_text("hello")
    media["fake"].write_text("not really a png")


def test_quoted_escaped_and_uri_paths_several_at_once(media):
    png, wav, mp4 = media["png"], media["wav"], media["mp4"]
    escaped = str(wav).replace(" ", "\\ ")
    uri = mp4.as_uri()
    p = parse_prompt(f"describe '{png}' and {escaped} then \"{mp4}\" {uri} please")
    assert [a.kind for a in p.attachments] == ["image", "audio", "video", "video"]
    assert p.attachments[0].path == png and p.attachments[0].size == (8, 6)
    assert p.attachments[1].duration == pytest.approx(0.5)
    assert p.text == "describe and then please"
    assert p.notices == []


def test_apostrophe_in_a_single_quoted_drop(media):
    """GNOME Terminal and kitty quote a dropped "Bob's pic.png" as 'Bob'\\''s pic.png': it was cut at the apostrophe
    and reported missing."""
    bob = media["png"].parent / "Bob's pic (1).png"
    bob.write_bytes(media["png"].read_bytes())
    shell_quoted = "'" + str(bob).replace("'", "'\\''") + "'"
    p = parse_prompt(f"compare {shell_quoted} '{media['png']}' now")
    assert [a.path for a in p.attachments] == [bob, media["png"]]
    assert p.text == "compare now" and p.notices == []


def test_file_uri_with_percent_escapes(media):
    p = parse_prompt(media["png"].as_uri())
    assert "%20" in media["png"].as_uri()
    assert [a.path for a in p.attachments] == [media["png"]]
    assert p.text == ""


def test_home_expansion(media, monkeypatch):
    monkeypatch.setenv("HOME", str(media["wav"].parent))
    p = parse_prompt("~/voice.wav what is said?")
    assert [a.kind for a in p.attachments] == ["audio"]
    assert p.text == "what is said?"


def test_missing_file_and_non_media_files_give_notices(media, tmp_path):
    p = parse_prompt(f"look at {tmp_path}/nope.jpg and '{media['txt']}' and '{media['fake']}'")
    assert p.attachments == []
    assert len(p.notices) == 3
    assert "no such file" in p.notices[0]
    assert "notes.txt: not an image, audio or video file" in p.notices[1]
    assert "fake.png: not an image" in p.notices[2]
    assert "nope.jpg" in p.text  # left in the message


def test_plain_words_and_directories_are_left_alone(tmp_path):
    p = parse_prompt(f"use and/or the /tmp dir, {tmp_path} or /usr/bin/env? it's fine")
    assert p.attachments == [] and p.notices == []
    assert p.text == f"use and/or the /tmp dir, {tmp_path} or /usr/bin/env? it's fine"


def test_multiline_text_keeps_line_breaks(media):
    p = parse_prompt(f"first line\n'{media['png']}' second line")
    assert p.text == "first line\nsecond line"


def test_code_and_spacing_survive_as_typed(media):
    """Every line used to be stripped and runs of spaces collapsed, with or without a path in the message: code
    sent in a message lost its indentation, and a table its columns."""
    code = "fix this:\n\ndef f(x):\n    if x:\n\treturn  1   # two  spaces\n"
    assert parse_prompt(code).text == code.strip()
    wav = str(media["wav"]).replace(" ", "\\ ")
    p = parse_prompt(f"{code}\n'{media['png']}'\nwhat is  wrong?  {wav} thanks")
    assert [a.kind for a in p.attachments] == ["image", "audio"]
    assert p.text == code + "\nwhat is  wrong?  thanks"  # the line that held only a path is gone


def test_check_expected_kind(media):
    assert check(str(media["png"]), expect="image").kind == "image"
    with pytest.raises(AttachmentError, match="is audio, not an image; attach it with /audio PATH"):
        check(media["wav"], expect="image")
    with pytest.raises(AttachmentError, match="no such file"):
        check("/definitely/not/here.png")


def test_unreadable_file(media, monkeypatch):
    import os
    import pathlib

    target = media["png"]
    if os.geteuid() == 0:
        # Root reads every file whatever its mode, so make opening this one fail as it would for a user.
        real_open = pathlib.Path.open

        def deny(self, *args, **kwargs):
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "open", deny)
    else:
        target.chmod(0)
    with pytest.raises(AttachmentError, match="cannot be read .Permission denied"):
        check(target)
    p = parse_prompt(f"look '{target}'")
    assert p.attachments == [] and "cannot be read" in p.notices[0]


def test_truncated_image_gets_a_notice(media):
    data = media["png"].read_bytes()
    broken = media["png"].with_name("broken.png")
    broken.write_bytes(data[:20])
    p = parse_prompt(f"'{broken}'")
    assert p.attachments == []
    assert p.notices and "broken.png" in p.notices[0]


def test_an_image_cut_after_its_header_or_a_clip_too_short_is_refused_when_attached(tmp_path):
    """A JPEG cut half way (its header whole) and a 10-sample WAV attached fine and failed only once sent, naming
    the app's copy of the file ("…/attachments/17/c08947b6-trunc.jpg") or "Audio clip 0"."""
    whole = tmp_path / "whole.jpg"
    Image.new("RGB", (400, 300), "red").save(whole)
    cut = tmp_path / "trunc.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(AttachmentError, match=r"^trunc\.jpg: the image data is truncated or corrupt"):
        check(cut)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(10, np.float32), 16000)
    with pytest.raises(AttachmentError, match=r"^short\.wav: the clip is 0\.62 ms long, too short"):
        check(short)
    sf.write(short, np.zeros(320, np.float32), 16000)   # one analysis window: enough
    assert check(short).kind == "audio" and check(whole).size == (400, 300)


def test_huge_image_is_a_notice_and_the_message_is_kept(bomb_png):
    with pytest.raises(AttachmentError, match="huge.png: the image is too large"):
        check(bomb_png)
    with pytest.raises(AttachmentError, match="too large"):
        check(str(bomb_png), expect="image")
    p = parse_prompt(f"what is in {bomb_png} please")
    assert p.attachments == []
    assert len(p.notices) == 1 and "too large" in p.notices[0]
    assert p.text == f"what is in {bomb_png} please"


def test_any_pillow_failure_while_sniffing_is_not_a_crash(media, monkeypatch):
    from PIL import PngImagePlugin

    def broken(self):
        raise IndexError("a plugin bug")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", broken)
    p = parse_prompt(f"look '{media['png']}'")
    assert p.attachments == [] and "cat photo.png: not an image" in p.notices[0]


def test_names_the_os_refuses_are_no_such_file():
    long_name = "/" + "a" * 5000 + ".png"
    p = parse_prompt(f"see {long_name} and /tmp/x\x00y.png")
    assert p.attachments == [] and len(p.notices) == 2 and all("no such file" in n for n in p.notices)
    with pytest.raises(AttachmentError, match="no such file"):
        check(long_name)


def test_portrait_photo_size_is_as_displayed(tmp_path):
    stored = Image.new("RGB", (8, 4), "white")
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    stored.save(tmp_path / "portrait.jpg", exif=exif)
    assert check(tmp_path / "portrait.jpg").size == (4, 8)


def test_portrait_video_size_is_as_displayed(tmp_path):
    # Stored 64x48 with the display matrix a phone writes for a portrait video (turn 90 degrees clockwise).
    import struct

    import av

    with av.open(str(tmp_path / "stored.mp4"), "w") as box:
        stream = box.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")),
                       *stream.encode()]:
            box.mux(packet)
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    data = (tmp_path / "stored.mp4").read_bytes()
    at = data.index(identity, data.index(b"tkhd"))
    turned = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    (tmp_path / "portrait.mp4").write_bytes(data[:at] + turned + data[at + 36:])
    assert check(tmp_path / "stored.mp4").size == (64, 48)
    assert check(tmp_path / "portrait.mp4").size == (48, 64)


def test_an_attachment_gone_since_it_was_sent_asks_for_it_again(tmp_path):
    """The processor says only "no such file"; the app says what to do in its own terms."""
    from app.backend import Backend
    from app.events import GenerationFailed
    from mlx_gemma4.processing.files import media_path

    class Session:
        context_limit = context_used = last_reused = 0
        enable_thinking = False

        def stream(self, messages, **kw):
            media_path(messages[-1]["content"][0]["image"], "image")
            yield from ()

    posted: list = []
    backend = Backend("fake", lambda progress: (None, None), session_factory=lambda *a: Session())
    try:
        backend.load(posted.append).result()
        gone = tmp_path / "cat.png"
        backend.generate(posted.append, 1, 1, [{"role": "user", "content": [
            {"type": "image", "image": str(gone)}, {"type": "text", "text": "what is it?"}]}]).result()
    finally:
        backend.shutdown()
    [failed] = [m for m in posted if isinstance(m, GenerationFailed)]
    assert failed.error == f"InputError: {gone}: no such file. Check the path (drag the file in again, or quote " \
                           "spaces)."


def test_empty_files_say_they_are_empty(tmp_path):
    """A 0-byte file and a valid audio file with no samples are named as empty, not as an unknown kind."""
    empty = tmp_path / "clip.wav"
    empty.write_bytes(b"")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(0, np.float32), 16_000)
    with pytest.raises(AttachmentError, match=r"clip.wav: the file is empty \(0 bytes\)"):
        check(str(empty))
    with pytest.raises(AttachmentError, match=r"silent.wav: the audio file holds no sound \(0 samples\)"):
        check(str(silent))
    p = parse_prompt(f"hear '{silent}' please")
    assert p.attachments == [] and "no sound" in p.notices[0] and str(silent) in p.text


def test_a_path_ending_a_sentence_is_attached_and_its_punctuation_stays(media, tmp_path, monkeypatch):
    """'what is in ~/dog.jpg?' sent the path as text without a word: the word with its '?' is no file."""
    monkeypatch.setenv("HOME", str(media["png"].parent))
    p = parse_prompt("what is in ~/cat\\ photo.png?")
    assert [a.path for a in p.attachments] == [media["png"]] and p.text == "what is in?"
    p = parse_prompt(f"compare {media['wav']}, and this.")
    assert [a.path for a in p.attachments] == [media["wav"]] and p.text == "compare, and this."
    p = parse_prompt(f"what about {tmp_path}/gone.jpg?")
    assert p.attachments == [] and p.notices == [f"{tmp_path}/gone.jpg: no such file, left in the message"]


def test_a_path_with_spaces_pasted_unquoted_is_attached(media):
    """macOS's 'Copy as Pathname' gives '/Users/me/voice memo.wav', unquoted: it was split at the spaces and sent
    as text, without a notice."""
    png = str(media["png"])   # .../my files/cat photo.png: two spaces
    for text, rest in ((png, ""), (f"describe {png} please", "describe please"), (f"{png}.", "."),
                       (f"look:\n{png}\nthanks", "look:\nthanks")):
        p = parse_prompt(text)
        assert [a.path for a in p.attachments] == [media["png"]] and p.text == rest, text
    p = parse_prompt(f"{media['png'].parent}/cat\nphoto.png")   # not across lines
    assert p.attachments == []


def test_guessed_paths_attach_only_media(tmp_path):
    """The guesses (punctuation off, words joined) take only names with a media extension: 'or /usr/bin/env?' is
    no attachment and no notice."""
    (tmp_path / "read me.txt").write_text("x")
    p = parse_prompt(f"see {tmp_path}/read me.txt, or /usr/bin/env?")
    assert p.attachments == [] and p.notices == []


@pytest.mark.parametrize("thumbnails", [True, False])
def test_a_few_chips_share_the_width_and_show_their_whole_labels(tmp_path, thumbnails):
    """Two files on a message at 80 columns were laid out in three columns: their labels were cut
    ('cat photo.png · 64x…') beside an empty third."""
    import asyncio

    from textual.app import App

    from app.widgets.chips import AttachmentChip, AttachmentChips

    chips = [("image", tmp_path / "cat photo.png", "cat photo.png · 640x480"),
             ("audio", tmp_path / "voice memo.wav", "voice memo.wav · 12.5s")]
    make_png(chips[0][1])
    make_wav(chips[1][1])

    class One(App):
        def compose(self):
            yield AttachmentChips(chips, thumbnails=thumbnails)

    async def go():
        app = One()
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.pause()
            row = app.query_one(AttachmentChips)
            assert row.styles.grid_size_columns == 2
            for chip in app.query(AttachmentChip):
                label = chip.query_one("Label")
                assert label.size.width >= len(str(label.render())) >= len(chip.label) + 2, chip.label
            row.show(chips[:1])
            await pilot.pause()
            await pilot.pause()
            assert row.styles.grid_size_columns == 1

    asyncio.run(go())


def test_an_animated_gif_named_with_slash_video_is_a_video(tmp_path):
    """`/video anim.gif` said 'is an image, not a video' though the model reads an animation's frames as one."""
    frames = [Image.new("RGB", (24, 16), c) for c in ("red", "green", "blue")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    att = check(str(gif), expect="video")
    assert (att.kind, att.size) == ("video", (24, 16))
    assert check(str(gif)).kind == "image"   # pasted or attached without a kind: the picture
    still = tmp_path / "still.gif"
    frames[0].save(still)
    with pytest.raises(AttachmentError, match="is an image, not a video"):
        check(str(still), expect="video")
