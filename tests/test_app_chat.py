"""The chat app driven with Pilot, over a scripted session that speaks ChatSession's interface.

These check the UI's own logic (streaming, cancel, attachments, commands, history); test_app_real.py runs
the same app on the real backend with a tiny random model.
"""

from __future__ import annotations

import asyncio
import html
import re
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from textual import events

from app.app import ChatApp
from app.backend import Backend
from app.history import History
from app.widgets.messages import ModelMessage, Notice, UserMessage
from app.widgets.prompt import PromptArea
from tests.app_helpers import make_app, record_notes, send, user_turn
from tests.app_helpers import until as wait_for


def test_send_streams_and_saves(tmp_path):
    asyncio.run(_send_streams_and_saves(tmp_path))


async def _send_streams_and_saves(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "hi there")
        chat = app.chat_screen
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        msg = chat.query_one(ModelMessage)
        assert msg.answer == "Hello **there** friend"
        assert chat.query_one(UserMessage).text == "hi there"
        await wait_for(pilot, lambda: "ctx" in str(chat.query_one("#status").render()))
    h = History(tmp_path / "data")
    [conv] = h.conversations()
    assert [(m.role, m.content) for m in h.messages(conv.id)] == [("user", "hi there"),
                                                                  ("assistant", "Hello **there** friend")]


def screen_text(app) -> str:
    """What the screen shows, as plain text."""
    svg = app.export_screenshot()
    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


def test_answers_show_angle_brackets_as_written(tmp_path):
    asyncio.run(_answers_show_angle_brackets_as_written(tmp_path))


async def _answers_show_angle_brackets_as_written(tmp_path):
    """A model's text is not HTML: generics, tags and comparisons show as the model wrote them (Markdown's HTML
    took them for tags and dropped them)."""
    app = make_app(tmp_path, reply="Use List<String> names, a <div> tag; x<y and y>z.")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "hi")
        chat = app.chat_screen
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        await pilot.pause()
        assert "Use List<String> names, a <div> tag; x<y and y>z." in screen_text(app)


def test_a_new_message_brings_the_scrolled_up_chat_back_down_and_typing_there_goes_to_the_prompt(tmp_path):
    asyncio.run(_new_message_follows(tmp_path))


async def _new_message_follows(tmp_path):
    app = make_app(tmp_path, reply=" ".join(f"word{i}" for i in range(60)))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        for i in range(3):   # a conversation taller than the screen
            await send(pilot, f"message {i}")
            await wait_for(pilot, lambda: not chat.generating)
        transcript, prompt = chat.transcript, chat.prompt
        await pilot.press("tab")                     # the conversation, to scroll it with the keys
        assert app.focused is transcript
        await pilot.press("pageup", "pageup")
        await pilot.pause()
        assert transcript.scroll_y < transcript.max_scroll_y
        await pilot.press("w", "h", "y")             # typing there goes on in the prompt
        assert app.focused is prompt and prompt.text == "why"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not chat.generating)
        await pilot.pause()
        assert chat.query(ModelMessage).last().answer.endswith("word59")
        assert transcript.scroll_y == transcript.max_scroll_y > 0   # back down, following the new answer


def test_a_mistyped_command_is_not_sent_and_two_slashes_send_text(tmp_path):
    asyncio.run(_mistyped_command(tmp_path))


async def _mistyped_command(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, "/sytem be terse")
        await pilot.pause()
        assert any("no command /sytem" in n and "/help" in n for n in app.notes)
        assert chat.prompt.text == "/sytem be terse" and not chat.query(UserMessage)   # kept, to be corrected
        await send(pilot, "//sytem is a typo")
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        assert chat.query_one(UserMessage).text == "/sytem is a typo"
        assert app.sessions[0].calls[-1]["messages"][-1]["content"] == "/sytem is a typo"


def test_media_the_model_cannot_take_is_refused_when_attached(tmp_path):
    asyncio.run(_media_refused_when_attached(tmp_path))


async def _media_refused_when_attached(tmp_path):
    """A text-only model: an image was attached without a word and refused only once the message was sent."""
    import mlx.nn as nn

    img = png(tmp_path / "photo.png")
    app = make_app(tmp_path, load=lambda progress: (nn.Module(), None))   # a model with no towers
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        chat.prompt.post_message(events.Paste(f"'{img}' what is this"))
        await wait_for(pilot, lambda: "what is this" in chat.prompt.text)
        assert not chat.pending
        assert any("photo.png was not attached" in n and "no vision tower" in n for n in app.notes)
        await send(pilot, f"/image {img}")
        await pilot.pause()
        assert not chat.pending and chat.prompt.text == f"/image {img}"   # kept, as a command that failed


def notes(app) -> list[str]:
    """The toasts shown so far (make_app records every notify call)."""
    return list(app.notes)


def run(coro_fn):
    """Each test is a coroutine over Pilot; no asyncio plugin needed."""
    return lambda tmp_path: asyncio.run(coro_fn(tmp_path))


async def ready(app):
    pilot_ctx = app.run_test(size=(100, 40))
    pilot = await pilot_ctx.__aenter__()
    await wait_for(pilot, lambda: app.backend.loaded)
    return pilot_ctx, pilot


def png(path: Path) -> Path:
    Image.new("RGB", (8, 8), "blue").save(path)
    return path


async def _cancel_keeps_partial_answer(tmp_path):
    app = make_app(tmp_path, reply=" ".join(f"w{i}" for i in range(200)), delay=0.01)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "tell me a long story")
        chat = app.chat_screen
        await wait_for(pilot, lambda: chat.current is not None and chat.current.answer.count("w") >= 3)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not chat.generating)
        msg = chat.query_one(ModelMessage)
        assert msg.answer.startswith("w0 w1 w2") and "w199" not in msg.answer
        assert msg.note == "stopped"
        saved = app.history.messages(chat.conversation_id)
        assert saved[-1].content == msg.answer and saved[-1].stats["finish"] == "cancelled"


test_cancel_keeps_partial_answer = run(_cancel_keeps_partial_answer)


