"""The chat app at 80x24, driven with Pilot: status bar, new-line key, help, settings, chips, recording bar,
activity line, file picker, history list, detection previews, and getting a model (offline and with progress).

Every wait is for an event or a state the app reaches, never a wall-clock deadline.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from app.app import ChatApp
from app.attachments import check
from app.backend import Backend, Settings
from app.events import Stats
from app.history import History
from app.model_source import download_and_convert
from app.screens.confirm import ConfirmScreen
from app.screens.conversations import ConversationsScreen
from app.screens.file_picker import FilePickerScreen, MediaTree
from app.screens.get_model import GetModelScreen
from app.screens.help import HelpScreen
from app.screens.settings import SettingsScreen
from app.settings_store import SettingsStore
from app.widgets.activity import Activity
from app.widgets.chips import AttachmentChip
from app.widgets.meter import LevelMeter
from app.widgets.prompt import PromptArea
from app.widgets.status import StatusBar, fit, status_parts
from app.widgets.thumbnail import ImagePreview, Picture
from app.widgets.messages import ModelMessage, Notice
from tests.app_helpers import ScriptedSession, answered_and_counted, make_app, open_screen, record_notes, send, until

SIZE = (80, 24)


def run(coro):
    return asyncio.run(coro)


def png(path: Path, size=(64, 48), color="blue") -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def inside(widget, width: int = 80, height: int = 24) -> bool:
    r = widget.region
    return r.width > 0 and r.height > 0 and r.right <= width and r.bottom <= height


# -- status bar, new line, help ------------------------------------------------------------------------


def test_status_fits_80_columns_with_ttft_speed_memory_and_context(tmp_path):
    async def go():
        app = make_app(tmp_path, reply="one two three")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await send(pilot, "hi")
            chat = app.chat_screen
            await answered_and_counted(pilot)
            status = chat.query_one(StatusBar)
            line = str(status.render())
            assert len(line) <= status.content_size.width
            assert "TTFT" in line and "tok/s" in line and "MB" in line and "ctx 4/4096" in line   # hi + 3 words
    run(go())


def test_status_shortens_by_priority():
    s = Stats(ttft=0.213, prompt_tokens=512, prompt_tps=1520, generation_tokens=9, generation_tps=38.2,
              peak_memory_gb=3.41, context_used=1234, context_limit=131072)
    wide = fit(status_parts("gemma-4-E4B-it-4bit", "", False, s), 200)
    assert "prompt 1520 tok/s" in wide and "thinking off" in wide and "ctx 1234/131k" in wide
    narrow = fit(status_parts("gemma-4-E4B-it-4bit", "answering", True, s), 78)
    assert len(narrow) <= 78
    for part in ("answering", "TTFT 0.2s", "38 tok/s", "3.4 GB", "ctx 1234/131k"):
        assert part in narrow
    demo = status_parts("demo (random weights)", "", False, replace(s, context_used=3253, context_limit=4096))
    for width in range(8, 80):   # 40 columns showed "ctx 32" for 3253/4096: whole parts go, none is cut
        line = fit(demo, width)
        assert len(line) <= width and ("ctx" not in line or "ctx 3253/4096" in line), (width, line)
        assert "tok/s" not in line or "38 tok/s" in line or "38.2 tok/s" in line, (width, line)
    assert "ctx 3253/4096" in fit(demo, 40)
    over = status_parts("demo", "", False, replace(s, context_used=106_000, context_limit=4096))
    assert "ctx 106k/4k" in fit(over, 200)   # (it was "106k/4096": two units)


def test_status_of_an_answer_stopped_before_its_first_token_shows_no_speed():
    s = Stats(prompt_tokens=130, prompt_tps=900, peak_memory_gb=0.02, context_used=835, context_limit=4096)
    line = fit(status_parts("demo", "", False, s), 200)
    assert "TTFT" not in line and "0.0 tok/s" not in line and "prompt 900 tok/s" in line, line
    # Stopped right after its first token: a time to first token, but no speed from one token.
    one = fit(status_parts("demo", "", False, Stats(ttft=2.04, prompt_tokens=130, prompt_tps=900,
                                                    generation_tokens=1, generation_tps=0.0)), 200)
    assert "TTFT 2.04s" in one and "0.0 tok/s" not in one and "prompt 900 tok/s" in one, one
    two = fit(status_parts("demo", "", False, Stats(ttft=0.1, generation_tokens=2, generation_tps=40.0)), 200)
    assert "40.0 tok/s" in two, two


def test_ctrl_j_is_a_new_line_and_help_fits(tmp_path):
    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            prompt = app.chat_screen.query_one(PromptArea)
            prompt.focus()
            await pilot.press("a", "ctrl+j", "b")
            assert prompt.text == "a\nb" and not app.sessions[0].calls
            assert "Ctrl+J new line" in prompt.placeholder and "Shift+Enter" not in prompt.placeholder
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            await pilot.pause()
            scroll = app.screen.query_one("#help")
            console = Console(width=76, record=True, file=io.StringIO())
            console.print(app.screen.body)
            text = console.export_text()
            assert "Ctrl+J" in text and "Backspace" in text and "Alt+Enter" not in text
            assert scroll.max_scroll_y == 0 and inside(scroll)  # one screen, nothing hidden
    run(go())


# -- settings --------------------------------------------------------------------------------------------


def test_settings_at_60x20_cut_no_label_and_keep_save(tmp_path):
    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=(60, 20)) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("f2")
            await pilot.pause()
            label = app.screen.query_one("#system-label")
            assert label.region.height == 2  # wrapped: the whole sentence shows
            assert inside(app.screen.query_one("#save"), 60, 20)
        app = make_app(tmp_path)
        async with app.run_test(size=(40, 12)) as pilot:   # ... and at 40x12 both buttons whole ("Cance")
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("f2")
            await pilot.pause()
            save, cancel = app.screen.query_one("#save"), app.screen.query_one("#cancel")
            dialog = app.screen.query_one("#settings").content_region
            assert inside(save, 40, 12) and inside(cancel, 40, 12) and cancel.region.right <= dialog.right
    run(go())


def test_a_question_at_40_columns_keeps_its_buttons_on_screen(tmp_path):
    """The yes/no dialog was 60 cells wide whatever the terminal: at 40x12 it ran off the right edge and its
    buttons could not be seen ("Drop the oldest turn?", "Delete conversation?")."""
    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=(40, 12)) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            for question in ("The conversation now fills the context. Drop the oldest turn?",
                             "The conversation is 4287 tokens but the model's context is 4096. Drop the 5 oldest "
                             "turns or start a new chat. Drop the oldest 5 turns from this conversation for good to "
                             "make room?"):   # (a long one pushed the buttons out of the dialog)
                app.push_screen(ConfirmScreen(question))
                await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
                await pilot.pause()
                assert inside(app.screen.query_one("#yes"), 40, 12) and inside(app.screen.query_one("#no"), 40, 12)
                await pilot.press("escape")
                await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
    run(go())


def test_settings_fit_focus_first_field_and_persist(tmp_path):
    async def go():
        store = SettingsStore(tmp_path / "data")
        app = make_app(tmp_path, settings_store=store)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("f2")
            assert isinstance(app.screen, SettingsScreen)
            await pilot.pause()
            assert app.focused.id == "system_prompt"
            assert inside(app.screen.query_one("#save"))
            await pilot.press(*"Be brief.")
            app.screen.query_one("#temperature").value = "0.4"
            await pilot.click("#save")
            await until(pilot, lambda: store.path.exists())
            await pilot.press("ctrl+t")
            await until(pilot, lambda: json.loads(store.path.read_text())["enable_thinking"])
        saved = store.load()
        assert (saved.system_prompt, saved.temperature, saved.enable_thinking) == ("Be brief.", 0.4, True)
    run(go())


def test_image_tokens_are_picked_in_settings_kept_and_used_from_the_next_turn(tmp_path):
    """The image token budget (the model's default, or 70 to 1,120): picked from a list in the settings, saved,
    and set on the chat session before the next turn is encoded."""
    async def go():
        store = SettingsStore(tmp_path / "data")
        app = make_app(tmp_path, settings_store=store)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await send(pilot, "one")
            await until(pilot, lambda: len(app.sessions[0].calls) == 1 and not app.screen.generating)
            screen = await open_screen(pilot, "f2", SettingsScreen)
            screen.query_one("#image_tokens").focus()
            await pilot.press("enter", "down", "down", "down", "down", "enter")   # model's, 70, 140, 280, 560
            await pilot.click("#save")
            await until(pilot, lambda: store.path.exists())
            await send(pilot, "two")
            await until(pilot, lambda: len(app.sessions[0].calls) == 2)
        assert [c["max_soft_tokens"] for c in app.sessions[0].calls] == [None, 560]
        assert store.load().image_tokens == 560
    run(go())


@asynccontextmanager
async def settings_open(tmp_path):
    """The app over a settings store in tmp_path, loaded, with F2's settings open: (app, store, pilot, screen)."""
    store = SettingsStore(tmp_path / "data")
    app = make_app(tmp_path, settings_store=store)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.backend.loaded)
        yield app, store, pilot, await open_screen(pilot, "f2", SettingsScreen)


