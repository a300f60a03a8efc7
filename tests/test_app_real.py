"""The app on the real backend: mlx_gemma4's loader and ChatSession over the demo model saved to disk.

mlx_gemma4.demo builds the model (tiny random weights, real tokenizer pipeline, Gemma 4 chat template); its
weights are saved in MLX layout so the app loads them with `--model DIR` as it would a converted checkpoint.
Needs neither torch nor the network. Greedy decoding keeps the random model's output repeatable.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.app import ChatApp
from app.backend import Backend, Settings
from app.history import History
from app.model_source import load_fn, resolve
from app.screens.confirm import ConfirmScreen
from app.widgets.messages import ModelMessage, Notice, UserMessage
from app.widgets.status import status_parts
from tests.app_helpers import send
from tests.app_helpers import until as wait_for


def save_demo_checkpoint(path: Path) -> Path:
    """The demo model as a converted model directory: config, tokenizer files and MLX-layout weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gemma4.demo import build_demo

    model, _ = build_demo(seed=0, path=path)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_demo_checkpoint(tmp_path_factory.mktemp("demo-gemma4"))


def real_app(model_dir: Path, data: Path, **settings) -> ChatApp:
    choice = resolve(str(model_dir))
    backend = Backend(choice.name, load_fn(choice), settings=Settings(temperature=0.0, **settings))
    return ChatApp(backend, History(data))


def test_send_stream_resume_on_real_model(tiny_dir, tmp_path):
    async def go():
        app = real_app(tiny_dir, tmp_path, max_tokens=24, system_prompt="Be brief.")
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            # The status bar hears of the load through a message, a moment after the backend flag flips; a new
            # conversation's count is its system prompt's.
            system = app.backend.session.count_tokens([{"role": "system", "content": "Be brief."}])
            await wait_for(pilot, lambda: f"ctx {system}/4096" in str(app.chat_screen.query_one("#status").render()))
            await send(pilot, "hello world")
            chat = app.chat_screen
            await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
            status = str(chat.query_one("#status").render())
            assert "TTFT" in status and "tok/s" in status
            answer = chat.query_one(ModelMessage).answer
            used = app.backend.session.context_used
            assert used > 10
            await send(pilot, "is it")
            await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 2)
            assert app.backend.session.context_used > used
            assert app.backend.session.last_reused > 10  # the first turn came from the cache
        # After a restart, --resume brings the conversation (system prompt included) back from history.
        app2 = real_app(tiny_dir, tmp_path, max_tokens=8)
        app2.resume_id = True
        async with app2.run_test() as pilot:
            await wait_for(pilot, lambda: app2.backend.loaded and app2.chat_screen.query(ModelMessage))
            assert app2.chat_screen.query(ModelMessage).first().answer == answer
            await send(pilot, "and then")
            await wait_for(pilot, lambda: len(app2.chat_screen.query(ModelMessage)) == 3
                           and not app2.chat_screen.generating)
            cid = app2.chat_screen.conversation_id
            assert app2.history.get(cid).system_prompt == "Be brief."
            assert [m.role for m in app2.history.messages(cid)] == ["user", "assistant"] * 3

    asyncio.run(go())


def test_cancel_on_real_model(tiny_dir, tmp_path):
    async def go():
        # Long enough (thousands of tokens) that Esc lands mid-answer even when decoding is fast.
        app = real_app(tiny_dir, tmp_path, max_tokens=3500)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "count")
            chat = app.chat_screen
            # Text has streamed in (answer or thinking), or a random model already stopped by itself.
            await wait_for(pilot, lambda: (chat.current is not None and (chat.current.answer or chat.current.thinking))
                           or (not chat.generating and chat.query(ModelMessage)))
            await pilot.press("escape")
            await wait_for(pilot, lambda: not chat.generating)
            msg = chat.query_one(ModelMessage)
            saved = app.history.messages(chat.conversation_id)[-1]
            assert saved.stats["finish"] in ("cancelled", "stop")  # a random model may stop by itself first
            if saved.stats["finish"] == "cancelled":
                assert msg.note == "stopped" and saved.stats["generation_tokens"] < 3500
            assert saved.content == msg.answer

    asyncio.run(go())


def test_message_that_does_not_fit_goes_back_to_the_prompt(tiny_dir, tmp_path):
    async def go():
        app = real_app(tiny_dir, tmp_path, max_tokens=4)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            app.backend.model.config.text_config.max_position_embeddings = 64  # a context the test can fill
            chat = app.chat_screen
            await send(pilot, "hi")
            await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
            long = " ".join(["hello world"] * 80)
            await send(pilot, long)
            # The message alone is too long: no offer to drop turns (it would not help), a clear notice instead.
            await wait_for(pilot, lambda: any("does not fit" in str(n.render()) for n in chat.query(Notice)))
            assert app.screen is chat
            assert chat.prompt.text == long and chat.prompt.cursor_location == chat.prompt.document.end
            assert [m.role for m in app.history.messages(chat.conversation_id)] == ["user", "assistant"]
            assert len(chat.query(UserMessage)) == 1
            await send(pilot, "ok")
            await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 2)
            assert [m.role for m in app.history.messages(chat.conversation_id)] == ["user", "assistant"] * 2

    asyncio.run(go())