async def _pasted_paths_become_attachments(tmp_path):
    d = tmp_path / "pics dir"
    d.mkdir()
    a, b = png(d / "a b.png"), png(d / "c.png")
    (d / "notes.txt").write_text("text")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        prompt = app.chat_screen.query_one(PromptArea)
        prompt.focus()
        escaped = str(b).replace(" ", "\\ ")
        gone = str(d / "gone.jpg").replace(" ", "\\ ")
        app.chat_screen.post_message(PromptArea.Pasted(prompt, f"'{a}' {escaped} '{d / 'notes.txt'}' {gone}"))
        await wait_for(pilot, lambda: len(app.chat_screen.pending) == 2 and len(notes(app)) >= 2)
        assert [x.path for x in app.chat_screen.pending] == [a, b]
        assert "notes.txt" in prompt.text and "gone.jpg" in prompt.text
        assert len(notes(app)) >= 2
        prompt.text = f"what are these? {b.as_uri()}"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.chat_screen.generating and app.chat_screen.query(ModelMessage))
        saved = app.history.messages(app.chat_screen.conversation_id)[0]
        assert [x.name for x in saved.attachments] == ["a b.png", "c.png"]  # c.png pasted, then typed: sent once
        shown = [str(w.render()) for w in app.chat_screen.query(Notice)]
        assert any("c.png is already attached; it goes with the message once." in t for t in shown), shown
        # The model is handed the history's copies of the files.
        assert user_turn(app.sessions[0].calls[0]) == ("what are these?", [str(x.path) for x in saved.attachments])


test_pasted_paths_become_attachments = run(_pasted_paths_become_attachments)


async def _the_same_file_twice_is_attached_once(tmp_path):
    img = png(tmp_path / "cat.png")
    (tmp_path / "link.png").symlink_to(img)
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        prompt = chat.query_one(PromptArea)
        chat.post_message(PromptArea.Pasted(prompt, f"{img} {img.as_uri()}"))
        await wait_for(pilot, lambda: chat.pending and notes(app))
        await send(pilot, f"/image {tmp_path / 'link.png'}")  # the same file through a link
        await wait_for(pilot, lambda: len(notes(app)) == 2)
        assert [a.path for a in chat.pending] == [img]
        assert notes(app) == [f"{name} is already attached; it goes with the message once."
                              for name in ("cat.png", "link.png")]
        await send(pilot, f"what is it? {img} '{img}'")
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        [saved] = [m for m in app.history.messages(chat.conversation_id) if m.role == "user"]
        assert len(saved.attachments) == 1 and user_turn(app.sessions[0].calls[0])[0] == "what is it?"
        shown = [str(w.render()) for w in chat.query(Notice)]
        assert sum("cat.png is already attached" in t for t in shown) == 2, shown


test_the_same_file_twice_is_attached_once = run(_the_same_file_twice_is_attached_once)


async def _keys_typed_right_after_a_paste_land_after_it(tmp_path):
    """The paste is read on the screen (dragged files are checked) while keys already queued went straight into
    the prompt: text typed right after a drag landed before the pasted text."""
    img = png(tmp_path / "drag me.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        chat.prompt.post_message(events.Paste(f"'{img}' what is this"))
        for ch in "?!":
            chat.prompt.post_message(events.Key(ch if ch.isalnum() else {"?": "question_mark",
                                                                           "!": "exclamation_mark"}[ch], ch))
        await wait_for(pilot, lambda: "!" in chat.prompt.text and "this" in chat.prompt.text)
        assert chat.prompt.text == "what is this?!" and [a.path for a in chat.pending] == [img]


test_keys_typed_right_after_a_paste_land_after_it = run(_keys_typed_right_after_a_paste_land_after_it)


async def _slash_commands_and_bad_files(tmp_path):
    img = png(tmp_path / "my pic.png")
    (tmp_path / "fake.wav").write_text("not audio")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, f"/image '{img}'")
        assert [a.path for a in chat.pending] == [img] and chat.prompt.text == ""
        await send(pilot, f"/audio {tmp_path}/fake.wav")
        await send(pilot, f"/audio {img}")
        messages = [m for m in notes(app)]
        assert any("fake.wav: not an image, audio or video file" in m for m in messages)
        assert any("is an image, not audio" in m for m in messages)
        assert len(chat.pending) == 1
        # A command that failed stays in the prompt, to be corrected rather than typed again.
        assert chat.prompt.text == f"/audio {img}"
        await send(pilot, "/video")
        assert chat.prompt.text == "/video" and "Usage: /video PATH" in notes(app)[-1]
        chat.prompt.clear()
        await pilot.press("backspace")  # on an empty prompt: drops the last pending file, saying so
        assert chat.pending == [] and notes(app)[-1] == "Removed my pic.png from the message."


test_slash_commands_and_bad_files = run(_slash_commands_and_bad_files)


async def _words_after_a_command_stay_in_the_prompt(tmp_path):
    """`/image PATH what is this?` attached the file and dropped the question, `/new what is ...` dropped it
    too, and `/system` with its text on the next line was sent to the model as a message."""
    img = png(tmp_path / "my pic.png")
    plain = png(tmp_path / "cat.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, f"/image {plain} what is this?")
        assert [a.path for a in chat.pending] == [plain] and chat.prompt.text == "what is this?"
        chat.prompt.clear()
        await send(pilot, f"/image '{img}' and this one")
        assert [a.path for a in chat.pending] == [plain, img] and chat.prompt.text == "and this one"
        chat.prompt.clear()
        await send(pilot, f"/image {img}")   # a path with a space, unquoted: the whole argument, as before
        assert len(chat.pending) == 2 and chat.prompt.text == ""   # (the same file: once)
        await send(pilot, f"/image {img} what about it?")   # ... and words after it (they were dropped)
        assert len(chat.pending) == 2 and chat.prompt.text == "what about it?"
        chat.prompt.clear()
        await send(pilot, "/new what is the capital of France?")
        assert chat.conversation_id is None and chat.prompt.text == "what is the capital of France?"
        chat.prompt.text = "/system\nBe brief."
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.backend.settings.system_prompt == "Be brief.")
        assert not app.history.conversations()   # nothing was sent to the model
        chat.prompt.text = "/"
        await pilot.press("enter")
        await pilot.pause()
        assert chat.prompt.text == "/" and "There is no command /" in notes(app)[-1]


