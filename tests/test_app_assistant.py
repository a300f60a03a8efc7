"""The app with an assistant drafter: --assistant and the settings screen's drafter folder are kept as a setting,
the backend decodes speculatively with the same answer, and the status bar shows the share of drafts kept."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.__main__ import main, parse_args
from app.app import ChatApp
from app.backend import Backend, Settings
from app.events import DrafterSkipped, Finished, LoadFailed, ModelLoaded, Stats
from app.history import History
from app.screens.settings import SettingsScreen
from app.settings_store import SettingsStore
from app.widgets.status import status_parts
from tests import tiny
from tests.app_helpers import open_screen, record_notes, send, until


def _backend(path, settings: Settings) -> tuple[Backend, list]:
    from mlx_gemma4.weights import load

    posted: list = []
    backend = Backend("tiny", lambda progress: load(path), settings=settings)
    backend.load(posted.append).result()
    return backend, posted


def _answer(backend: Backend, posted: list) -> Finished:
    backend.generate(posted.append, 1, 1, [{"role": "user", "content": "hello there"}]).result()
    return next(m for m in posted if isinstance(m, Finished))


def test_backend_answers_the_same_with_a_drafter_and_reports_its_drafts(checkpoint_factory, tmp_path):
    from mlx_gemma4.conversion import convert

    _, path = checkpoint_factory("e")
    tiny.make_assistant("e", ordered=True).save_pretrained(tmp_path / "src", safe_serialization=True)
    drafter = convert(tmp_path / "src", tmp_path / "drafter", dtype="float32")
    greedy = dict(temperature=0.0, max_tokens=12)
    plain, posted = _backend(path, Settings(**greedy))
    spec, spec_posted = _backend(path, Settings(assistant=str(drafter), **greedy))
    try:
        assert any(isinstance(m, ModelLoaded) for m in spec_posted)
        want, got = _answer(plain, posted), _answer(spec, spec_posted)
        assert got.answer == want.answer
        assert got.stats.drafted_tokens > 0 and want.stats.drafted_tokens == 0
    finally:
        plain.shutdown()
        spec.shutdown()


def test_a_drafter_that_does_not_fit_is_skipped_with_the_reason(checkpoint_factory, tmp_path):
    """One drafter setting serves every model: a drafter made for another size failed the load of this one. The
    model loads without it, and DrafterSkipped says why."""
    _, path = checkpoint_factory("e")
    tiny.make_assistant("e", head_dim=8).save_pretrained(tmp_path / "src", safe_serialization=True)
    backend, posted = _backend(path, Settings(assistant=str(tmp_path / "src")))
    try:
        [skipped] = [m for m in posted if isinstance(m, DrafterSkipped)]
        assert "does not fit" in skipped.error and skipped.path == str(tmp_path / "src")
        assert any(isinstance(m, ModelLoaded) for m in posted) and backend.session.assistant is None
        assert not [m for m in posted if isinstance(m, LoadFailed)]
    finally:
        backend.shutdown()


def test_status_shows_the_share_of_drafts_kept():
    texts = [full for _, full, _ in status_parts("m", "", False, Stats(generation_tokens=9, drafted_tokens=8,
                                                                       accepted_tokens=6))]
    assert "drafts 75% kept" in texts
    plain = [full for _, full, _ in status_parts("m", "", False, Stats(generation_tokens=9))]
    assert not any("kept" in t for t in plain)


def test_assistant_setting_round_trips(tmp_path):
    assert parse_args(["--assistant", "models/drafter"]).assistant == "models/drafter"
    store = SettingsStore(tmp_path)
    store.save(Settings(assistant="/x/drafter"))
    assert store.load().assistant == "/x/drafter"
    assert json.loads((tmp_path / "settings.json").read_text())["assistant"] == "/x/drafter"


def test_a_drafter_folder_that_is_gone_is_skipped(checkpoint_factory, tmp_path):
    _, path = checkpoint_factory("e")
    backend, posted = _backend(path, Settings(assistant=str(tmp_path / "deleted-drafter")))
    try:
        [skipped] = [m for m in posted if isinstance(m, DrafterSkipped)]
        assert "deleted-drafter" in skipped.error and backend.loaded and backend.session.assistant is None
    finally:
        backend.shutdown()


def test_a_wrong_assistant_path_is_refused_before_it_is_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("app.app.ChatApp.run", lambda self: pytest.fail("the app started"))
    assert main(["--demo", "--data-dir", str(tmp_path), "--assistant", str(tmp_path / "nope")]) == 2
    assert "--assistant ''" in capsys.readouterr().err
    assert SettingsStore(tmp_path).load().assistant == ""


def test_a_command_line_drafter_is_kept_only_once_the_model_loads_with_it(checkpoint_factory, tmp_path):
    """--assistant DIR was saved before the load checked that the drafter fits: one that does not failed every
    later start too. Now it is kept once the model has loaded with it; one that does not fit is not kept."""
    from mlx_gemma4.weights import load

    _, path = checkpoint_factory("e")
    fits, misfit = _drafter(tmp_path, "fits"), _drafter(tmp_path, "misfit", head_dim=8)

    async def go(drafter, data):
        store = SettingsStore(data)
        backend = Backend("tiny", lambda progress: load(path), settings=Settings(assistant=str(drafter)))
        app = record_notes(ChatApp(backend, History(data), settings_store=store,
                                   one_run={"assistant": str(drafter)}))
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: backend.loaded or backend.load_error is not None)
            await pilot.pause()
        return store.load().assistant

    assert asyncio.run(go(fits, tmp_path / "a")) == str(fits)
    assert asyncio.run(go(misfit, tmp_path / "b")) == ""


# -- the drafter folder in the settings screen (F2) ------------------------------------------------------


def _drafter(tmp_path, name: str, **kw):
    """A converted tiny drafter for the "e" checkpoints (kw such as head_dim=8 make one that does not fit)."""
    from mlx_gemma4.conversion import convert

    tiny.make_assistant("e", ordered=True, **kw).save_pretrained(tmp_path / f"{name}-src", safe_serialization=True)
    return convert(tmp_path / f"{name}-src", tmp_path / name, dtype="float32")


def _app(path, tmp_path, settings: Settings):
    from mlx_gemma4.weights import load

    store = SettingsStore(tmp_path / "data")
    store.save(settings)
    backend = Backend("tiny", lambda progress: load(path), settings=settings)
    return record_notes(ChatApp(backend, History(tmp_path / "data"), settings_store=store)), store


async def _set_drafter(pilot, folder: str) -> None:
    screen = await open_screen(pilot, "f2", SettingsScreen)
    screen.query_one("#assistant").value = folder
    await pilot.press("ctrl+s")


def _status_text(app) -> str:
    status = app.chat_screen.query_one("#status")
    return " ".join(full for _, full, _ in status_parts("m", "", False, status.stats))


def test_the_drafter_is_set_and_dropped_in_the_settings_without_a_restart(checkpoint_factory, tmp_path):
    _, path = checkpoint_factory("e")
    drafter = _drafter(tmp_path, "drafter")

    async def go():
        app, store = _app(path, tmp_path, Settings(temperature=0.0, max_tokens=8))
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await _set_drafter(pilot, str(drafter))
            await until(pilot, lambda: app.backend.settings.assistant == str(drafter))
            assert app.backend.session.assistant is not None
            assert store.load().assistant == str(drafter)
            await send(pilot, "hello there")
            await until(pilot, lambda: not app.chat_screen.generating and app.history.latest() is not None
                        and len(app.history.messages(app.history.latest().id)) == 2)
            assert "kept" in _status_text(app)
            await _set_drafter(pilot, "")
            await until(pilot, lambda: app.backend.settings.assistant == "")
            assert app.backend.session.assistant is None and store.load().assistant == ""
            assert "kept" not in _status_text(app)  # the last turn's drafts are not shown as the drafter's now
            assert any("Drafter off" in n for n in app.notes)
    asyncio.run(go())


def test_a_folder_with_no_drafter_is_refused_in_the_settings(checkpoint_factory, tmp_path):
    _, path = checkpoint_factory("e")
    (tmp_path / "empty").mkdir()

    async def go():
        app, store = _app(path, tmp_path, Settings())
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            await _set_drafter(pilot, str(tmp_path / "empty"))
            await pilot.pause()
            assert isinstance(app.screen, SettingsScreen)  # stays open, saying what is wrong
            error = str(app.screen.query_one("#error").render())
            assert "no converted drafter there" in error and "leave it empty" in error, error
            app.screen.query_one("#assistant").value = str(path)  # a model, not a drafter
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert "not an assistant drafter" in str(app.screen.query_one("#error").render())
        assert app.backend.settings.assistant == "" and store.load().assistant == ""
    asyncio.run(go())


def test_a_drafter_that_does_not_fit_is_refused_and_the_old_one_kept(checkpoint_factory, tmp_path):
    _, path = checkpoint_factory("e")
    good, bad = _drafter(tmp_path, "good"), _drafter(tmp_path, "bad", head_dim=8)

    async def go():
        app, store = _app(path, tmp_path, Settings(assistant=str(good)))
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.backend.loaded)
            session = app.backend.session
            await _set_drafter(pilot, str(bad))
            await until(pilot, lambda: any("not taken" in n for n in app.notes))
            [note] = [n for n in app.notes if "not taken" in n]
            assert "does not fit" in note and str(good) in note, note
            assert app.backend.settings.assistant == str(good) and store.load().assistant == str(good)
            assert app.backend.session is session  # the drafter in use goes on
    asyncio.run(go())


def test_a_saved_drafter_that_does_not_fit_this_model_is_skipped_and_kept(checkpoint_factory, tmp_path):
    """Started on another model than the drafter was chosen with: the model loads without it, the app says why,
    and the saved drafter stays for the model it fits (a setting saved meanwhile does not clear it)."""
    _, path = checkpoint_factory("e")
    bad = _drafter(tmp_path, "bad", head_dim=8)

    async def go():
        app, store = _app(path, tmp_path, Settings(assistant=str(bad)))
        store.save(Settings(assistant=str(bad)))
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.backend.loaded and any("was not used" in n for n in app.notes))
            [note] = [n for n in app.notes if "was not used" in n]
            assert str(bad) in note and "does not fit" in note and "F2" in note
            assert app.backend.session.assistant is None
            await pilot.press("ctrl+t")   # saves the settings
            await until(pilot, lambda: store.load().enable_thinking)
            assert store.load().assistant == str(bad)
    asyncio.run(go())


def test_a_drafter_folder_that_is_not_there_or_is_a_file_says_so(tmp_path):
    """A missing folder said "no converted drafter there (no config.json)", a file "[Errno 20] Not a directory"."""
    from app.model_source import drafter_dir

    (tmp_path / "afile").write_text("x")
    assert drafter_dir(str(tmp_path / "nope"))[1] == "no such folder"
    assert drafter_dir(str(tmp_path / "afile"))[1] == "that is a file, not a folder"
    (tmp_path / "empty").mkdir()
    assert "no config.json" in drafter_dir(str(tmp_path / "empty"))[1]