def test_a_system_prompt_that_alone_does_not_fit_is_named(tiny_dir, tmp_path):
    """The notice blamed the message ("That message does not fit") for a system prompt too long on its own."""
    async def go():
        app = real_app(tiny_dir, tmp_path, max_tokens=4, system_prompt=" ".join(["hello world"] * 40))
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            app.backend.model.config.text_config.max_position_embeddings = 64  # a context the test can fill
            chat = app.chat_screen
            await send(pilot, "hi")
            await wait_for(pilot, lambda: any("system prompt alone" in str(n.render()) for n in chat.query(Notice)))
            notice = next(str(n.render()) for n in chat.query(Notice) if "system prompt alone" in str(n.render()))
            assert notice.startswith("The system prompt alone is") and chat.prompt.text == "hi"

    asyncio.run(go())


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    from app.__main__ import main

    assert main(["--model", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--demo" in err


def test_model_that_is_no_model_dir_is_refused_before_the_app_opens(tiny_dir, tmp_path, capsys, monkeypatch):
    """A file, an empty --model, a folder of another model family and a Gemma 4 folder without its weights each
    get their own message on the command line (they used to say "does not exist", suggest converting into ".", or
    open an app that could do nothing)."""
    import shutil

    from app.__main__ import main

    monkeypatch.setattr("app.app.ChatApp.run", lambda self: pytest.fail("the app opened"))
    (tmp_path / "no-weights").mkdir()
    shutil.copy(tiny_dir / "config.json", tmp_path / "no-weights" / "config.json")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    (tmp_path / "weights.bin").write_bytes(b"x")
    cases = {str(tmp_path / "weights.bin"): "is a file, not a model directory",
             str(tmp_path / "llama" / "config.json"): f"--model {tmp_path / 'llama'}",
             "": "--model is empty",
             str(tmp_path / "llama"): "model_type='llama'",
             str(tmp_path / "no-weights"): "No *.safetensors weight files"}
    for model, said in cases.items():
        assert main(["--model", model, "--data-dir", str(tmp_path / "data")]) == 2
        err = capsys.readouterr().err
        assert said in err and "does not exist" not in err, err


def test_a_folder_without_a_model_gets_advice_that_works(tmp_path, capsys, monkeypatch):
    """A folder of the user's files was told to convert into itself, which convert.py refuses (it never writes
    into a folder that holds other files); an empty one may be the destination."""
    from app.__main__ import main

    monkeypatch.setattr("app.app.ChatApp.run", lambda self: pytest.fail("the app opened"))
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"x")
    empty.mkdir()
    assert main(["--model", str(photos), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and f"--mlx-path {photos} " not in err and "--mlx-path models/" in err, err
    assert main(["--model", str(empty), "--data-dir", str(tmp_path / "data")]) == 2
    assert f"--mlx-path {empty} " in capsys.readouterr().err


def test_both_entry_points_start(tmp_path):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "gemma4-chat"
    for cmd in ([sys.executable, "-m", "app"], [str(script)] if script.exists() else None):
        if cmd is None:  # the console script appears with `pip install -e .`
            continue
        out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--demo" in out.stdout and "--resume" in out.stdout


def test_typed_placeholders_regenerate_stats_and_dropping_turns(tiny_dir, tmp_path):
    async def go():
        app = real_app(tiny_dir, tmp_path, max_tokens=6)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            chat = app.chat_screen
            status = chat.query_one("#status")
            # A placeholder typed as text is text (it used to fail the turn with a placeholder-count error).
            await send(pilot, "what does <|image|> or <turn|> mean?")
            await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
            assert not [n for n in chat.query(Notice) if "failed" in str(n.render())]
            # A saved answer with a placeholder in it (as a model may write one) does not break the next turn.
            cid = chat.conversation_id
            app.history.add_message(cid, "user", "and?")
            app.history.add_message(cid, "assistant", "see <|audio|> here")
            app.resume(cid)
            await send(pilot, "go on")
            await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 3)
            assert not [n for n in chat.query(Notice) if "failed" in str(n.render())]
            # Regenerate: the status describes the new answer; the whole prompt came from the cache.
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 3)
            assert status.stats.cached_tokens > 10 and status.stats.prompt_tokens == 0
            parts = [full for _, full, _ in status_parts("m", "", False, status.stats)]
            assert f"prompt {status.stats.cached_tokens} cached" in parts
            assert status.stats.generation_tokens >= 1
            assert [m.role for m in app.history.messages(cid)] == ["user", "assistant"] * 3
            # A conversation that outgrew the context: the offer names how many turns to drop, no API names.
            app.backend.model.config.text_config.max_position_embeddings = 110
            await send(pilot, "one more question please")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            question = str(app.screen.query_one("#question").render())
            assert "oldest" in question and "drop_oldest_turns" not in question
            # Asked unasked, while the user may be typing: a typed y or Enter keeps the turns (they answered Yes
            # and deleted every turn of a long conversation for good).
            await pilot.press("y", "enter")
            await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
            assert len(app.history.messages(cid)) == 6
            await send(pilot, "one more question please")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("shift+tab", "enter")   # Yes, chosen
            await wait_for(pilot, lambda: status.stats.context_used and status.stats.context_used < 110)
            assert len(app.history.messages(cid)) < 6
            assert len(chat.query(UserMessage)) == len([m for m in app.history.messages(cid) if m.role == "user"])

    asyncio.run(go())
