"""Which model to load: --model (converted dir or hub id), --demo, or the default converted E4B.

With no --model and no default directory, the app offers to download google/gemma-4-E4B-it and convert it
to 4-bit with the project's converter, after checking the hub can be reached at all.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .backend import LoadFn, Progress

DEFAULT_DIR = Path("models/gemma-4-E4B-it-4bit")
DEFAULT_HUB_ID = "google/gemma-4-E4B-it"
NO_NETWORK = (
    f"The Hugging Face hub cannot be reached, so {DEFAULT_HUB_ID} cannot be downloaded. On a machine with network "
    f"access run `python convert.py --q-bits 4` and copy {DEFAULT_DIR}/ here, start with `--model DIR` pointing "
    "at a converted model, or try the app offline with `--demo`."
)


class ModelNotFound(Exception):
    """--model names a directory that does not exist."""


@dataclass(frozen=True)
class ModelChoice:
    kind: Literal["local", "hub", "demo", "download"]
    source: str  # a directory, a hub id, or "demo"

    @property
    def name(self) -> str:
        return "demo (random weights)" if self.kind == "demo" else Path(self.source).name


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(model: str | None, demo: bool = False) -> ModelChoice:
    if demo:
        return ModelChoice("demo", "demo")
    if model is None:
        return ModelChoice("local", str(DEFAULT_DIR)) if DEFAULT_DIR.is_dir() else ModelChoice("download", DEFAULT_HUB_ID)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} has no config.json, so it is not a converted model. Convert one with "
                                f"`python convert.py --hf-path {DEFAULT_HUB_ID} --mlx-path {path}`.")
        return ModelChoice("local", str(path))
    # "owner/name" is a hub id unless its first part is a local directory (then it is a missing model dir).
    if _HUB_ID.match(model) and not Path(model.split("/")[0]).is_dir():
        return ModelChoice("hub", model)
    raise ModelNotFound(f"Model directory {path} does not exist. Pass --model with a converted model directory "
                        f"or a hub id, convert one with `python convert.py --mlx-path {path}`, or try --demo.")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_fn(choice: ModelChoice) -> LoadFn:
    """The function the backend thread calls to get (model, processor)."""
    if choice.kind == "demo":
        from .demo import build_demo

        return build_demo

    def load(progress: Progress) -> tuple[Any, Any]:
        source = choice.source
        if choice.kind == "download":
            source = str(download_and_convert(progress))
        elif choice.kind == "hub" and not hub_reachable():
            raise RuntimeError(f"{choice.source} is not a local directory and the hub cannot be reached. "
                               "Pass --model with a converted model directory, or try --demo.")
        from mlx_gemma4 import load as load_model

        progress(0, 0, f"Loading {Path(source).name}…")
        return load_model(source, progress=progress)

    return load


def download_and_convert(progress: Progress, dest: Path = DEFAULT_DIR) -> Path:
    """Run the project's converter (download + 4-bit), reporting its progress lines."""
    if not hub_reachable():
        raise RuntimeError(NO_NETWORK)
    convert = next((p for p in (Path.cwd() / "convert.py", Path(__file__).resolve().parents[1] / "convert.py")
                    if p.exists()), None)
    if convert is None:
        raise RuntimeError("convert.py was not found; run the app from the mlx-gemma4 checkout, or pass --model.")
    cmd = [sys.executable, str(convert), "--hf-path", DEFAULT_HUB_ID, "--mlx-path", str(dest), "--q-bits", "4"]
    progress(0, 100, f"Downloading and converting {DEFAULT_HUB_ID}…")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    line = ""
    assert proc.stdout is not None
    while ch := proc.stdout.read(1):
        if ch not in "\r\n":
            line += ch
            continue
        if line.strip():
            tail = (tail + [line.strip()])[-5:]
            pct = re.search(r"(\d+)%", line)
            progress(int(pct.group(1)) if pct else 0, 100, line.strip()[:100])
        line = ""
    if proc.wait() != 0:
        raise RuntimeError("Conversion failed:\n" + "\n".join(tail))
    return dest
