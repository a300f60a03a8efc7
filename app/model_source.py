"""Which model to load: --model (a converted dir, the name of a known conversion, or a hub id), --demo, or the
converted E4B found wherever it was written.

Converted models live in the user data folder (`<data>/models/`, where the app converts E4B itself), and the app
also finds `convert.py`'s outputs elsewhere: every directory it has loaded or converted is remembered in
`<data>/models.json`, and the `models/` folders beside the checkout and in the current folder are looked at
(read only: nothing is ever written relative to the current folder). A directory counts as a conversion when it
holds the converter's marker file or a config.json that the converter wrote.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from .backend import LoadFn, Progress

DEFAULT_NAME = "gemma-4-E4B-it-4bit"
DEFAULT_HUB_ID = "google/gemma-4-E4B-it"
MARKERS = (".mlx-gemma4-conversion.json", ".mlx-gemma4.json")
REGISTRY = "models.json"
CHECKOUT = Path(__file__).resolve().parents[1]


class ModelNotFound(Exception):
    """--model names neither a directory, a known conversion nor a hub id."""


@dataclass(frozen=True)
class ModelChoice:
    kind: Literal["local", "hub", "demo", "download"]
    source: str  # a directory, a hub id, or "demo"

    @property
    def name(self) -> str:
        return "demo (random weights)" if self.kind == "demo" else Path(self.source).name


# -- where conversions are ---------------------------------------------------------------------------


def drafter_dir(folder: str) -> tuple[str, str | None]:
    """(the folder as saved, resolved; what is wrong with it or None): a drafter setting must name the folder
    convert.py wrote for an assistant drafter ("" turns it off and is always fine)."""
    if not folder.strip():
        return "", None
    path = Path(folder.strip()).expanduser().resolve()
    if not path.exists():
        return str(path), "no such folder"
    if not path.is_dir():
        return str(path), "that is a file, not a folder"
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        return str(path), "no converted drafter there (no config.json)"
    except (OSError, ValueError, AttributeError) as e:
        return str(path), f"its config.json cannot be read ({e})"
    from mlx_gemma4.assistant import ASSISTANT_TYPES

    if model_type not in ASSISTANT_TYPES:
        return str(path), f"that is not an assistant drafter (config.json has model_type={model_type!r})"
    return str(path), None


def models_dir(data: Path) -> Path:
    return data / "models"


def is_conversion(d: Path) -> bool:
    """A directory this project's converter wrote (its marker file, or the `mlx_gemma4` block of config.json)."""
    if not d.is_dir():
        return False
    if any((d / m).is_file() for m in MARKERS):
        return True
    try:
        return "mlx_gemma4" in json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False


def remembered(data: Path) -> list[Path]:
    try:
        return [Path(p) for p in json.loads((data / REGISTRY).read_text())]
    except (OSError, ValueError, TypeError):
        return []


def remember(data: Path, model_dir: Path) -> None:
    """Add a loaded or converted directory to the registry, so it is found from any folder."""
    path = model_dir.expanduser().resolve()
    known = [p for p in remembered(data) if p != path]
    data.mkdir(parents=True, exist_ok=True)
    (data / REGISTRY).write_text(json.dumps([str(p) for p in [path, *known]], indent=1))


def find_conversions(data: Path, cwd: Path | None = None) -> list[Path]:
    """Every conversion found: remembered ones, then `<data>/models/*`, the checkout's and the current folder's
    `models/*`; newest first, each once."""
    candidates = list(remembered(data))
    for root in (models_dir(data), CHECKOUT / "models", (cwd or Path.cwd()) / "models"):
        if root.is_dir():
            candidates += sorted(root.iterdir())
    seen, found = set(), []
    for d in candidates:
        key = d.resolve() if d.exists() else d
        if key not in seen and is_conversion(d):
            seen.add(key)
            found.append(d)
    return sorted(found, key=lambda d: (d / "config.json").stat().st_mtime, reverse=True)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(model: str | None, demo: bool = False, data: Path | None = None, cwd: Path | None = None) -> ModelChoice:
    """What to load. No --model: the default E4B conversion, else the newest conversion found, else "download"."""
    if demo:
        return ModelChoice("demo", "demo")
    found = find_conversions(data, cwd) if data is not None else []
    if model is None:
        best = next((d for d in found if d.name == DEFAULT_NAME), found[0] if found else None)
        return ModelChoice("local", str(best)) if best else ModelChoice("download", DEFAULT_HUB_ID)
    if not model.strip():
        raise ModelNotFound("--model is empty. Pass a converted model directory, its name, or a hub id; "
                            "leave --model out to use the default model; or try --demo.")
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "config.json").exists():
            # (into a folder of its own: convert.py never writes into one that holds other files)
            target = path if not any(path.iterdir()) else Path("models") / f"{DEFAULT_HUB_ID.split('/')[-1]}-4bit"
            raise ModelNotFound(f"{path} has no config.json, so it is not a converted model. Convert one with "
                                f"`python convert.py --hf-path {DEFAULT_HUB_ID} --mlx-path {target} --q-bits 4` and "
                                f"pass that folder to --model.")
        _check_config(path)
        return ModelChoice("local", str(path))
    if path.exists():  # a file (config.json itself, a .safetensors shard, ...) rather than the folder
        hint = (f" Pass the folder that holds it: --model {path.parent}" if path.name == "config.json"
                or path.suffix in (".safetensors", ".json") else "")
        raise ModelNotFound(f"{path} is a file, not a model directory.{hint or ' Pass the folder convert.py wrote.'}")
    named = next((d for d in found if d.name == model), None)
    if named is not None:
        return ModelChoice("local", str(named))
    # "owner/name" is a hub id unless its first part is a local directory (then it is a missing model dir).
    if _HUB_ID.match(model) and not Path(model.split("/")[0]).is_dir():
        return ModelChoice("hub", model)
    known = ", ".join(d.name for d in found) or "none found yet"
    what = (f"Model directory {path} does not exist" if model.startswith(("/", ".", "~")) or model.count("/") > 1
            else f"{model} is neither a directory nor the name of a converted model")
    raise ModelNotFound(f"{what} (converted models: {known}). Pass --model with a converted model directory, "
                        f"its name, or a hub id; convert one with `python convert.py --q-bits 4`; or try --demo.")