test_words_after_a_command_stay_in_the_prompt = run(_words_after_a_command_stay_in_the_prompt)


async def _thinking_toggle_regenerate_copy(tmp_path):
    app = make_app(tmp_path, reply="Here:\n```py\nprint(1)\n```")
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: app.backend.settings.enable_thinking)
        await wait_for(pilot, lambda: "thinking on" in str(chat.query_one("#status").render()))
        await send(pilot, "code please")
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        assert app.sessions[0].calls[0]["thinking"] is True
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.sessions[0].calls) == 2 and not chat.generating
                       and len(chat.query(ModelMessage)) == 1)
        assert [m.role for m in app.history.messages(chat.conversation_id)] == ["user", "assistant"]
        await pilot.press("ctrl+b")
        assert app.clipboard == "print(1)"
        await pilot.press("f3")
        assert app.clipboard.startswith("Here:")


test_thinking_toggle_regenerate_copy = run(_thinking_toggle_regenerate_copy)


async def _resume_after_restart(tmp_path):
    app = make_app(tmp_path, reply="first answer")
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "first question")
        await wait_for(pilot, lambda: not app.chat_screen.generating and app.chat_screen.query(ModelMessage))
    app2 = make_app(tmp_path, reply="second answer", resume=True)
    async with app2.run_test() as pilot:
        chat = app2.chat_screen
        await wait_for(pilot, lambda: app2.backend.loaded and chat.query(UserMessage))
        assert [m.text for m in chat.query(UserMessage)] == ["first question"]
        await send(pilot, "and then?")
        await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 2)
        assert app2.sessions[-1].calls[0]["messages"] == [{"role": "user", "content": "first question"},
                                                          {"role": "assistant", "content": "first answer"},
                                                          {"role": "user", "content": "and then?"}]
        assert len(app2.history.conversations()) == 1
        assert len(app2.history.messages(chat.conversation_id)) == 4


test_resume_after_restart = run(_resume_after_restart)


async def _corrupt_history_and_failed_load(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "history.db").write_bytes(b"garbage" * 1000)

    def broken(progress):
        raise FileNotFoundError("models/nope/config.json not found")

    app = record_notes(ChatApp(Backend("nope", broken), History(tmp_path / "data")))
    async with app.run_test() as pilot:
        def notices() -> list[str]:
            return [str(n.render()) for n in app.chat_screen.query(Notice)]

        await wait_for(pilot, lambda: any("could not be loaded" in n for n in notices()))
        assert any("could not be read" in n and "kept as" in n for n in notices())
        assert any("could not be loaded" in n and "config.json not found" in n for n in notices())
        await send(pilot, "hello?")
        await wait_for(pilot, lambda: any("No model is loaded" in m for m in notes(app)))
    assert list((tmp_path / "data").glob("history.corrupt-*.db"))


test_corrupt_history_and_failed_load = run(_corrupt_history_and_failed_load)


async def _help_settings_palette(tmp_path):
    from app.screens.help import HelpScreen
    from app.screens.settings import SettingsScreen

    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("f2")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature").value = "0.3"
        app.screen.query_one("#top_k").value = "5"
        await pilot.press("ctrl+s")
        assert app.backend.settings.temperature == 0.3 and app.backend.settings.top_k == 5
        await send(pilot, "x")
        await wait_for(pilot, lambda: app.sessions[0].calls)
        assert app.sessions[0].calls[0]["temperature"] == 0.3
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Toggle thinking", "Regenerate", "Copy last answer", "Settings", "Help"} <= set(titles)


test_help_settings_palette = run(_help_settings_palette)


async def _box_answers_are_drawn(tmp_path):
    img = png(tmp_path / "scene.png")
    app = make_app(tmp_path, reply='```json\n[{"box_2d": [100, 100, 500, 600], "label": "thing"}]\n```')
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, f"find the thing {img}")
        await wait_for(pilot, lambda: any("Boxes drawn" in str(n.render()) for n in app.chat_screen.query(Notice)))
        [out] = (tmp_path / "data" / "attachments").glob("*/annotated/*scene-boxes-*.png")
        assert Image.open(out).size == (8, 8)


test_box_answers_are_drawn = run(_box_answers_are_drawn)


async def _file_picker_attaches_the_chosen_file(tmp_path):
    from textual.widgets import DirectoryTree

    from app.screens.file_picker import FilePickerScreen

    img = png(tmp_path / "b photo.png")
    (tmp_path / "a.txt").write_text("not media")
    (tmp_path / ".hidden.png").write_bytes(img.read_bytes())
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await pilot.press("escape", "ctrl+o")  # Esc on an idle chat does nothing
        assert isinstance(app.screen, FilePickerScreen)
        tree = app.screen.query_one(DirectoryTree)
        await wait_for(pilot, lambda: tree.root.children)
        names = [n.data.path.name for n in tree.root.children]
        assert names == ["data", "b photo.png"]  # directories first; no text or hidden files
        await pilot.press("down", "down")
        assert tree.cursor_node.data.path == img
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.pending)
        assert app.screen is chat and [(a.kind, a.path) for a in chat.pending] == [("image", img)]
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, FilePickerScreen)
        await pilot.press("escape")
        assert app.screen is chat and len(chat.pending) == 1
        await send(pilot, "what is this?")
        await wait_for(pilot, lambda: app.sessions[0].calls)
        [saved] = app.history.messages(chat.conversation_id)[0].attachments
        assert saved.name == img.name and user_turn(app.sessions[0].calls[0])[1] == [str(saved.path)]


def test_file_picker_attaches_the_chosen_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the picker opens in the home folder
    asyncio.run(_file_picker_attaches_the_chosen_file(tmp_path))


async def _delete_open_conversation_then_send(tmp_path):
    from app.screens.conversations import ConversationsScreen

    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, "hi")
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, ConversationsScreen)
        await pilot.press("d", "y", "escape")  # delete, confirm, close the list
        await wait_for(pilot, lambda: chat.conversation_id is None and not chat.query(UserMessage))
        await send(pilot, "again")  # crashed with FOREIGN KEY constraint failed
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        [conv] = app.history.conversations()
        assert [m.content for m in app.history.messages(conv.id)] == ["again", "Hello **there** friend"]


