"""What goes with the next message: pasted paths, /image /audio /video, the file picker (Ctrl+O) and the
microphone (Ctrl+R). The chat screen builds on this screen and sends what it collected."""

from __future__ import annotations

import re

from pathlib import Path
from typing import TYPE_CHECKING

from textual import on
from textual.reactive import reactive
from textual.screen import Screen
from textual.timer import Timer

from mlx_gemma4.media import MEDIA

from ..attachments import Attachment, AttachmentError, check, once_each, parse_prompt, repeat_notice
from ..recorder import RecorderError
from ..widgets.chips import AttachmentChips
from ..widgets.messages import Notice
from ..widgets.meter import LevelMeter
from ..widgets.prompt import PromptArea
from .file_picker import FilePickerScreen

if TYPE_CHECKING:
    from ..app import ChatApp

MEDIA_COMMANDS = {f"/{m.kind}": m.kind for m in MEDIA}


def chips_of(attachments: list[Attachment]) -> list[tuple[str, Path, str]]:
    return [(a.kind, a.path, a.label) for a in attachments]


def split_path_arg(arg: str) -> tuple[str, str]:
    """`/image PATH words...`: the path and the words after it, which stay in the prompt (they were dropped). The
    path is a quoted one, a first word that names a file, or a path with spaces copied unquoted that names one
    (then words); otherwise the whole argument, read as before."""
    quoted = re.match(r"""(['"])(.+?)\1(?:\s+(.*))?\Z""", arg, re.S)
    if quoted:
        return quoted.group(2), (quoted.group(3) or "").strip()
    first = re.match(r"((?:\\ |\S)+)\s+(.*)\Z", arg, re.S)
    if first:
        word = first.group(1).replace("\\ ", " ")
        if word.startswith("file://") or Path(word).expanduser().is_file():
            return parse_prompt_path(word), first.group(2).strip()
    parsed = parse_prompt(arg)   # a path with spaces copied unquoted, and words after it (they were dropped)
    words = parsed.text.strip()
    if len(parsed.attachments) == 1 and words and arg.rstrip().endswith(words):   # (the path first, then words)
        return str(parsed.attachments[0].path), words
    return parse_prompt_path(arg), ""


def parse_prompt_path(arg: str) -> str:
    """`/image 'my pic.png'` and `/image my\\ pic.png` name the same file as a bare path does."""
    parsed = parse_prompt(arg)
    if parsed.attachments:
        return str(parsed.attachments[0].path)
    if len(arg) > 1 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1]
    return arg.replace("\\ ", " ")


class AttachingScreen(Screen):
    """Holds the pending attachments (shown as chips in `#pending`) and the recording state (`LevelMeter`)."""

    recording = reactive(False)

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Attachment] = []
        self._meter_timer: Timer | None = None

    @property
    def chat(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    def notice(self, text: str, kind: str = "info", classes: str = "") -> None:
        self.query_one("#transcript").mount(Notice(text, kind, classes=classes))

    # -- pending attachments -----------------------------------------------------------------------

    def attach(self, attachments: list[Attachment]) -> list[Attachment]:
        """Add to the waiting attachments those the loaded model takes (saying why of the others); those added."""
        taken = []
        for a in attachments:
            why = self.chat.backend.refuses(a.kind)
            if why:
                self.notify(f"{a.path.name} was not attached: {why}.", severity="warning", timeout=8)
            else:
                taken.append(a)
        self.pending, repeats = once_each(self.pending + taken)
        for a in repeats:
            self.notify(repeat_notice(a), timeout=6)
        self.show_pending()
        return taken

    def take_pending(self) -> list[Attachment]:
        pending, self.pending = self.pending, []
        self.show_pending()
        return pending

    def show_pending(self) -> None:
        self.query_one("#pending", AttachmentChips).show(chips_of(self.pending))

    def attach_checked(self, path: Path | str, expect: str | None = None) -> bool:
        """Attach the file if it is one the model takes (True); else say why (False)."""
        try:
            return bool(self.attach([check(path, expect=expect)]))
        except AttachmentError as e:
            self.notify(str(e), severity="error", timeout=8)
            return False

    @on(PromptArea.Pasted)
    def pasted(self, event: PromptArea.Pasted) -> None:
        parsed = parse_prompt(event.text)
        if parsed.attachments:
            self.attach(parsed.attachments)
        for n in parsed.notices:
            self.notify(n, severity="warning", timeout=8)
        event.prompt.insert_pasted(parsed.text if parsed.attachments else event.text)

    @on(PromptArea.BackspaceOnEmpty)
    def drop_last_pending(self) -> None:
        if self.pending:
            gone = self.pending.pop()
            self.show_pending()
            self.notify(f"Removed {gone.path.name} from the message.", timeout=4)

    def media_command(self, name: str, arg: str) -> bool | str | None:
        """`/image PATH` and friends: True when the file was attached (or the words after the path, to stay in the
        prompt), False when it was not (the message says why), None when `name` is not one of them."""
        if name not in MEDIA_COMMANDS:
            return None
        if not arg:
            self.notify(f"Usage: {name} PATH", severity="warning")
            return False
        path, rest = split_path_arg(arg)
        attached = self.attach_checked(path, expect=MEDIA_COMMANDS[name])
        return (rest or True) if attached else attached

    def action_attach(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.attach_checked(path)

        self.app.push_screen(FilePickerScreen(Path.home()), chosen)

    # -- microphone --------------------------------------------------------------------------------

    def action_record(self) -> None:
        """Start recording, or stop and attach the clip."""
        rec = self.chat.recorder
        meter = self.query_one(LevelMeter)
        if not self.recording:
            try:
                rec.start()
            except RecorderError as e:   # a toast: pressed again and again, notices piled up in the conversation
                self.notify(str(e), severity="error", timeout=10)
                return
            self.recording = True
            meter.limit = rec.max_frames / rec.samplerate
            meter.display = True
            self._meter_timer = self.set_interval(1 / 15, self.update_meter)
            return
        self.recording = False
        try:
            path = rec.stop()
        except RecorderError as e:
            self.notice(str(e), "error")
            return
        if path is None:
            self.notify("Nothing was recorded.", severity="warning")
            return
        try:
            self.attach([check(path, expect="audio")])
        except AttachmentError as e:
            self.notify(str(e), severity="error")

    def discard_recording(self) -> None:
        self.chat.recorder.cancel()
        self.recording = False
        self.notify("Recording discarded.")

    def update_meter(self) -> None:
        rec = self.chat.recorder
        meter = self.query_one(LevelMeter)
        meter.level, meter.elapsed = rec.level, rec.elapsed
        if rec.full and self.recording:
            self.notify(f"Reached the {meter.limit:.0f} s the model can hear; recording stopped.")
            self.action_record()

    def watch_recording(self, recording: bool) -> None:
        if not recording:
            if self._meter_timer is not None:
                self._meter_timer.stop()
                self._meter_timer = None
            for meter in self.query(LevelMeter):
                meter.display = False