def _check_config(path: Path) -> None:
    """Refuse, before the app opens, a folder whose config.json is not a Gemma 4 model's, or that has no weights
    (the loader's own checks: one message for the command line and for load())."""
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.errors import ConfigError, WeightsError
    from mlx_gemma4.weights import safetensors_files

    try:
        ModelConfig.from_file(path)
        safetensors_files(path)
    except (ConfigError, WeightsError) as e:
        raise ModelNotFound(f"{path}: {e}") from e


# -- the hub -----------------------------------------------------------------------------------------


def offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if offline_env():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_message(dest: Path) -> str:
    """Why E4B cannot be fetched and what to do instead; HF_HUB_OFFLINE is named only when it is set."""
    why = ("HF_HUB_OFFLINE is set, so the Hugging Face hub is not used. Unset it to download."
           if offline_env() else "The Hugging Face hub cannot be reached from here.")
    return (f"{why}\n\nOn a machine with network access: accept the Gemma licence on the model's hub page "
            f"({DEFAULT_HUB_ID}), log in with `hf auth login`, run `python convert.py --q-bits 4`, and copy the "
            f"output folder to {dest}. Or start with `--model DIR` naming a converted model.")


# -- download and convert, in this process, with real progress ---------------------------------------


def _progress_tqdm(progress: Progress, what: str, every: float = 0.1) -> type:
    """A tqdm class for huggingface_hub that draws nothing and forwards its byte counts to `progress`."""
    from tqdm import tqdm

    class Forward(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # the app draws it, the terminal must not
            super().__init__(*args, **kwargs)
            self._sent = 0.0

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            # Bytes only (the per-file count bar is coarse); the transfer bar duplicates the written one.
            if self.unit == "B" and not str(self.desc).startswith("Downloading bytes"):
                now = time.monotonic()
                if now - self._sent >= every or (self.total and self.n >= self.total):
                    self._sent = now
                    progress(int(self.n), int(self.total or 0), what)
            return out

    return Forward


Fetch = Callable[..., str]
Convert = Callable[..., Path]


def download_and_convert(progress: Progress, dest: Path, repo: str = DEFAULT_HUB_ID, *,
                         fetch: Fetch | None = None, convert: Convert | None = None) -> Path:
    """Fetch `repo` with huggingface_hub and convert it to 4-bit into `dest`, reporting both through `progress`."""
    if fetch is None:
        from huggingface_hub import snapshot_download as fetch
    if convert is None:
        from mlx_gemma4.conversion import convert
    from mlx_gemma4.hub import ALLOW_PATTERNS

    progress(0, 0, f"Downloading {repo}…")
    src = fetch(repo, allow_patterns=ALLOW_PATTERNS, tqdm_class=_progress_tqdm(progress, f"Downloading {repo}"))
    progress(0, 0, "Converting to 4-bit…")
    return Path(convert(src, dest, q_bits=4, force=False,
                        progress=lambda done, total, name: progress(done, total, f"Converting to 4-bit: {name}")))


def load_fn(choice: ModelChoice, data: Path | None = None) -> LoadFn:
    """The function the backend thread calls to get (model, processor)."""
    if choice.kind == "demo":
        from .demo import build_demo

        return build_demo

    def load(progress: Progress) -> tuple[Any, Any]:
        source = choice.source
        if choice.kind == "download":
            assert data is not None, "downloading needs the data folder"
            dest = models_dir(data) / DEFAULT_NAME
            source = str(download_and_convert(progress, dest, choice.source))
        elif choice.kind == "hub" and not hub_reachable():
            raise RuntimeError(f"{choice.source} is not a local directory and the hub cannot be reached. "
                               "Pass --model with a converted model directory, or try --demo.")
        from mlx_gemma4 import load as load_model

        progress(0, 0, f"Loading {Path(source).name}…")
        out = load_model(source, progress=progress)
        if data is not None and choice.kind in ("local", "download"):
            remember(data, Path(source))
        return out

    return load
