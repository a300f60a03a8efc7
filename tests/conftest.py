"""Shared fixtures: tiny reference checkpoints on disk (transformers model + our tokenizer fixture)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import tiny


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