test_delete_open_conversation_then_send = run(_delete_open_conversation_then_send)


async def _leaving_mid_answer_drops_its_events(tmp_path):
    gate = threading.Semaphore(0)
    app = make_app(tmp_path, reply="one two three four five six", gate=gate)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, "first")
        first = chat.conversation_id
        gate.release()  # one word streams in, then the answer waits
        await wait_for(pilot, lambda: chat.current is not None and chat.current.answer)
        await pilot.press("ctrl+n")  # leave mid-answer
        assert chat.conversation_id is None and not chat.query(ModelMessage)
        for _ in range(10):
            gate.release()
        await send(pilot, "second")
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        # Only the new conversation is on screen; the old one kept its partial answer, marked as stopped.
        assert [m.text for m in chat.query(UserMessage)] == ["second"]
        assert [m.answer for m in chat.query(ModelMessage)] == ["one two three four five six"]
        old = app.history.messages(first)
        assert [m.role for m in old] == ["user", "assistant"] and old[1].stats["finish"] == "cancelled"
        assert old[1].content.startswith("one") and "six" not in old[1].content
        # Switching back through history shows it from the store.
        app.resume(first)
        await pilot.pause()
        assert [m.answer for m in chat.query(ModelMessage)] == [old[1].content]
        assert chat.query_one(ModelMessage).note == "stopped"


test_leaving_mid_answer_drops_its_events = run(_leaving_mid_answer_drops_its_events)


async def _first_word_before_the_widget_is_built(tmp_path):
    # A zero-latency session: events can reach the answer widget before it is composed.
    app = make_app(tmp_path, reply=" ".join(f"w{i}" for i in range(50)))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        for i in range(3):
            await send(pilot, f"go {i}")
            await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == i + 1)
        assert all(m.answer.endswith("w49") for m in chat.query(ModelMessage))


test_first_word_before_the_widget_is_built = run(_first_word_before_the_widget_is_built)


def test_quit_mid_answer_stops_the_model_thread(tmp_path):
    gate = threading.Semaphore(0)
    app = make_app(tmp_path, reply="never ending story", gate=gate)

    async def go():
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "talk")
            await wait_for(pilot, lambda: app.backend.busy)
            await pilot.press("ctrl+q")

    asyncio.run(go())
    assert not app.backend.thread_alive  # joined before exit, not left running into interpreter shutdown


async def _first_word_of_talk(pilot, gate: threading.Semaphore) -> None:
    """Once the model has loaded, send "talk" and let the (gated) answer "once upon a time" show its first word."""
    app = pilot.app
    await wait_for(pilot, lambda: app.backend.loaded)
    await send(pilot, "talk")
    gate.release(1)
    await wait_for(pilot, lambda: app.chat_screen.current and app.chat_screen.current.answer == "once")


@pytest.mark.parametrize("how", ["ctrl+q", "SIGTERM", "SIGHUP"])
def test_quit_mid_answer_keeps_the_answer_so_far(tmp_path, how):
    """Ctrl+Q while the model writes: what was on screen is saved as a stopped answer, so the conversation does
    not end on an unanswered message when it is resumed. Closing the terminal window (SIGHUP) or `kill` (SIGTERM)
    ended the process at once (the answer lost, the terminal left in the app's modes): they quit as Ctrl+Q does."""
    import os
    import signal

    gate = threading.Semaphore(0)
    app = make_app(tmp_path, reply="once upon a time", gate=gate)

    async def go():
        async with app.run_test() as pilot:
            await _first_word_of_talk(pilot, gate)
            if how == "ctrl+q":
                await pilot.press("ctrl+q")
            else:
                os.kill(os.getpid(), getattr(signal, how))
                await wait_for(pilot, lambda: not app.is_running)

    asyncio.run(go())
    assert not app.backend.thread_alive
    history = History(tmp_path / "data")
    saved = history.messages(history.latest().id)
    assert [(m.role, m.content) for m in saved] == [("user", "talk"), ("assistant", "once")]
    assert saved[1].stats["finish"] == "cancelled"
    # ... with the stats it had so far (they were saved zeroed: the status bar was already gone)
    assert (saved[1].stats["prompt_tokens"], saved[1].stats["generation_tokens"]) == (7, 1)
    assert saved[1].stats["ttft"] > 0


async def _message_typed_while_loading_is_sent_when_ready(tmp_path):
    loading = threading.Event()

    def slow_load(progress):
        loading.wait()
        return None, None

    app = make_app(tmp_path, load=slow_load)
    async with app.run_test() as pilot:
        chat = app.chat_screen
        await send(pilot, "are you there?")
        assert not app.backend.loaded and chat.generating
        assert [m.text for m in chat.query(UserMessage)] == ["are you there?"]
        loading.set()
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        assert chat.query_one(ModelMessage).answer == "Hello **there** friend"
        assert not [n for n in notes(app) if "No model" in n]


test_message_typed_while_loading_is_sent_when_ready = run(_message_typed_while_loading_is_sent_when_ready)