def test_enter_in_a_settings_field_saves(tmp_path):
    async def go():
        async with settings_open(tmp_path) as (app, store, pilot, screen):
            field = screen.query_one("#max_tokens")
            field.value = "300"
            field.focus()
            await pilot.press("enter")
            await until(pilot, lambda: store.path.exists())
            assert app.screen is app.chat_screen and store.load().max_tokens == 300
    run(go())


def test_settings_refuse_a_top_p_of_zero(tmp_path):
    """Top-p 0 was saved, and every message then failed ("top_p must be a number in (0, 1]") until found."""
    async def go():
        async with settings_open(tmp_path) as (app, store, pilot, screen):
            screen.query_one("#top_p").value = "0"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert app.screen is screen and not store.path.exists()
            assert "Top-p must be a number above 0.0 and at most 1.0" in str(screen.query_one("#error").render())
            screen.query_one("#top_p").value = "0.5"
            await pilot.pause()
            assert not str(screen.query_one("#error").render()).strip()   # (the reason stayed after the fix)
            await pilot.press("ctrl+s")
            await until(pilot, lambda: store.path.exists())
            assert store.load().top_p == 0.5
    run(go())


def test_the_palette_over_a_dialog_offers_none_of_the_chats_commands(tmp_path):
    """Ctrl+P over the settings dialog offered Settings again (a second dialog on the first: saving the lower one
    undid the upper one's changes) and the chat's commands, which acted on the chat behind it."""
    async def go():
        app = make_app(tmp_path, resume=0)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            said = [str(n.render()) for n in app.chat_screen.query(Notice)]
            assert any("no saved conversation #0" in s for s in said)   # (--resume 0 was ignored)
            titles = [c.title for c in app.get_system_commands(app.chat_screen)]
            assert "Settings" in titles and "New conversation" in titles
            screen = await open_screen(pilot, "f2", SettingsScreen)
            titles = [c.title for c in app.get_system_commands(screen)]
            assert "Settings" not in titles and "New conversation" not in titles and "Regenerate" not in titles
    run(go())


