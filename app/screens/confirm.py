"""A yes/no question, answered with buttons or y / n."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No", safe: bool = False,
                 unasked: bool = False) -> None:
        """``safe``: Enter answers No (the focus starts there), for a question whose Yes cannot be undone.
        ``unasked``: a question the app asks on its own (the user may be typing): the y key does not answer Yes
        (a Yes is chosen with Shift+Tab and Enter, or a click), and it is safe too."""
        super().__init__()
        self.question, self.yes, self.no = question, yes, no
        self.safe, self.unasked = safe or unasked, unasked

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        return not (self.unasked and action == "answer" and parameters == (True,))

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small", id="confirm"):
            with VerticalScroll(id="question-box"):   # a short screen scrolls the question, never the buttons
                yield Static(self.question, id="question", markup=False)
            with Horizontal(classes="buttons"):
                yield Button(self.yes, id="yes", variant="primary")
                yield Button(self.no, id="no")

    def on_mount(self) -> None:
        self.query_one("#no" if self.safe else "#yes", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)