async def _failed_send_restores_text_cursor_and_attachments(tmp_path):
    img, typed_img = png(tmp_path / "chip.png"), png(tmp_path / "typed.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen

        def broken(messages, **kw):
            raise RuntimeError("the model fell over")

        app.sessions[0].stream = broken
        await send(pilot, f"/image {img}")
        typed = f"describe {typed_img} please {tmp_path / 'gone.png'}"
        await send(pilot, typed)
        await wait_for(pilot, lambda: any("fell over" in str(n.render()) for n in chat.query(Notice)))
        assert chat.prompt.text == typed and chat.prompt.cursor_location == chat.prompt.document.end
        assert [a.path for a in chat.pending] == [img]  # the chip comes back; the typed path is in the text
        assert app.history.messages(chat.conversation_id) == [] and not chat.query(UserMessage)
        assert not chat.query(ModelMessage)
        # What the app said about the message's files stays on screen with the failure (it used to be wiped).
        said = [str(n.render()) for n in chat.query(Notice)]
        assert len(said) == 2 and "gone.png: no such file" in said[0] and "fell over" in said[1]
        assert not list((tmp_path / "data" / "attachments").rglob("*.png"))  # no orphaned copies


test_failed_send_restores_text_cursor_and_attachments = run(_failed_send_restores_text_cursor_and_attachments)


async def _resumed_chips_keep_size_and_thumbnail(tmp_path):
    from app.widgets.chips import AttachmentChip

    img = png(tmp_path / "pic.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, f"look {img}")
        await wait_for(pilot, lambda: not app.chat_screen.generating and app.chat_screen.query(ModelMessage))
        live = [c.label for c in app.chat_screen.query(AttachmentChip)]
    app2 = make_app(tmp_path, resume=True)
    async with app2.run_test() as pilot:
        await wait_for(pilot, lambda: app2.chat_screen.query(AttachmentChip))
        assert [c.label for c in app2.chat_screen.query(AttachmentChip)] == live
        assert "8x8" in live[0]


test_resumed_chips_keep_size_and_thumbnail = run(_resumed_chips_keep_size_and_thumbnail)


async def _text_typed_while_a_turn_fails_is_kept(tmp_path):
    gate = threading.Event()
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen

        def broken(messages, **kw):
            gate.wait(timeout=60)
            raise RuntimeError("the model fell over")

        app.sessions[0].stream = broken
        await send(pilot, "first question")
        await wait_for(pilot, lambda: chat.generating and chat.prompt.text == "")
        await pilot.press(*"next one")  # the user drafts the next message while the first is answered
        await wait_for(pilot, lambda: chat.prompt.text == "next one")
        gate.set()
        await wait_for(pilot, lambda: not chat.generating)
        await wait_for(pilot, lambda: any("fell over" in str(n.render()) for n in chat.query(Notice)))
        assert chat.prompt.text == "first question\nnext one"  # both: the failed message and the draft


test_text_typed_while_a_turn_fails_is_kept = run(_text_typed_while_a_turn_fails_is_kept)


async def _attachment_deleted_before_sending_keeps_the_message(tmp_path):
    kept, gone = png(tmp_path / "kept.png"), png(tmp_path / "gone.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, f"/image {kept}")
        await send(pilot, f"/image {gone}")
        assert [a.path for a in chat.pending] == [kept, gone]
        gone.unlink()  # moved or deleted after it was dragged in
        await send(pilot, "what do these show?")
        assert app.is_running and chat.prompt.text == "what do these show?"
        assert [a.path for a in chat.pending] == [kept]
        said = [str(n.render()) for n in chat.query(Notice)]
        assert len(said) == 1 and str(gone) in said[0] and "not sent" in said[0] and "Attach" in said[0]
        assert not chat.query(UserMessage) and app.sessions[0].calls == []
        await pilot.press("enter")  # sent as it is now, with the file that is still there
        await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
        assert user_turn(app.sessions[0].calls[0]) == ("what do these show?", [str(
            app.history.messages(chat.conversation_id)[0].attachments[0].path)])


test_attachment_deleted_before_sending_keeps_the_message = run(_attachment_deleted_before_sending_keeps_the_message)


async def _message_that_cannot_be_saved_goes_back_to_the_prompt(tmp_path):
    img = png(tmp_path / "pic.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        (tmp_path / "data" / "attachments").write_text("not a folder")  # copies of attachments cannot be made
        await send(pilot, f"/image {img}")
        await send(pilot, "describe it")
        assert app.is_running and chat.prompt.text == "describe it"
        assert [a.path for a in chat.pending] == [img]
        [said] = [str(n.render()) for n in chat.query(Notice)]
        assert "not sent" in said and "press Enter again" in said
        assert not chat.generating and not chat.query(UserMessage) and app.sessions[0].calls == []


test_message_that_cannot_be_saved_goes_back_to_the_prompt = run(_message_that_cannot_be_saved_goes_back_to_the_prompt)


async def _regenerate_says_why_it_cannot(tmp_path):
    gate = threading.Semaphore(0)
    app = make_app(tmp_path, reply="one two three", gate=gate)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await pilot.press("ctrl+g")  # a new conversation: nothing to answer again
        assert app.notes[-1] == "Nothing to regenerate yet."
        await send(pilot, "count")
        await wait_for(pilot, lambda: chat.generating)
        await pilot.press("ctrl+g")  # mid-answer: the key is not silently ignored
        assert "Still answering" in app.notes[-1] and "Esc" in app.notes[-1]
        for _ in range(3):
            gate.release()
        await wait_for(pilot, lambda: not chat.generating)
        assert len(app.sessions[0].calls) == 1 and chat.query_one(ModelMessage).answer == "one two three"


test_regenerate_says_why_it_cannot = run(_regenerate_says_why_it_cannot)


async def _typed_ahead_keys_reach_the_field_tab_moved_to(tmp_path):
    """Settings: Tab Tab 7 arriving in one burst (as a terminal delivers typed-ahead or scripted keys) puts the 7
    in the field the two Tabs moved to (Temperature), not in the system prompt the burst started from."""
    from app.screens.settings import SettingsScreen

    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await pilot.press("f2")
        assert isinstance(app.screen, SettingsScreen)
        await pilot.pause()
        prompt = app.screen.query_one("#system_prompt").text
        for key, char in (("tab", "\t"), ("tab", "\t"), ("7", "7")):
            app.post_message(events.Key(key, char))
        await pilot.pause(0.2)
        assert app.screen.query_one("#system_prompt").text == prompt
        assert app.focused is app.screen.query_one("#temperature") and "7" in app.focused.value
        for key, char in (("shift+tab", None), ("shift+tab", None), ("x", "x")):
            app.post_message(events.Key(key, char))
        await pilot.pause(0.2)
        assert app.focused is app.screen.query_one("#system_prompt") and "x" in app.focused.text


test_typed_ahead_keys_reach_the_field_tab_moved_to = run(_typed_ahead_keys_reach_the_field_tab_moved_to)


def test_slash_system_alone_shows_the_prompt_and_keeps_it_and_commands_ignore_case(tmp_path):
    """`/system` with no text cleared the saved system prompt ("System prompt set") without a word of it; and
    /NEW was "no command"."""
    from app.settings_store import SettingsStore

    store = SettingsStore(tmp_path / "data")
    app = make_app(tmp_path, settings_store=store)

    async def go():
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            app.backend.settings.system_prompt = "You are a pirate."
            await send(pilot, "/system")
            await wait_for(pilot, lambda: app.screen.query(Notice))
            shown = " ".join(str(n.render()) for n in app.screen.query(Notice))
            assert "The system prompt is: You are a pirate." in shown
            assert app.backend.settings.system_prompt == "You are a pirate."
            await send(pilot, "hello")
            await wait_for(pilot, lambda: app.sessions[0].calls and not app.screen.generating)
            await send(pilot, "/NEW")
            await wait_for(pilot, lambda: app.chat_screen.conversation_id is None)
            assert len(app.sessions[0].calls) == 1   # not sent to the model

    asyncio.run(go())


def test_answering_again_a_turn_left_unanswered_keeps_the_answer_before_it(tmp_path):
    """A conversation that ends on a user turn (the app was killed mid-answer): Ctrl+G answered it, and took the
    previous turn's answer off the screen."""
    from app.widgets.messages import ModelMessage

    history = History(tmp_path / "data")
    cid = history.new_conversation()
    for text, role in (("first", "user"), ("first answer", "assistant"), ("second", "user")):
        history.add_message(cid, role, text)
    app = make_app(tmp_path, reply="second answer", resume=cid)

    async def go():
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded and app.screen.query(ModelMessage))
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: app.sessions and app.sessions[0].calls and not app.screen.generating)
            await pilot.pause()
            assert [m.answer for m in app.screen.query(ModelMessage)] == ["first answer", "second answer"]

    asyncio.run(go())
    assert [m.content for m in History(tmp_path / "data").messages(cid)] == ["first", "first answer", "second",
                                                                           "second answer"]


def test_picking_the_conversation_on_show_mid_answer_lets_it_go_on(tmp_path):
    """Ctrl+L, Enter (the list starts at the conversation on show) stopped its answer and the partial answer
    vanished from the screen until the conversation was opened again."""
    gate = threading.Semaphore(0)
    app = make_app(tmp_path, reply="once upon a time", gate=gate)

    async def go():
        async with app.run_test() as pilot:
            await _first_word_of_talk(pilot, gate)
            chat = app.chat_screen
            app.resume(chat.conversation_id)
            await pilot.pause()
            assert chat.generating
            gate.release(10)
            await wait_for(pilot, lambda: not chat.generating)
            assert [m.answer for m in chat.query(ModelMessage)] == ["once upon a time"]

    asyncio.run(go())
    history = History(tmp_path / "data")
    assert [m.content for m in history.messages(history.latest().id)] == ["talk", "once upon a time"]


async def _a_saved_copy_gone_from_the_app_folder_is_left_out_and_named(tmp_path):
    """A conversation whose saved attachment copies were moved away failed every message ("<copy path>: no such
    file ... drag the file in again"): the copy is left out of what the model reads, and a notice names it."""
    from app.attachments import check

    img = png(tmp_path / "red.png")
    history = History(tmp_path / "data")
    cid = history.new_conversation(model="scripted")
    history.add_message(cid, "user", "what is this?", attachments=[check(img)])
    history.add_message(cid, "assistant", "A red square.")
    copy = history.messages(cid)[0].attachments[0].path
    copy.unlink()
    app = make_app(tmp_path, resume=cid)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded and app.chat_screen.conversation_id == cid)
        await send(pilot, "and now?")
        await wait_for(pilot, lambda: not app.chat_screen.generating and app.sessions[-1].calls)
        sent = app.sessions[-1].calls[-1]["messages"]
        assert sent[0]["content"] == [{"type": "text", "text": "what is this?"}]
        said = [str(n.render()) for n in app.chat_screen.query(Notice)]
        assert any("red.png (attached earlier) is gone" in s for s in said)
        assert not any("failed" in s for s in said)
        assert [m.role for m in history.messages(cid)] == ["user", "assistant", "user", "assistant"]


test_a_saved_copy_gone_from_the_app_folder_is_left_out_and_named = run(
    _a_saved_copy_gone_from_the_app_folder_is_left_out_and_named)


async def _a_failed_turn_names_the_users_file_not_the_apps_copy(tmp_path):
    """A media error named the app's copy ("…/attachments/17/c08947b6-red.png: ..."), not the file dragged in."""
    from mlx_gemma4.errors import InputError
    from tests.app_helpers import ScriptedSession

    class Refusing(ScriptedSession):
        def stream(self, messages, **kw):
            raise InputError(f"{messages[-1]['content'][0]['image']}: the image data is truncated or corrupt.")

    img = png(tmp_path / "red.png")
    app = make_app(tmp_path, session=Refusing)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, f"what is {img}")
        def failed():
            return [str(n.render()) for n in app.chat_screen.query(Notice) if "Generation failed" in str(n.render())]

        await wait_for(pilot, failed)
        [said] = failed()
        assert "red.png: the image data is truncated" in said and "attachments" not in said