def test_drop_oldest_turn_from_the_palette_asks_first(tmp_path):
    """Ctrl+P "Drop oldest turn" dropped it at once, for good (the app's own offer asks)."""
    async def go():
        app = make_app(tmp_path)
        cid = app.history.new_conversation()
        for text, role in (("first", "user"), ("one", "assistant"), ("second", "user"), ("two", "assistant")):
            app.history.add_message(cid, role, text)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            app.resume(cid)
            await pilot.pause()
            [drop] = [c for c in app.get_system_commands(app.chat_screen) if c.title == "Drop oldest turn"]
            drop.callback()
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("enter")   # Keep has the focus
            await until(pilot, lambda: app.screen is app.chat_screen)
            assert len(app.history.messages(cid)) == 4
            drop.callback()
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: len(app.history.messages(cid)) == 2)
            assert [m.content for m in app.history.messages(cid)] == ["second", "two"]
    run(go())


def test_settings_store_ignores_bad_values(tmp_path):
    store = SettingsStore(tmp_path)
    assert store.load() == Settings()
    store.path.write_text(json.dumps({"temperature": "hot", "top_k": 5, "max_tokens": 7.5}))
    loaded = store.load()
    assert loaded.temperature == Settings().temperature and loaded.top_k == 5
    assert loaded.max_tokens == Settings().max_tokens
    store.path.write_text("{not json")
    assert store.load() == Settings()
    # Numbers the settings screen and the command line refuse are refused from the file too, field by field.
    store.path.write_text('{"max_tokens": 0, "temperature": NaN, "top_p": 7, "top_k": -1, "enable_thinking": true}')
    assert store.load() == Settings(enable_thinking=True)
    store.path.write_text('{"top_p": 0}')   # keeps no token: every turn failed
    assert store.load() == Settings()
    store.path.write_text('{"max_tokens": 32768, "temperature": 0, "top_p": 1.0, "top_k": 0}')
    assert store.load() == Settings(max_tokens=32768, temperature=0.0, top_p=1.0, top_k=0)
    store.path.write_text('{"image_tokens": 100}')   # no budget the model takes
    assert store.load() == Settings()
    store.path.write_text('{"image_tokens": 1120}')
    assert store.load() == Settings(image_tokens=1120)


def test_settings_that_cannot_be_saved_still_hold_and_say_so(tmp_path):
    async def go():
        store = SettingsStore(tmp_path / "data")
        store.path.parent.mkdir(parents=True)
        store.path.mkdir()  # settings.json cannot be written
        app = make_app(tmp_path, settings_store=store)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("ctrl+t")
            await pilot.pause()
            assert app.is_running and app.backend.settings.enable_thinking
            assert any("could not be saved" in n and "--data-dir" in n for n in app.notes)
            assert app.chat_screen.query_one(StatusBar).thinking
    run(go())


def test_command_line_overrides_only_what_it_names(tmp_path, monkeypatch):
    import app.__main__ as main_mod

    SettingsStore(tmp_path).save(Settings(temperature=0.2, enable_thinking=True, system_prompt="saved"))
    ran = {}

    class Probe:
        def __init__(self, backend, history, **kw):
            ran.update(settings=backend.settings, history=history.dir, demo=backend.demo)

        def run(self):
            pass

        return_code = 0

    monkeypatch.setattr("app.app.ChatApp", Probe)
    assert main_mod.main(["--demo", "--data-dir", str(tmp_path), "--max-tokens", "9"]) == 0
    s = ran["settings"]
    assert (s.temperature, s.enable_thinking, s.system_prompt, s.max_tokens) == (0.2, True, "saved", 9)
    assert ran["demo"] and ran["history"] == tmp_path / "demo"  # demo chats apart from real ones


