"""No converted model yet: download and convert E4B (hub reachable), or try the demo model (one key), or quit.

The hub check runs in a thread (it can take seconds when the network is down); until it answers the dialog says
so. The dialog dismisses with "download", "demo", "quit", or None (Esc: stay, with no model). It comes up unasked
as the app starts, while the user may be typing: no button has the focus (Enter answers nothing until Tab picks
one: a typed line started a 16 GB download) and no letter quits (a typed "q" closed the app).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from ..model_source import DEFAULT_HUB_ID, offline_message


class GetModelScreen(ModalScreen[str | None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [
        Binding("d", "choose('demo')", "Demo model", id="get_model.demo"),
        Binding("escape", "choose(None)", "Close", id="get_model.close"),
    ]

    def __init__(self, dest: Path, hub_check: Callable[[], bool]) -> None:
        super().__init__()
        self.dest, self.hub_check = dest, hub_check
        self.reachable: bool | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="get-model"):
            yield Static("No converted Gemma 4 model yet", classes="title")
            with VerticalScroll(id="question-box"):
                yield Static("Checking whether the Hugging Face hub can be reached…", id="question", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Download and convert", id="download", variant="primary", disabled=True)
                yield Button("Demo model (d)", id="demo")
                yield Button("Quit", id="quit")

    def on_mount(self) -> None:
        self.query_one("#question-box").focus()
        self.check_hub()

    @work(thread=True, exclusive=True)
    def check_hub(self) -> None:
        reachable = self.hub_check()
        self.app.call_from_thread(self.show_answer, reachable)

    def show_answer(self, reachable: bool) -> None:
        self.reachable = reachable
        question = self.query_one("#question", Static)
        download = self.query_one("#download", Button)
        if reachable:
            question.update(
                f"Download {DEFAULT_HUB_ID} (about 16 GB) and convert it to 4-bit into\n{self.dest}?\n\n"
                "The Gemma licence must be accepted on the model's hub page first; if the download is refused, "
                "log in with `hf auth login` and start again. Or try the tiny demo model (random output).")
            download.disabled = False
        else:
            question.update(offline_message(self.dest) + "\n\nOr try the app with the tiny demo model "
                                                          "(random output): press d.")
            download.display = False

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)
