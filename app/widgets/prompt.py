"""The multi-line prompt: Enter sends; Ctrl+J starts a new line in every terminal, Shift+Enter where the terminal
reports it (kitty, iTerm2 and others with extended keys).

Ctrl+J is a plain line feed, which Terminal.app, iTerm2, kitty and tmux all pass through. Alt+Enter is not a
new-line key: most terminals send it as Esc followed by Enter, which arrives as Enter.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = {"ctrl+j", "shift+enter"}
PLACEHOLDER = "Message Gemma · Enter send · Ctrl+J new line · F1 help"


def _is_format_char(character: str | None) -> bool:
    return character is not None and len(character) == 1 and unicodedata.category(character) == "Cf"


class PromptArea(TextArea):
    @dataclass
    class Submitted(Message):
        prompt: PromptArea
        text: str

    @dataclass
    class Pasted(Message):
        """Text pasted (or files dragged) into the prompt, before it is inserted."""

        prompt: PromptArea
        text: str

    @dataclass
    class BackspaceOnEmpty(Message):
        prompt: PromptArea

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        # Keys that arrive while the screen reads a paste (checking dragged files takes a while) wait for it, so
        # what is typed after a paste lands after it.
        self._held: list[events.Key] | None = None

    async def _on_key(self, event: events.Key) -> None:
        if self._held is not None:
            event.stop()
            event.prevent_default()
            self._held.append(events.Key(event.key, event.character))
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "backspace" and not self.text:
            self.post_message(self.BackspaceOnEmpty(self))
        if _is_format_char(event.character):
            # Textual counts these as unprintable and drops them, but they are part of what was typed: the
            # joiner in emoji sequences, the ZWNJ of a Persian keyboard, direction marks in RTL text.
            event.stop()
            event.prevent_default()
            self.insert(event.character)
            return
        await super()._on_key(event)

    async def _on_paste(self, event: events.Paste) -> None:
        # The chat screen takes attachment paths out of the text and inserts the rest with insert_pasted().
        event.stop()
        event.prevent_default()
        if self._held is None:
            self._held = []
        self.post_message(self.Pasted(self, event.text))

    def insert_pasted(self, text: str) -> None:
        if text:
            self.insert(text)
        self.focus()
        held, self._held = self._held or [], None
        for key in held:
            self.post_message(key)
