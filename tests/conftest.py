"""Shared fixtures: tiny reference models in memory and checkpoints on disk (transformers model + our tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import helpers, tiny


@pytest.fixture(scope="session")
def text_pair():
    """(transformers model, our Gemma4 with its weights) for a tiny text family, built once per session."""
    made: dict = {}

    def get(family: str = "e"):
        if family not in made:
            made[family] = helpers.build(family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build (once per session and family) a tiny HF checkpoint dir with tokenizer files; returns (hf_model, dir)."""
    made: dict = {}

    def make(family: str = "e", vision: dict | None = None, audio: dict | None = None, seed: int = 0, **kw):
        key = (family, repr(vision), repr(audio), seed, repr(sorted(kw.items())))
        if key not in made:
            from tests.fixtures_tokenizer import make_tokenizer

            model = tiny.make_model(family, vision=vision, audio=audio, seed=seed, **kw)
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            tiny.save_checkpoint(model, path)
            make_tokenizer(path)
            made[key] = (model, path)
        return made[key]

    return make


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def write_bomb_png(path, side: int = 30_000):
    """A valid 1-bit side x side PNG (~110 KB for 30,000): over Pillow's decompression-bomb limit."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + 1 bit per pixel
    idat = b"".join([z.compress(row * 1000) for _ in range(side // 1000)] + [z.compress(row * (side % 1000)),
                                                                              z.flush()])
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def bomb_png(tmp_path_factory):
    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "huge.png")


@pytest.fixture(scope="session")
def converted_towers(checkpoint_factory, tmp_path_factory):
    """A tiny E-family checkpoint with vision and audio towers (the audio one takes real 128-bin log-mel
    features), converted by our converter in float32."""
    from mlx_gemma4.conversion import convert
    from tests.tiny import AUDIO_128, VISION

    _, src = checkpoint_factory("e", vision=VISION, audio=AUDIO_128)
    return convert(src, tmp_path_factory.mktemp("converted") / "tiny-gemma4", dtype="float32")


@pytest.fixture(scope="module")
def drafters():
    """family -> a tiny random assistant drafter of that family (ours), made once per test module."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = helpers.assistant_from(tiny.make_assistant(family, ordered=family == "e"))
        return made[family]

    return get
