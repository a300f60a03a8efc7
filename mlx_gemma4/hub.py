"""Local directory or Hugging Face hub repo id -> local directory, downloading only the files a model needs."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

# Config, safetensors (+ index), tokenizer, processor and chat-template files. Never pickles (*.bin, *.pt),
# never code (*.py): nothing executable comes from the hub.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_source(path_or_repo: object, what: str = "The model") -> None:
    """``path_or_repo`` must be a non-empty path or repo id: an empty string would otherwise mean the current
    folder, and None or a number a TypeError deep in pathlib."""
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a directory path or a hub repo id like 'google/gemma-4-E4B-it'; got "
                          f"{type(path_or_repo).__name__} {path_or_repo!r:.60}.")
    if not str(os.fspath(path_or_repo)).strip():
        raise ConfigError(f"{what} path is empty; pass a model directory or a hub repo id like "
                          "'google/gemma-4-E4B-it' (is a shell variable unset?).")


def resolve(path_or_repo: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
            local_files_only: bool = False) -> Path:
    """A local directory holding the model: ``path_or_repo`` itself, or a hub snapshot of it.

    The hub download shows huggingface_hub's own progress bars; it honours HF_HUB_OFFLINE and HF_HUB_CACHE.
    """
    check_source(path_or_repo)
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} is a file; pass the model directory that holds config.json.")
        return path
    s = str(path_or_repo)
    if not _is_repo_id(s):
        raise ConfigError(f"{s} is neither a local directory nor a hub repo id like 'google/gemma-4-E4B-it'.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    logger.info("Fetching %s from the Hugging Face hub (only %s)", s, ", ".join(ALLOW_PATTERNS))
    # 'models/gemma-4-E4B-it-4bit' is a local path and a repo id alike: a typo in the path ends up here
    no_folder = f" There is no folder {path.absolute()} either; if you meant a local model, check the path."
    try:
        out = snapshot_download(s, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS,
                                local_files_only=local_files_only)
    except RepositoryNotFoundError as e:
        raise ConfigError(f"The hub has no repo {s!r} (or it is gated: run `hf auth login`). Check the name."
                          + no_folder) from e
    except LocalEntryNotFoundError as e:
        switch = _offline_switch()
        if switch:
            fix = f"{switch} is set, so nothing is downloaded: unset it (and connect to the network), then try again."
        elif local_files_only:
            fix = "Downloading was turned off for this call (local_files_only); allow it, then try again."
        else:
            fix = "Check the network connection, then try again."
        raise WeightsError(f"{s} is not in the local hub cache and downloading is off or failed ({e}). {fix}"
                           + no_folder) from e
    except HfHubHTTPError as e:
        raise WeightsError(f"Downloading {s} failed: {e}. Try again, or download it and pass the directory.") from e
    except ValueError as e:   # huggingface_hub's HFValidationError: a name the hub refuses
        raise ConfigError(f"{s} is neither a local directory nor a valid hub repo id ({e})." + no_folder) from e
    return Path(out)


def _is_repo_id(s: str) -> bool:
    """``owner/name`` as the hub spells repo ids; './x', '../x' or '~/x' (a path that is not there) never is."""
    return bool(_REPO_ID.match(s)) and not any(part in (".", "..") or part.startswith("..") for part in s.split("/"))


def _offline_switch() -> str | None:
    """The environment variable that keeps huggingface_hub from downloading, if one is set."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # as huggingface_hub reads them
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None