test_a_failed_turn_names_the_users_file_not_the_apps_copy = run(_a_failed_turn_names_the_users_file_not_the_apps_copy)


def test_esc_on_an_answer_asked_again_keeps_the_earlier_answer(tmp_path):
    """Ctrl+G then Esc replaced the earlier, whole answer with the fragment, for good (leaving the conversation or
    quitting mid-answer kept it)."""
    history = History(tmp_path / "data")
    cid = history.new_conversation()
    for text, role in (("first", "user"), ("the whole first answer", "assistant")):
        history.add_message(cid, role, text)
    gate = threading.Semaphore(0)
    app = make_app(tmp_path, reply="a new answer that never ends", gate=gate, resume=cid)

    async def go():
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded and app.screen.query(ModelMessage))
            await pilot.press("ctrl+g")
            gate.release(2)
            await wait_for(pilot, lambda: app.sessions and app.sessions[0].calls and app.screen.generating)
            await pilot.press("escape")
            gate.release(10)
            await wait_for(pilot, lambda: not app.screen.generating)
            await pilot.pause()
            assert [m.answer for m in app.screen.query(ModelMessage)] == ["the whole first answer"]

    asyncio.run(go())
    assert [m.content for m in History(tmp_path / "data").messages(cid)] == ["first", "the whole first answer"]