def test_command_line_settings_hold_for_one_run_and_are_not_saved(tmp_path):
    """--max-tokens, --temperature and --system were saved with the rest as soon as anything saved the settings
    (Ctrl+T), so a one-off run changed every later one; a setting the user changes in the run is saved."""
    async def go():
        store = SettingsStore(tmp_path / "data")
        store.save(Settings(temperature=0.2, max_tokens=500, system_prompt="saved"))
        one_run = {"temperature": 0.9, "max_tokens": 9, "system_prompt": "one-off"}
        app = make_app(tmp_path, settings_store=store, one_run=one_run)
        app.backend.settings = replace(store.load(), **one_run)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("ctrl+t")
            await until(pilot, lambda: store.load().enable_thinking)
            saved = store.load()
            assert (saved.temperature, saved.max_tokens, saved.system_prompt) == (0.2, 500, "saved")
            assert app.backend.settings.max_tokens == 9   # ... while this run keeps them
            screen = await open_screen(pilot, "f2", SettingsScreen)
            screen.query_one("#max_tokens").value = "77"
            await pilot.press("ctrl+s")
            await until(pilot, lambda: store.load().max_tokens == 77)   # changed by the user: saved
            assert (store.load().temperature, store.load().system_prompt) == (0.2, "saved")
    run(go())


_LOAD_ANSWER_QUIT = """
import sys
from app.backend import Backend
from mlx_gemma4 import load
backend = Backend("tiny", lambda progress: load(sys.argv[1]))
backend.load(lambda event: None).result()
backend.generate(lambda event: None, 1, 1, [{"role": "user", "content": "hi"}]).result()
backend.shutdown()
"""


def test_process_exits_cleanly_after_the_backend_shuts_down(checkpoint_factory, tmp_path):
    """MLX arrays made on the model's thread and alive at exit aborted the process now and then (quitting the app:
    exit code 134, 'terminate called without an active exception'; a 4-bit model did it most)."""
    import subprocess
    import sys

    from mlx_gemma4.conversion import convert

    _, src = checkpoint_factory("e")
    model = convert(src, tmp_path / "q4", q_bits=4, q_group_size=32, dtype="float32")
    root = Path(__file__).resolve().parents[1]
    for _ in range(6):
        done = subprocess.run([sys.executable, "-c", _LOAD_ANSWER_QUIT, str(model)], cwd=root, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-500:]


@pytest.mark.parametrize("flag,value", [("--temperature", "-3"), ("--max-tokens", "0")])
def test_command_line_refuses_a_setting_out_of_range(flag, value, capsys):
    """As the settings screen would: an answer length of 0 failed every message, and only once one was sent."""
    import app.__main__ as main_mod

    with pytest.raises(SystemExit) as e:
        main_mod.parse_args([flag, value])
    assert e.value.code == 2 and f"{flag} must be from" in capsys.readouterr().err

# -- chips, recording bar, activity ----------------------------------------------------------------------


def test_chip_rows_wrap_at_80_columns(tmp_path):
    async def go():
        files = [png(tmp_path / f"picture-number-{i}.png") for i in range(5)]
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            chat = app.chat_screen
            chat.attach([check(f) for f in files])
            await until(pilot, lambda: len(chat.query(AttachmentChip)) == 5)
            await pilot.pause()
            chips = list(chat.query(AttachmentChip))
            assert all(inside(c) for c in chips)
            assert len({c.region.y for c in chips}) > 1  # more than one row
            meter = chat.query_one(LevelMeter)
            meter.display, meter.level, meter.elapsed = True, 0.5, 12.3
            await pilot.pause()
            line = str(meter.render())
            assert len(line) <= meter.content_size.width and "Ctrl+R" in line and "Esc" in line
    run(go())


def test_many_waiting_files_leave_the_prompt_status_and_keys_in_view(tmp_path):
    async def go():
        files = [png(tmp_path / f"picture-number-{i}.png") for i in range(30)]
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            chat = app.chat_screen
            chat.attach([check(f) for f in files])
            await until(pilot, lambda: len(chat.query(AttachmentChip)) == 30)
            await pilot.pause()
            for sel in ("#transcript", "#pending", "#prompt", "#status", "Footer"):
                assert inside(chat.query_one(sel)), sel
            assert chat.query_one("#transcript").region.height >= 8  # the conversation is still readable
            pending = chat.query_one("#pending")
            pending.scroll_end(animate=False)  # every file can be scrolled to
            await pilot.pause()
            last = chat.query(AttachmentChip).last()
            assert pending.region.contains_region(last.region)
    run(go())


def test_toasts_show_file_names_as_written(tmp_path):
    from textual.widgets._toast import Toast, ToastRack

    def toasts(app) -> list[Toast]:
        return [w for w in app.screen.get_child_by_type(ToastRack).walk_children() if isinstance(w, Toast)]

    async def go():
        img = png(tmp_path / "photo [bold]1 [i].png")
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await send(pilot, f"/audio '{img}'")
            assert app.notes  # the refusal is a toast
            await until(pilot, lambda: toasts(app))
            await pilot.pause()
            shown = " ".join(" ".join(s.text for s in t.render_lines(t.region.reset_offset)) for t in toasts(app))
            assert "photo [bold]1 [i].png" in " ".join(shown.split()), shown
    run(go())


