"""Ctrl+R in the app, with a fake input stream at the sounddevice boundary (and with no microphone at all)."""

from __future__ import annotations

import asyncio

import soundfile as sf

from app.recorder import Recorder, RecorderError
from app.widgets.messages import Notice
from app.widgets.meter import LevelMeter
from tests.app_helpers import FakeStream, make_app, send, sine
from tests.app_helpers import until as wait_for


def test_record_meter_and_attach(tmp_path):
    streams = []

    def factory(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    async def go():
        app = make_app(tmp_path)
        app.recorder = Recorder(tmp_path / "rec", stream_factory=factory)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            chat = app.chat_screen
            await pilot.press("ctrl+r")
            meter = chat.query_one(LevelMeter)
            assert chat.recording and meter.display
            streams[0].feed(sine(1.5, amp=0.5))
            await wait_for(pilot, lambda: meter.level > 0.8 and meter.elapsed == 1.5)
            assert "REC  1.5/30s" in str(meter.render())
            await pilot.press("ctrl+r")
            assert not chat.recording and not meter.display and streams[0].closed
            [clip] = chat.pending
            assert clip.kind == "audio" and clip.duration == 1.5
            data, sr = sf.read(clip.path)
            assert sr == 16000 and len(data) == 24000
            await send(pilot, "what did I say?")
            await wait_for(pilot, lambda: app.sessions[0].calls)
            content = app.sessions[0].calls[0]["messages"][-1]["content"]
            [saved] = app.history.messages(chat.conversation_id)[0].attachments  # the model gets the saved copy
            assert saved.name == clip.path.name and [p["audio"] for p in content if p["type"] == "audio"] == [
                str(saved.path)]

    asyncio.run(go())


def test_no_microphone_keeps_the_app_working(tmp_path):
    def no_device(**kw):
        raise RecorderError("Recording needs the PortAudio library, which was not found.")

    async def go():
        app = make_app(tmp_path)
        app.recorder = Recorder(tmp_path / "rec", stream_factory=no_device)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            for _ in range(3):   # a toast each time: pressed again and again, notices piled up in the conversation
                await pilot.press("ctrl+r")
                await wait_for(pilot, lambda: app.notes and "PortAudio" in app.notes[-1])
                app.notes.clear()
            assert not app.chat_screen.recording and not app.chat_screen.query(Notice)
            await send(pilot, "still here?")
            await wait_for(pilot, lambda: app.sessions[0].calls)

    asyncio.run(go())


def test_a_recording_that_cannot_be_saved_is_a_notice(tmp_path):
    streams = []

    def factory(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    class Unsaveable(Recorder):
        def _save(self, audio, folder):
            raise OSError(28, "No space left on device")

    async def go():
        app = make_app(tmp_path)
        app.recorder = Unsaveable(tmp_path / "rec", stream_factory=factory)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            chat = app.chat_screen
            await pilot.press("ctrl+r")
            streams[0].feed(sine(0.5))
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: any("could not be saved" in str(n.render()) for n in chat.query(Notice)))
            assert app.is_running and not chat.recording and not chat.pending
            await send(pilot, "still here?")
            await wait_for(pilot, lambda: app.sessions[0].calls)

    asyncio.run(go())