def test_a_turn_that_fails_after_its_conversation_was_left_leaves_history_and_its_text_comes_back(tmp_path):
    """A message that failed (too long) after the user moved to another conversation stayed in history,
    unanswered: going back, every message was refused as too long, and the only offer dropped good turns too."""
    from mlx_gemma4.errors import ContextLengthError
    from tests.app_helpers import ScriptedSession

    gate = threading.Event()

    class TooLong(ScriptedSession):
        def stream(self, messages, **kw):
            gate.wait(30)
            raise ContextLengthError("The conversation is 469235 tokens but the model's context is 4096.")

    app = make_app(tmp_path, session=TooLong)

    async def go():
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "a very long message")
            await wait_for(pilot, lambda: app.chat_screen.generating)
            cid = app.chat_screen.conversation_id
            await pilot.press("ctrl+n")
            gate.set()
            await wait_for(pilot, lambda: not app.history.exists(cid) or not app.history.messages(cid))
            await wait_for(pilot, lambda: app.chat_screen.prompt.text == "a very long message")

    asyncio.run(go())


async def _with_the_conversation_focused_a_paste_and_enter_reach_the_prompt(tmp_path):
    """After Tab (the conversation focused to scroll it), a dragged file's path vanished, and a typed line then
    Enter stayed unsent."""
    img = png(tmp_path / "red.png")
    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        chat.transcript.focus()
        await pilot.pause()
        chat.transcript.post_message(events.Paste(str(img)))
        await wait_for(pilot, lambda: [a.path for a in chat.pending] == [img])
        chat.prompt.text = "hi"
        chat.transcript.focus()
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.sessions and app.sessions[0].calls)
        text, images = user_turn(app.sessions[0].calls[0])
        assert text == "hi" and len(images) == 1


test_with_the_conversation_focused_a_paste_and_enter_reach_the_prompt = run(
    _with_the_conversation_focused_a_paste_and_enter_reach_the_prompt)


