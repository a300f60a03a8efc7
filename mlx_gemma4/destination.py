"""Where a conversion goes: what may be replaced, the marker that makes an output recognisable, the temp dir.

A conversion is written into a hidden directory beside the destination (``.NAME.tmp-XXXXXXXX``) and renamed into
place at the end. Every output (and every temp dir, from its first moment) holds ``MARKER``, a small JSON file
naming this converter and, once finished, the files it wrote. ``--force`` replaces only a directory that holds
exactly those files (an earlier output of this converter), never the source checkpoint nor a directory that
contains it or lies inside it. Temp dirs of runs that died (SIGKILL, a power cut) are removed by the next run for
the same destination; the marker is always the last file removed, so a half-removed directory stays recognisable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError, preview

logger = logging.getLogger(__name__)

MARKER = "mlx_gemma4_conversion.json"
CONVERTER = "mlx-gemma4 convert.py"
FORMAT_VERSION = 1
# Files the operating system drops into folders that a user browsed; never the user's work.
_OS_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
# What this converter wrote before it wrote MARKER (config.json then carries an "mlx_gemma4" section).
_LEGACY = re.compile(r"^(config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                     r"per_layer_embeddings\.safetensors|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|"
                     r"special_tokens_map\.json|added_tokens\.json|processor_config\.json|"
                     r"preprocessor_config\.json|chat_template\.jinja|chat_template\.json|generation_config\.json)$")


def resolve_destination(mlx_path: str | Path) -> Path:
    """The absolute destination ('.', '..', '~' and symlinks resolved), refusing paths that have no name."""
    dst = Path(mlx_path).expanduser().resolve()
    if not dst.name:
        raise OutputError(f"--mlx-path {mlx_path} is the filesystem root; pick a directory for the conversion.")
    return dst


def check_destination(dst: Path, force: bool) -> None:
    """Refuse (OutputError, naming what would be lost) anything but a new, empty or earlier-output directory."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise OutputError(f"--mlx-path {dst} is a file, not a directory; nothing was changed. Pick a directory "
                          "path for the conversion.")
    if not dst.exists():
        above = next((p for p in dst.parents if p.exists()), None)   # the nearest folder there is ...
        if above is not None and not above.is_dir():                # ... is a file: nothing can be made under it
            raise OutputError(f"--mlx-path {dst}: {above} is a file, not a directory; nothing was changed. Pick a "
                              "directory path for the conversion.")
        return
    entries = sorted(p.name for p in dst.iterdir())
    if not [n for n in entries if n not in _OS_FILES]:   # empty, or only what Finder or Explorer put there
        return
    ours = written_by_us(dst)
    if ours is None:
        raise OutputError(
            f"--mlx-path {dst} already holds {preview(entries, 4)} and is not an output of convert.py, so it is "
            "never replaced (not even with --force). Pick another --mlx-path, or empty that directory yourself.")
    foreign = _foreign(entries, ours)
    if foreign:
        raise OutputError(
            f"--mlx-path {dst} is an earlier conversion but also holds files convert.py did not write "
            f"({preview(foreign, 4)}); replacing it would delete them, so it is refused even with --force. Move them "
            "out, or pick another --mlx-path.")
    if not force:
        raise OutputError(f"--mlx-path {dst} holds an earlier conversion. Pass --force to replace it, or pick "
                          "another --mlx-path.")


def check_not_source(dst: Path, src: Path) -> None:
    """The destination may not be the source checkpoint, contain it, or lie inside it."""
    src = src.resolve()
    if dst == src:
        where = "is"
    elif dst in src.parents:
        where = "contains"
    elif src in dst.parents:
        where = "lies inside"
    else:
        return
    raise OutputError(f"--mlx-path {dst} {where} the source checkpoint {src}; the conversion must not touch it. "
                      "Pick an --mlx-path outside the source.")


def written_by_us(path: Path) -> set[str] | None:
    """The files this converter wrote into ``path`` per its marker (or the legacy config section); None when
    ``path`` is not an output of this converter."""
    info = read_marker(path)
    if info is not None:
        files = info.get("files")
        return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else set()
    try:
        legacy = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(legacy, dict) or not isinstance(legacy.get("mlx_gemma4"), dict):
        return None
    return {p.name for p in path.iterdir() if p.is_file() and _LEGACY.match(p.name)}


def read_marker(path: Path) -> dict | None:
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("converter") == CONVERTER else None


def write_marker(path: Path, **fields) -> None:
    info = {"converter": CONVERTER, "format_version": FORMAT_VERSION, **fields}
    (path / MARKER).write_text(json.dumps(info, indent=2))


@contextmanager
def temp_output(dst: Path) -> Iterator[Path]:
    """A marked temp dir beside ``dst`` that is removed unless the block moved it into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write_marker(tmp, state="partial", pid=os.getpid(), host=socket.gethostname())
        yield tmp
    finally:
        if tmp.exists():
            remove_output(tmp)


def replace(tmp: Path, dst: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``dst``; an earlier output there goes only once the new one is in place.

    ``dst`` is checked again first (``check_destination``): a conversion takes a while, and a folder made there or
    another conversion's output since the start is not replaced (it was, without --force). Then the finished
    conversion is kept beside it, named in the error. The earlier output is deleted only if it still holds nothing
    but what convert.py wrote (else it stays, hidden, and a warning names it)."""
    tmp.chmod(0o755)   # mkdtemp makes it private
    suffix = tmp.name.rsplit("-", 1)[-1]
    try:
        check_destination(dst, force)
    except OutputError as e:
        kept = dst.with_name(f"{dst.name}.new-{suffix}")
        tmp.rename(kept)
        raise OutputError(f"{e} It changed while the conversion ran: nothing in it was touched. The finished "
                          f"conversion is in {kept}; move it where you want it.") from None
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{suffix}")
        dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)
        raise
    if old is not None:
        foreign = _foreign([p.name for p in old.iterdir()], written_by_us(old) or set())
        if foreign:   # (put there between the check above and the swap)
            logger.warning("Kept the earlier output as %s: it holds files convert.py did not write (%s).", old,
                           preview(sorted(foreign), 4))
        else:
            remove_output(old)


def _foreign(names: list[str], ours: set[str]) -> list[str]:
    """Of an output folder's ``names``, those convert.py did not write (nor the OS put there)."""
    return [n for n in names if n not in ours and n not in _OS_FILES and n != MARKER]


def remove_output(path: Path) -> None:
    """Remove a (flat) directory this converter wrote, its marker last."""
    for p in path.iterdir():
        if p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            remove_output(p)
        else:
            p.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def remove_stale(dst: Path) -> None:
    """Remove temp dirs (and replaced outputs) that earlier runs for ``dst`` left behind: only marked ones whose
    process is gone."""
    for p in dst.parent.glob(f".{glob_escape(dst.name)}.*-*"):
        kind = p.name[len(dst.name) + 2:].split("-", 1)[0]
        if kind not in ("tmp", "old") or not p.is_dir() or p.is_symlink():
            continue
        info = read_marker(p)
        if info is None or (kind == "tmp" and _alive(info)):
            continue
        logger.info("Removing %s, left behind by an interrupted conversion", p)
        try:
            remove_output(p)
        except OSError as e:
            logger.warning("Could not remove %s (%s); remove it yourself.", p, e)


def _alive(info: dict) -> bool:
    """Whether the process that made a temp dir may still be running (when unsure: yes)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)