class GatedSession(ScriptedSession):
    """Reports prefill progress, then waits for the test before the first token."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gates = [threading.Event(), threading.Event()]

    def stream(self, messages, **kw):
        self.calls.append(dict(kw, messages=messages))

        def answer():
            kw["progress"](0, 5000)
            self.gates[0].wait()
            kw["progress"](2048, 5000)
            self.gates[1].wait()
            yield from self._answer(kw)

        return answer()


def test_activity_line_says_what_and_how_far(tmp_path):
    async def go():
        img = png(tmp_path / "scene.png")
        app = make_app(tmp_path, reply="done now", session=GatedSession)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            chat = app.chat_screen
            activity = chat.query_one(Activity)
            assert not activity.display
            await send(pilot, f"what is this {img}")
            await until(pilot, lambda: activity.total == 5000)
            text = str(activity.render())
            assert activity.display and "Encoding 1 image" in text and "5,000" in text and inside(activity)
            app.sessions[0].gates[0].set()
            await until(pilot, lambda: activity.done == 2048)
            assert "2,048/5,000 tokens" in str(activity.render())
            app.sessions[0].gates[1].set()
            await until(pilot, lambda: not chat.generating)
            assert not activity.display
    run(go())


def test_a_message_sent_while_the_model_loads_says_it_waits_for_it(tmp_path):
    """The activity line said "Preparing the prompt" while the message waited for the model to load."""
    async def go():
        gate = threading.Event()
        app = make_app(tmp_path, reply="done now", load=lambda progress: (gate.wait(), (None, None))[1])
        async with app.run_test(size=SIZE) as pilot:
            chat = app.chat_screen
            activity = chat.query_one(Activity)
            await send(pilot, "hello")
            await until(pilot, lambda: activity.display)
            assert "Waiting for the model to load" in str(activity.render())
            gate.set()
            await until(pilot, lambda: not chat.generating)
            assert chat.query(ModelMessage).last().answer == "done now"
    run(go())


# -- file picker, history list ---------------------------------------------------------------------------


def test_file_picker_starts_home_goes_up_and_takes_a_typed_path(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "pics").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    img = png(elsewhere / "my photo.png")
    monkeypatch.setenv("HOME", str(home))

    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("ctrl+o")
            assert isinstance(app.screen, FilePickerScreen)
            tree = app.screen.query_one(MediaTree)
            assert Path(tree.path) == home
            assert inside(app.screen.query_one("#picker-hint"))
            await pilot.press("backspace")
            await until(pilot, lambda: Path(tree.path) == tmp_path)
            assert str(tmp_path) in str(app.screen.query_one("#picker-title").render())
            field = app.screen.query_one("#path")
            field.focus()
            field.value = f"'{elsewhere}'"
            await pilot.press("enter")
            await until(pilot, lambda: Path(tree.path) == elsewhere)
            field.focus()
            (home / "my pics").mkdir()
            field.value = (home / "my pics").as_uri()  # a folder dragged in as a file:// URI (file:///…/my%20pics)
            await pilot.press("enter")
            await until(pilot, lambda: Path(tree.path) == home / "my pics")
            field.focus()
            field.value = f"'{elsewhere}'"
            await pilot.press("enter")
            await until(pilot, lambda: Path(tree.path) == elsewhere)
            field.focus()
            field.value = str(img).replace(" ", "\\ ")
            await pilot.press("enter")
            await until(pilot, lambda: app.chat_screen.pending)
            assert [a.path for a in app.chat_screen.pending] == [img]
    run(go())


def test_history_list_shows_ids_dates_model_and_delete_asks(tmp_path):
    async def go():
        app = make_app(tmp_path)
        for title in ("first chat", "second chat"):
            cid = app.history.new_conversation(model="gemma-4-E4B-it-4bit")
            app.history.add_message(cid, "user", title)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("ctrl+l")
            assert isinstance(app.screen, ConversationsScreen)
            options = app.screen.query_one("OptionList")
            first = str(options.get_option_at_index(0).prompt)
            assert first.startswith("#2 · 20") and "gemma-4-E4B-it-4bit" in first and "second chat" in first
            await pilot.press("d")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            assert len(app.history.conversations()) == 2
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.pause()
            await pilot.press("enter")   # Enter keeps it: the focus starts on Keep (it started on Delete)
            await until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
            assert len(app.history.conversations()) == 2
            await pilot.press("d")
            await pilot.press("y")
            await until(pilot, lambda: len(app.history.conversations()) == 1)
            assert app.history.conversations()[0].title == "first chat"
    run(go())


def test_after_a_delete_the_highlight_stays_where_it_was(tmp_path):
    """Deleting a conversation further down the list put the highlight back at the top."""
    async def go():
        app = make_app(tmp_path)
        for i in range(4):
            app.history.add_message(app.history.new_conversation(), "user", f"chat {i}")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("ctrl+l")
            await until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
            options = app.screen.query_one("OptionList")
            await pilot.press("down", "down")
            assert options.highlighted == 2   # chat 1 (the newest first)
            await pilot.press("d", "y")
            await until(pilot, lambda: len(app.history.conversations()) == 3)
            await pilot.pause()
            assert options.highlighted == 2 and "chat 0" in str(options.get_option_at_index(2).prompt)
    run(go())


def test_export_that_cannot_be_written_says_so_and_the_app_stays(tmp_path):
    async def go():
        app = make_app(tmp_path)
        cid = app.history.new_conversation(model="demo")
        app.history.add_message(cid, "user", "keep me")
        (tmp_path / "data" / "exports").write_text("a file where the exports folder goes")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.press("ctrl+l")
            assert isinstance(app.screen, ConversationsScreen)
            await pilot.press("e")  # the export runs (and says how it went) within the key press
            await pilot.pause()
            assert app.is_running and isinstance(app.screen, ConversationsScreen)
            assert f"Could not export conversation #{cid}" in app.notes[-1] and "--data-dir" in app.notes[-1]
    run(go())


# -- detection boxes -------------------------------------------------------------------------------------


def test_thumbnails_are_upright_and_drawn_once(tmp_path):
    from app.widgets.thumbnail import Thumbnail

    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side, shown turned a quarter: 20 wide, 40 tall, as a phone writes it
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    thumb = Thumbnail(path, cells=(16, 8))
    lines = thumb.render().plain.split("\n")
    assert (len(lines), len(lines[0])) == (8, 8)  # taller than wide, as the model sees it
    path.unlink()
    assert thumb.render().plain.split("\n") == lines  # drawn once: a later refresh or resize decodes nothing


def test_box_preview_is_large_opens_and_is_kept(tmp_path):
    reply = '```json\n[{"box_2d": [100, 100, 500, 600], "label": "thing"}]\n```'

    async def go():
        img = png(tmp_path / "scene.png", size=(320, 240))
        app = make_app(tmp_path, reply=reply)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await send(pilot, f"find the thing {img}")
            chat = app.chat_screen
            await until(pilot, lambda: chat.query(ImagePreview))
            preview = chat.query_one(ImagePreview)
            await pilot.pause()
            assert preview.query_one(Picture).size.width >= 60 and preview.query_one(Picture).size.height >= 10
            opened = []
            preview.opener = opened.append
            preview.query_one("#open-image").press()
            await until(pilot, lambda: opened)
            assert opened == [preview.path] and preview.path.exists()
            cid = chat.conversation_id
        assert preview.path.is_relative_to(app.history.attachments_dir / str(cid))
        app2 = make_app(tmp_path, reply=reply, resume=True)
        async with app2.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app2.chat_screen.query(ImagePreview))
            assert app2.chat_screen.query_one(ImagePreview).path == preview.path
        app2.history.delete(cid)
        assert not preview.path.exists()
    run(go())


# -- getting a model -------------------------------------------------------------------------------------


def test_offline_offers_the_demo_on_one_key(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    async def go():
        backend = Backend("gemma-4-E4B-it", lambda progress: (_ for _ in ()).throw(AssertionError("no download")))
        app = ChatApp(backend, History(tmp_path / "data"), offer_download=True, hub_check=lambda: False)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen) and app.screen.reachable is False)
            text = str(app.screen.query_one("#question").render())
            assert "cannot be reached" in text and "hf auth login" in text and "licence" in text
            assert "HF_HUB_OFFLINE" not in text and "convert.py" in text
            assert not app.screen.query_one("#download").display
            assert not app.chat_screen.query_one("#loading").display  # nothing is loading behind the dialog
            assert app.chat_screen.query_one(StatusBar).state == "no model yet"   # (it said "loading")
            await pilot.press("d")
            await until(pilot, lambda: app.backend.loaded)
            assert app.backend.demo and app.history.dir == tmp_path / "data" / "demo"
            assert app.chat_screen.query("#banner")
    run(go())


def test_closing_get_model_leaves_no_model_and_a_message_is_refused(tmp_path):
    """Esc on the get-model dialog: nothing will load, so the status says so and a message stays in the prompt
    with what to do (it used to show "loading" and fail the turn with "RuntimeError: No model is loaded.")."""
    async def go():
        backend = Backend("gemma-4-E4B-it", lambda progress: (_ for _ in ()).throw(AssertionError("no download")))
        app = record_notes(ChatApp(backend, History(tmp_path / "data"), offer_download=True,
                                   hub_check=lambda: False))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen))
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is app.chat_screen)
            await send(pilot, "hello")
            await pilot.pause()
            chat = app.chat_screen
            assert not chat.generating and chat.prompt.text == "hello"
            assert chat.query_one(StatusBar).state == "no model"
            assert "Get a model" in app.notes[-1] and "No model is loaded" in app.notes[-1]
            assert not [n for n in chat.query(Notice) if "failed" in str(n.render())]
            # ... and the dialog can be had again (one Esc left no way in but a restart): Ctrl+P, "Get a model"
            [again] = [c for c in app.get_system_commands(chat) if c.title == "Get a model"]
            again.callback()
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen) and app.screen.reachable is False)
            await pilot.press("d")
            await until(pilot, lambda: app.backend.loaded)
            assert not [c for c in app.get_system_commands(chat) if c.title == "Get a model"]
            assert not [n for n in chat.query(Notice) if "No model loaded" in str(n.render())]   # (it stayed)
    run(go())


def test_the_demo_picked_after_resuming_a_real_chat_starts_its_own(tmp_path):
    """--resume 1 then the demo: the screen still showed the real conversation #1, and the next message went into
    the demo history's #1, another conversation (with its media), while the real one got nothing."""
    real = History(tmp_path / "data")
    rid = real.new_conversation(model="gemma-4-E4B-it-4bit")
    real.add_message(rid, "user", "REAL: my tax question")
    demo = History(tmp_path / "data" / "demo")
    did = demo.new_conversation(model="demo")
    demo.add_message(did, "user", "hi there")
    assert rid == did == 1

    async def go():
        backend = Backend("gemma-4-E4B-it", lambda progress: (_ for _ in ()).throw(AssertionError("no download")))
        app = ChatApp(backend, History(tmp_path / "data"), offer_download=True, hub_check=lambda: False, resume=1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen) and app.screen.reachable is False)
            await pilot.press("d")
            await until(pilot, lambda: app.backend.loaded)
            assert app.chat_screen.conversation_id is None
            await send(pilot, "follow-up")
            await until(pilot, lambda: not app.chat_screen.generating and len(app.history.conversations()) == 2)
    run(go())
    assert [m.content for m in History(tmp_path / "data").messages(rid)] == ["REAL: my tax question"]
    assert [m.content for m in History(tmp_path / "data" / "demo").messages(did)] == ["hi there"]


