"""Settings that outlive a run (thinking, sampling, system prompt): a small JSON file in the data folder."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from .backend import IMAGE_TOKENS, Settings

log = logging.getLogger(__name__)


class SettingsStore:
    """`load()` gives the saved Settings (defaults for what is missing or unreadable); `save()` writes them."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "settings.json"

    def load(self) -> Settings:
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Settings()
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.path, e)
            return Settings()
        from .screens.settings import FIELDS, allowed, fits  # the ranges the screen and the command line accept

        ranged = {key for key, *_ in FIELDS}
        defaults = Settings()
        values = {}
        for f in dataclasses.fields(Settings):
            value = saved.get(f.name) if isinstance(saved, dict) else None
            default = getattr(defaults, f.name)
            # A hand-edited file with a wrong type, or a number out of range, falls back to the default for that
            # field only.
            if type(value) is type(default) or (type(default) is float and type(value) is int):
                if f.name == "image_tokens" and value not in IMAGE_TOKENS:
                    log.warning("ignoring image_tokens=%r in %s: not one of %s", value, self.path, IMAGE_TOKENS)
                    continue
                if f.name in ranged and not fits(f.name, value):
                    log.warning("ignoring %s=%r in %s: not %s", f.name, value, self.path, allowed(f.name))
                    continue
                values[f.name] = type(default)(value)
        return dataclasses.replace(defaults, **values)

    def save(self, settings: Settings) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(settings), indent=1))
        tmp.replace(self.path)
