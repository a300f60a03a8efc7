"""The app with an assistant drafter: --assistant is kept as a setting, the backend decodes speculatively with the
same answer, and the status bar shows the share of drafts kept."""

from __future__ import annotations

import json

import pytest

from app.__main__ import main, parse_args
from app.backend import Backend, Finished, LoadFailed, ModelLoaded, Settings, Stats
from app.settings_store import SettingsStore
from app.widgets.status import status_parts
from tests import tiny


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


def test_a_drafter_that_does_not_fit_fails_the_load_with_the_reason(checkpoint_factory, tmp_path):
    _, path = checkpoint_factory("e")
    tiny.make_assistant("e", head_dim=8).save_pretrained(tmp_path / "src", safe_serialization=True)
    backend, posted = _backend(path, Settings(assistant=str(tmp_path / "src")))
    try:
        [failed] = [m for m in posted if isinstance(m, LoadFailed)]
        assert "does not fit" in failed.error
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


def test_a_drafter_folder_that_is_gone_fails_the_load_saying_how_to_turn_it_off(checkpoint_factory, tmp_path):
    _, path = checkpoint_factory("e")
    backend, posted = _backend(path, Settings(assistant=str(tmp_path / "deleted-drafter")))
    try:
        [failed] = [m for m in posted if isinstance(m, LoadFailed)]
        assert "assistant drafter" in failed.error and "--assistant ''" in failed.error, failed.error
    finally:
        backend.shutdown()


def test_a_wrong_assistant_path_is_refused_before_it_is_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("app.app.ChatApp.run", lambda self: pytest.fail("the app started"))
    assert main(["--demo", "--data-dir", str(tmp_path), "--assistant", str(tmp_path / "nope")]) == 2
    assert "--assistant ''" in capsys.readouterr().err
    assert SettingsStore(tmp_path).load().assistant == ""
