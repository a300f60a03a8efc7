"""Settings: system prompt, thinking, sampling, answer length, image detail, the assistant drafter; plus what
model is loaded.

Laid out to fit 80x24 whole (compact fields, two to a row), with the focus on the first field.
"""

from __future__ import annotations

from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.validation import Number
from textual.widgets import Button, Input, Label, Select, Static, Switch, TextArea

from ..backend import IMAGE_TOKENS, Settings
from ..model_source import drafter_dir

FIELDS = [  # (id, label, type, min, max)
    ("temperature", "Temperature", float, 0.0, 2.0),
    ("top_p", "Top-p", float, 0.0, 1.0),
    ("top_k", "Top-k (0 = off)", int, 0, 1000),
    ("max_tokens", "Max tokens", int, 1, 32768),
]
ABOVE_MIN = {"top_p"}   # fields whose minimum itself is refused (a top-p of 0 keeps no token: every turn failed)


def fits(key: str, value: float) -> bool:
    """Whether ``value`` is in the range of field ``key`` (the screen, the saved file and the command line)."""
    lo, hi = next((lo, hi) for k, _, _, lo, hi in FIELDS if k == key)
    return (lo < value if key in ABOVE_MIN else lo <= value) and value <= hi


def allowed(key: str) -> str:
    """The range of field ``key`` in words."""
    lo, hi = next((lo, hi) for k, _, _, lo, hi in FIELDS if k == key)
    return f"above {lo} and at most {hi}" if key in ABOVE_MIN else f"from {lo} to {hi}"


class SettingsScreen(ModalScreen[Settings | None]):
    """Dismisses with the new Settings, or None when cancelled."""

    CSS_PATH = "modal.tcss"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="settings.cancel"),
        Binding("ctrl+s", "save", "Save", id="settings.save"),
        # Moving the focus as the key arrives (priority), not once the field it left has handled it: keys typed
        # ahead of the move (a burst a terminal delivers at once) then land in the field moved to.
        Binding("tab", "app.focus_next", show=False, priority=True),
        Binding("shift+tab", "app.focus_previous", show=False, priority=True),
    ]

    def __init__(self, settings: Settings, model_info: str = "") -> None:
        super().__init__()
        self.settings = settings
        self.model_info = model_info

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog", id="settings"):
            yield Static("Settings · Ctrl+S saves · Esc cancels", classes="title")
            # On a short screen the fields scroll (the focused one into view) and the buttons stay in sight.
            with VerticalScroll(id="settings-body"):
                if self.model_info:
                    yield Static(self.model_info, id="model-info", markup=False)
                yield Label("System prompt (a change starts a new conversation)", id="system-label")
                yield TextArea(s.system_prompt, id="system_prompt", soft_wrap=True, compact=True)
                with Grid(id="fields"):
                    yield Label("Thinking")
                    yield Switch(s.enable_thinking, id="enable_thinking")
                    for key, label, kind, lo, hi in FIELDS:
                        yield Label(label)
                        yield Input(str(getattr(s, key)), id=key, type="number" if kind is float else "integer",
                                    validators=[Number(minimum=lo, maximum=hi)], compact=True)
                    yield Label("Image tokens")
                    yield Select([(f"{n}" if n else "model's", n) for n in IMAGE_TOKENS], allow_blank=False,
                                 value=s.image_tokens if s.image_tokens in IMAGE_TOKENS else 0, id="image_tokens",
                                 compact=True)
                with Horizontal(id="drafter-row"):
                    yield Label("Drafter folder")
                    yield Input(s.assistant, id="assistant", placeholder="none: answers decode without a drafter",
                                compact=True)
            yield Static("", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#system_prompt", TextArea).focus()

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)   # Enter in a field saves, as Ctrl+S does
    def action_save(self) -> None:
        values = {}
        for key, label, kind, lo, hi in FIELDS:
            field = self.query_one(f"#{key}", Input)
            result = field.validate(field.value)
            if result is not None and not result.is_valid or not fits(key, float(field.value)):
                self._refuse(field, f"{label} must be a number {allowed(key)}.")
                return
            values[key] = kind(float(field.value))
        field = self.query_one("#assistant", Input)
        values["assistant"], problem = drafter_dir(field.value)
        if problem:  # the app checks that it fits the model once the dialog closes
            self._refuse(field, f"Drafter folder {values['assistant']}: {problem}. Give the folder convert.py wrote "
                                "for the drafter, or leave it empty.")
            return
        values["system_prompt"] = self.query_one("#system_prompt", TextArea).text.strip()
        values["enable_thinking"] = self.query_one("#enable_thinking", Switch).value
        values["image_tokens"] = self.query_one("#image_tokens", Select).value
        self.dismiss(replace(self.settings, **values))

    @on(Input.Changed)
    def _edited(self) -> None:
        """A field changed: the reason an earlier Save was refused may be fixed (it stayed under the fields)."""
        self.query_one("#error", Static).update("")

    def _refuse(self, field: Input, why: str) -> None:
        """Say why Save was refused and put the field to fix in view (the reason's lines move it)."""
        self.query_one("#error", Static).update(why)
        field.focus()
        self.call_after_refresh(field.scroll_visible, animate=False)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
