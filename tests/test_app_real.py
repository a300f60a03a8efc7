"""The app on the real backend: mlx_gemma4's loader and ChatSession over a tiny random-weight checkpoint.

The checkpoint is built with MLX itself (config.json + mlx-layout safetensors + the test tokenizer), so these
tests need neither torch nor the network. Greedy decoding keeps the random model's output repeatable.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from app.app import ChatApp
from app.backend import Backend, Settings
from app.history import History
from app.model_source import load_fn, resolve
from app.widgets.messages import ModelMessage
from app.widgets.prompt import PromptArea

TEXT_CONFIG = {
    "model_type": "gemma4_text", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    "pad_token_id": 0, "eos_token_id": [1, 106], "bos_token_id": 2, "tie_word_embeddings": True,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1000000.0}},
    "sliding_window": 8, "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 0,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "num_kv_shared_layers": 0, "attention_k_eq_v": False, "enable_moe_block": False, "use_double_wide_mlp": False,
}
CONFIG = {"model_type": "gemma4", "text_config": TEXT_CONFIG, "vision_config": None, "audio_config": None,
          "boi_token_id": 255, "eoi_token_id": 382, "image_token_id": 380, "video_token_id": 384,
          "boa_token_id": 256, "eoa_token_index": 383, "audio_token_id": 381, "tie_word_embeddings": True}


def build_tiny_checkpoint(path: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.model import Gemma4
    from tests.fixtures_tokenizer import make_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    mx.random.seed(0)
    model = Gemma4(ModelConfig.from_dict(CONFIG))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gemma4"))


def real_app(model_dir: Path, data: Path, **settings) -> ChatApp:
    choice = resolve(str(model_dir))
    backend = Backend(choice.name, load_fn(choice), settings=Settings(temperature=0.0, **settings))
    return ChatApp(backend, History(data))


async def wait_for(pilot, cond, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await pilot.pause(0.02)


async def send(pilot, text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.text = text
    await pilot.press("enter")


def test_send_stream_resume_on_real_model(tiny_dir, tmp_path):
    async def go():
        app = real_app(tiny_dir, tmp_path, max_tokens=24)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            assert "ctx 0/512" in str(app.chat_screen.query_one("#status").render())
            await send(pilot, "hello world")
            chat = app.chat_screen
            await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
            status = str(chat.query_one("#status").render())
            assert "TTFT" in status and "tok/s" in status
            answer = chat.query_one(ModelMessage).answer
            assert app.backend.session.messages[-1]["role"] == "assistant"
            used = app.backend.context()[0]
            assert used > 10
            await send(pilot, "is it")
            await wait_for(pilot, lambda: not chat.generating and len(chat.query(ModelMessage)) == 2)
            assert app.backend.context()[0] > used
        # After a restart, --resume brings the conversation back into a fresh session.
        app2 = real_app(tiny_dir, tmp_path, max_tokens=8)
        app2.resume_id = True
        async with app2.run_test() as pilot:
            await wait_for(pilot, lambda: app2.backend.loaded and len(app2.backend.session.messages) == 4)
            assert app2.chat_screen.query(ModelMessage).first().answer == answer
            await send(pilot, "and then")
            await wait_for(pilot, lambda: len(app2.chat_screen.query(ModelMessage)) == 3
                           and not app2.chat_screen.generating)
            assert len(app2.backend.session.messages) == 6

    asyncio.run(go())


def test_cancel_on_real_model(tiny_dir, tmp_path):
    async def go():
        app = real_app(tiny_dir, tmp_path, max_tokens=480)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "count")
            chat = app.chat_screen
            await wait_for(pilot, lambda: chat.current is not None and chat.current.answer)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not chat.generating)
            msg = chat.query_one(ModelMessage)
            saved = app.history.messages(chat.conversation_id)[-1]
            assert saved.stats["finish"] in ("cancelled", "stop")  # a random model may stop by itself first
            if saved.stats["finish"] == "cancelled":
                assert msg.note == "stopped" and saved.stats["generation_tokens"] < 480
            assert saved.content == msg.answer

    asyncio.run(go())


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    from app.__main__ import main

    assert main(["--model", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--demo" in err