def test_copy_keys_use_the_system_clipboard_where_there_is_one(tmp_path, monkeypatch):
    """F3 said "Copied" whatever happened: Textual only asks the terminal (OSC 52), which macOS Terminal ignores.
    The system's clipboard tool takes it where there is one, and the message says when only the terminal was
    asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    got = tmp_path / "clipboard.txt"
    tool = bin_dir / "xclip"
    tool.write_text(f"#!/bin/sh\ncat > {got}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")   # (on a Mac, pbcopy would take it)

    async def go():
        app = make_app(tmp_path, reply="an answer to copy")
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "hi")
            await wait_for(pilot, lambda: not app.chat_screen.generating and app.chat_screen.query(ModelMessage))
            monkeypatch.setenv("DISPLAY", ":0")
            await pilot.press("f3")
            await wait_for(pilot, lambda: notes(app) and notes(app)[-1] == "Copied the last answer.")
            assert got.read_text() == "an answer to copy" and app.clipboard == "an answer to copy"
            monkeypatch.delenv("DISPLAY")
            await pilot.press("f3")
            await wait_for(pilot, lambda: "terminal's clipboard" in notes(app)[-1] and "OSC 52" in notes(app)[-1])

    asyncio.run(go())


async def _the_context_is_counted_again_after_each_answer(tmp_path):
    """After an answer the status showed the cache's count, which the next turn's reading of the conversation
    (the answer as kept) can exceed: 3,883 of 4,096 shown, and the next message refused as 4,414."""
    from app.widgets.status import StatusBar

    app = make_app(tmp_path, reply="four words of answer")
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "one two three")
        chat = app.chat_screen
        want = app.sessions[0].count_tokens([{"role": "user", "content": "one two three"},
                                             {"role": "assistant", "content": "four words of answer"}])
        await wait_for(pilot, lambda: not chat.generating and chat.query_one(StatusBar).stats.context_used == want)


test_the_context_is_counted_again_after_each_answer = run(_the_context_is_counted_again_after_each_answer)


async def _a_new_conversation_counts_its_system_prompt(tmp_path):
    """A new conversation showed ctx 0 whatever its system prompt: one too long for the context was found only
    when a message was sent, and that message was blamed."""
    from app.widgets.status import StatusBar

    app = make_app(tmp_path)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "/system " + "be brief " * 50)
        chat = app.chat_screen
        want = app.sessions[0].count_tokens([{"role": "system", "content": ("be brief " * 50).strip()}])
        await wait_for(pilot, lambda: chat.conversation_id is None
                       and chat.query_one(StatusBar).stats.context_used == want)
        assert want > 50


test_a_new_conversation_counts_its_system_prompt = run(_a_new_conversation_counts_its_system_prompt)


def test_an_answer_that_ends_after_its_conversation_was_left_and_opened_again_is_drawn(tmp_path):
    """Leave mid-answer and open the conversation again before the answer ends: the stopped answer was saved but
    not drawn (the last message on screen was the question), and Ctrl+G then took the answer before it off."""
    from tests.app_helpers import ScriptedSession, piece

    release = threading.Event()

    class Slow(ScriptedSession):   # its answer ends only when the test says, stop or not
        def _answer(self, kw):
            yield piece("once ", None, 1)
            release.wait(30)
            yield piece("upon", "cancelled" if kw["should_stop"]() else "stop", 2)

    app = make_app(tmp_path, session=Slow)

    async def go():
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "talk")
            chat = app.chat_screen
            await wait_for(pilot, lambda: chat.current and chat.current.answer == "once")
            cid = chat.conversation_id
            await pilot.press("ctrl+n")
            app.resume(cid)
            await pilot.pause()
            assert not chat.query(ModelMessage)   # (not ended yet: nothing saved to draw)
            release.set()
            await wait_for(pilot, lambda: [m.role for m in app.history.messages(cid)] == ["user", "assistant"])
            await wait_for(pilot, lambda: len(chat.query(ModelMessage)) == 1)
            assert [m.answer for m in chat.query(ModelMessage)] == [app.history.messages(cid)[-1].content]

    asyncio.run(go())


async def _a_conversation_changed_in_another_window_is_drawn_again_before_anything_is_sent(tmp_path):
    """Two windows on one conversation: the other window's turn went into it unseen here (the model read it), and
    Ctrl+G here then deleted the other window's answer. Now Enter (or Ctrl+G) after such a change draws the
    conversation as saved and does nothing else; the message waits in the prompt, and goes out on the next Enter."""
    app = make_app(tmp_path, reply="answer here")
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await send(pilot, "from A")
        await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 1)
        cid = chat.conversation_id
        other = History(tmp_path / "data")   # the other window
        other.add_message(cid, "user", "from B")
        other.add_message(cid, "assistant", "answer there")
        await send(pilot, "next from A")
        await pilot.pause()
        shown = [str(w.render()) for w in chat.query(Notice)]
        assert any("changed in another window" in n for n in shown)
        assert [m.content for m in app.history.messages(cid)] == ["from A", "answer here", "from B", "answer there"]
        assert chat.prompt.text == "next from A" and len(chat.query(UserMessage)) == 2   # drawn as saved
        other.add_message(cid, "user", "B again")
        other.add_message(cid, "assistant", "B's answer")
        await pilot.press("ctrl+g")   # the answer on show here is not B's last: nothing is replaced
        await pilot.pause()
        assert not chat.generating and app.history.messages(cid)[-1].content == "B's answer"
        chat.prompt.focus()
        await pilot.press("enter")   # drawn as saved now: it goes out
        await wait_for(pilot, lambda: not chat.generating and app.history.messages(cid)[-1].role == "assistant"
                       and app.history.messages(cid)[-2].content == "next from A")
        # An offer to drop turns worked out before the other window's change drops nothing (dropping more turns
        # than are left deleted the whole conversation)
        other.add_message(cid, "user", "B once more")
        before = len(app.history.messages(cid))
        chat.drop_oldest_turns(1)
        await pilot.pause()
        assert len(app.history.messages(cid)) == before
        # ... and while the other window answers its message, one sent here would follow it unanswered (the two
        # windows' turns were saved crossed): it waits in the prompt.
        await send(pilot, "while B answers")
        await pilot.pause()
        assert "no answer yet" in [str(w.render()) for w in chat.query(Notice)][-1]
        assert chat.prompt.text == "while B answers" and app.history.messages(cid)[-1].content == "B once more"
        chat.prompt.clear()
        # Deleted there: the message here starts a new conversation, on the second Enter, not under the old turns.
        other.delete(cid)
        await send(pilot, "after the delete")
        await pilot.pause()
        shown = [str(w.render()) for w in chat.query(Notice)]
        assert any("deleted in another window" in n for n in shown) and chat.conversation_id is None
        assert chat.prompt.text == "after the delete" and not chat.query(UserMessage)
        chat.prompt.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: not chat.generating and chat.conversation_id not in (None, cid))
        assert [m.content for m in app.history.messages(chat.conversation_id)][0] == "after the delete"


test_a_conversation_changed_in_another_window_is_drawn_again_before_anything_is_sent = run(
    _a_conversation_changed_in_another_window_is_drawn_again_before_anything_is_sent)


async def _a_long_conversation_opens_with_its_latest_turns_and_the_rest_on_request(tmp_path):
    """Opening a conversation drew every message at once: 300 turns froze the screen for 35 s. It opens with the
    last SHOWN messages (whole turns), a button above them draws the earlier ones, in order, also from the keyboard
    and while an answer streams (those saved before the first on show: a count of the widgets drew one twice)."""
    from textual.widgets import Button

    from app.screens.saved import SHOWN

    history = History(tmp_path / "data")
    cid = history.new_conversation()
    for i in range(SHOWN):   # 2 * SHOWN messages
        history.add_message(cid, "user", f"question {i}")
        history.add_message(cid, "assistant", f"answer {i}")
    app = make_app(tmp_path, resume=cid)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        chat = app.chat_screen
        await wait_for(pilot, lambda: len(chat.query(UserMessage)) > 0)
        assert len(chat.query(UserMessage)) == len(chat.query(ModelMessage)) == SHOWN // 2
        chat.render_conversation()   # drawn again at once (a drop, another window's change): it crashed, two
        chat.render_conversation()   # buttons under one id (DuplicateIds)
        await pilot.pause()
        button = chat.query_one(".earlier", Button)
        assert str(button.label) == f"Show the {SHOWN} earlier messages"
        button.focus()   # from the keyboard: the transcript took its Enter for the prompt
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.query(UserMessage)) == SHOWN)
        await pilot.pause()
        await pilot.pause()
        assert not chat.query(".earlier")
        # The view stays on the first message it showed (it went to the oldest): the one it opened with in sight
        first = next(u for u in chat.query(UserMessage) if u.text == f"question {SHOWN // 2}")
        view = chat.transcript.region
        assert view.y <= first.region.y < view.bottom, (first.region, view)
        kinds = [type(w).__name__ for w in chat.transcript.children if isinstance(w, (UserMessage, ModelMessage))]
        assert kinds == ["UserMessage", "ModelMessage"] * SHOWN
        assert [u.text for u in chat.query(UserMessage)] == [f"question {i}" for i in range(SHOWN)]
        await send(pilot, "one more")   # the turn goes on after all of them
        await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == SHOWN + 1)
        assert chat.query(UserMessage).last().text == "one more"
        chat.render_conversation()
        await pilot.pause()
        await send(pilot, "and another")
        chat.query_one(".earlier", Button).press()   # while it is answered
        await wait_for(pilot, lambda: not chat.generating and not chat.query(".earlier"))
        assert [u.text for u in chat.query(UserMessage)] == [f"question {i}" for i in range(SHOWN)] + [
            "one more", "and another"]
        assert len(chat.query(ModelMessage)) == SHOWN + 2


test_a_long_conversation_opens_with_its_latest_turns_and_the_rest_on_request = run(
    _a_long_conversation_opens_with_its_latest_turns_and_the_rest_on_request)