def test_a_line_typed_as_the_first_run_dialog_comes_up_answers_nothing(tmp_path):
    """The dialog comes up unasked as the app starts: a typed "quick question" and Enter quit the app (the q key)
    or, with the hub reachable, started a 16 GB download (Enter on the focused button)."""
    async def go():
        backend = Backend("gemma-4-E4B-it", lambda progress: (_ for _ in ()).throw(AssertionError("no download")))
        app = ChatApp(backend, History(tmp_path / "data"), offer_download=True, hub_check=lambda: True)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen) and app.screen.reachable)
            await pilot.press(*"quick question", "enter")
            await pilot.pause()
            assert isinstance(app.screen, GetModelScreen) and app.is_running
    run(go())


@pytest.mark.parametrize("size", [SIZE, (60, 20)])
def test_get_model_buttons_stay_on_a_small_screen(tmp_path, monkeypatch, size):
    """The longest message (HF_HUB_OFFLINE set) pushed the buttons below the dialog's edge."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    async def go():
        backend = Backend("gemma-4-E4B-it", lambda progress: (_ for _ in ()).throw(AssertionError("no download")))
        app = ChatApp(backend, History(tmp_path / "data"), offer_download=True, hub_check=lambda: False)
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen) and app.screen.reachable is False)
            await pilot.pause()
            inside = app.screen.query_one("#get-model").content_region
            for button in ("#demo", "#quit"):
                region = app.screen.query_one(button).region
                assert inside.contains_region(region), (button, region, inside)
    run(go())


@pytest.mark.parametrize("size,lines", [(SIZE, 1), ((60, 20), 2)])
def test_demo_banner_wraps_rather_than_cut(tmp_path, size, lines):
    async def go():
        backend = Backend("demo", lambda progress: (None, None), demo=True,
                          session_factory=lambda m, p, s: ScriptedSession("hi"))
        app = ChatApp(backend, History(tmp_path / "data"))
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await pilot.pause()
            assert app.chat_screen.query_one("#banner").region.height == lines
    run(go())


def test_offline_message_names_hf_hub_offline_only_when_set(tmp_path, monkeypatch):
    from app.model_source import offline_message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in offline_message(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "HF_HUB_OFFLINE" not in offline_message(tmp_path)


def fake_hub(gate: threading.Event | None = None):
    """A snapshot_download stand-in that reports bytes through the tqdm class it is given, like the real one."""
    calls = {}

    def fetch(repo, allow_patterns, tqdm_class):
        calls["repo"] = repo
        bar = tqdm_class(total=4_000_000_000, unit="B", desc="Reconstructing")
        bar.update(1_000_000_000)
        if gate is not None:
            gate.wait()
        bar.update(3_000_000_000)
        bar.close()
        return "/fake/snapshot"

    def convert(src, dest, q_bits, force, progress):
        calls["convert"] = (src, dest, q_bits)
        for i in range(3):
            progress(i + 1, 3, f"layer.{i}")
        return dest

    return fetch, convert, calls


def test_download_and_convert_report_real_progress(tmp_path):
    events = []
    fetch, convert, calls = fake_hub()
    out = download_and_convert(lambda *e: events.append(e), tmp_path / "models" / "m", fetch=fetch, convert=convert)
    assert out == tmp_path / "models" / "m" and calls["convert"] == ("/fake/snapshot", out, 4)
    byte_events = [e for e in events if e[1] == 4_000_000_000]
    assert byte_events[0][0] == 1_000_000_000 and byte_events[-1][0] == 4_000_000_000
    assert events[-1] == (3, 3, "Converting to 4-bit: layer.2")


def test_download_progress_reaches_the_progress_bar(tmp_path):
    gate = threading.Event()
    fetch, convert, _ = fake_hub(gate)

    def load(progress):
        download_and_convert(progress, tmp_path / "m", fetch=fetch, convert=convert)
        return None, None

    async def go():
        backend = Backend("gemma-4-E4B-it", load, session_factory=lambda m, p, s: ScriptedSession("hi"))
        app = ChatApp(backend, History(tmp_path / "data"), offer_download=True, hub_check=lambda: True)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, GetModelScreen) and app.screen.reachable)
            assert "hf auth login" in str(app.screen.query_one("#question").render())
            await pilot.press("enter")   # no button has the focus: Enter typed ahead answers nothing ...
            await pilot.pause()
            assert isinstance(app.screen, GetModelScreen)
            await pilot.press("tab", "enter")   # ... Tab gets to Download
            bar = app.chat_screen.query_one("#loading-bar")
            await until(pilot, lambda: bar.progress == 1_000_000_000)
            assert bar.total == 4_000_000_000
            assert "1.0/4.0 GB" in str(app.chat_screen.query_one("#loading-label").render())
            gate.set()
            await until(pilot, lambda: app.backend.loaded)
    run(go())


@pytest.mark.parametrize("size", [SIZE, (60, 20), (60, 14)])
def test_settings_buttons_and_every_field_reachable_on_a_small_screen(tmp_path, size):
    """Below 80x24 the settings dialog was cut at the screen's edge: Save, Cancel and the drafter field could
    not be seen. The fields now scroll (the focused one into view) and the buttons stay below them."""
    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            screen = await open_screen(pilot, "f2", SettingsScreen)
            inside, body = screen.query_one("#settings").content_region, screen.query_one("#settings-body").region
            for button in ("#save", "#cancel"):
                region = screen.query_one(button).region
                assert inside.contains_region(region) and not body.overlaps(region), (button, region, body)
            for field in ("#system_prompt", "#enable_thinking", "#max_tokens", "#image_tokens", "#assistant"):
                screen.query_one(field).focus()
                # Focus scrolls the field into view, animated: wait for it to land (a bounded wait: it fails if
                # the field never comes into view).
                await until(pilot, lambda f=field: body.contains_region(screen.query_one(f).region))
    run(go())


@pytest.mark.parametrize("size", [SIZE, (60, 20)])
def test_a_refused_setting_stays_in_view_with_its_reason(tmp_path, size):
    """Save refused a drafter folder that is no drafter with a three-line reason, which pushed the field it had
    focused out of the dialog's view: typing changed nothing that could be seen."""
    not_a_drafter = tmp_path / "q4"
    not_a_drafter.mkdir()
    (not_a_drafter / "config.json").write_text(json.dumps({"model_type": "gemma4"}))

    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            screen = await open_screen(pilot, "f2", SettingsScreen)
            field = screen.query_one("#assistant")
            field.value = str(not_a_drafter)
            field.focus()
            await pilot.press("ctrl+s")
            await until(pilot, lambda: "not an assistant drafter" in str(screen.query_one("#error").render()))
            body = screen.query_one("#settings-body").region
            await until(pilot, lambda: app.focused is field and body.contains_region(field.region))
            assert isinstance(app.screen, SettingsScreen)
    run(go())


