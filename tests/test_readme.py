"""Every Python block of README.md runs verbatim, each in a fresh interpreter.

The blocks name a converted model under ``models/`` and media files (``cat.jpg``, ...); the test runs them in a
folder where those names exist: the model path is a tiny checkpoint with vision and audio towers converted by our
converter (a path with "assistant" in its name: a tiny drafter for it, converted the same way), and each media
file named in a block is generated (an image, a WAV clip, a short video).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
_QUOTED = re.compile(r"""["']([^"'\n]+)["']""")


def _make_media(name: str, folder: Path) -> None:
    from PIL import Image

    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    rng = np.random.default_rng(0)
    if ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    elif ext in (".wav", ".flac", ".ogg"):
        import soundfile as sf

        sf.write(path, (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    elif ext in (".mp4", ".mov", ".mkv", ".webm", ".avi"):
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("mpeg4", rate=2)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for _ in range(2):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from mlx_gemma4.conversion import convert
    from tests.fixtures_tokenizer import make_tokenizer
    from tests.tiny import AUDIO, VISION, make_model, save_checkpoint

    base = tmp_path_factory.mktemp("readme")
    src = save_checkpoint(make_model("e", vision=VISION, audio=AUDIO), base / "hf")
    make_tokenizer(src)
    model_dir = convert(src, base / "converted", dtype="float32")
    from tests.tiny import make_assistant

    make_assistant("e", ordered=True).save_pretrained(base / "hf-assistant", safe_serialization=True)
    convert(base / "hf-assistant", base / "converted-assistant", dtype="float32")
    work = base / "work"
    work.mkdir()
    return work, model_dir


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_verbatim(workdir, index):
    work, model_dir = workdir
    code = BLOCKS[index]
    for name in set(_QUOTED.findall(code)):
        target = work / name
        if name.startswith("models/"):
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = model_dir.with_name("converted-assistant") if "assistant" in name else model_dir
                target.symlink_to(source, target_is_directory=True)
        elif re.search(r"\.(jpe?g|png|webp|bmp|gif|wav|flac|ogg|mp4|mov|mkv|webm|avi)$", name, re.I):
            if not target.exists():
                _make_media(name, work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


def test_every_error_the_readme_names_is_importable_from_the_package():
    """The README listed MissingFileError and CacheError among the package's errors; importing them from
    mlx_gemma4 was an AttributeError."""
    import mlx_gemma4

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"`(?:mlx_gemma4\.)?(\w+Error)`", text[text.index("- Errors are"):][:400])
    assert {"Gemma4Error", "MissingFileError", "CacheError", "OutputError"} <= set(listed)
    for name in listed:
        assert issubclass(getattr(mlx_gemma4, name), mlx_gemma4.Gemma4Error), name