@pytest.mark.parametrize("size", [SIZE, (60, 20), (60, 14)])
def test_conversations_hint_stays_on_a_small_screen(tmp_path, size):
    """With many saved chats the list kept its 16 rows below 80x24 and pushed the keys hint (resume, delete,
    export) off the screen."""
    history = History(tmp_path / "data")
    for i in range(12):
        history.add_message(history.new_conversation(model="m", system_prompt=""), "user", f"chat {i}")
    history.close()

    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            screen = await open_screen(pilot, "ctrl+l", ConversationsScreen)
            dialog = screen.query_one("#conversations-dialog")
            listed, hint = screen.query_one("#conversations"), screen.query_one(".hint")
            assert dialog.content_region.contains_region(hint.region) and not listed.region.overlaps(hint.region)
            assert listed.region.height >= 3
    run(go())


def test_the_image_token_choices_are_the_models_budgets():
    from app.backend import IMAGE_TOKENS
    from mlx_gemma4.processing.image import SUPPORTED_SOFT_TOKENS

    assert IMAGE_TOKENS == (0, *SUPPORTED_SOFT_TOKENS)


def test_textuals_screenshot_toast_reads_without_its_markup(tmp_path):
    """Every toast is plain text (file names like "photo [1].png" show as written), and Textual's own screenshot
    toast, written in markup, showed "[$text-success]'/home/...svg'"."""
    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            app.notify("Saved screenshot to [$text-success]'/tmp/shot [1].svg'", title="Screenshot")
            app.notify("photo [1].png [b]not bold[/b]")
            await pilot.pause()
            shown = [n.message for n in app._notifications]
            assert shown[-2:] == ["Saved screenshot to '/tmp/shot [1].svg'", "photo [1].png [b]not bold[/b]"]
    run(go())


def test_a_screenshot_without_a_downloads_folder_goes_to_the_data_folder(tmp_path, monkeypatch):
    """Textual saves screenshots in ~/Downloads; where there is none (a headless Linux) it failed, saying only
    "Failed to save screenshot"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DOWNLOAD_DIR", str(tmp_path / "home" / "Downloads"))

    async def go():
        app = make_app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            app.action_screenshot()
            await until(pilot, lambda: list(app.history.dir.glob("*.svg")))
            await until(pilot, lambda: any("Saved screenshot" in n.message for n in app._notifications))
    run(go())
