"""The transcript: user and model messages, the model's rendered as Markdown while it streams."""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Button, Collapsible, Label, Markdown, Static

from .chips import AttachmentChips
from .tool_calls import ToolCallView

_CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def _markdown_parser() -> MarkdownIt:
    """Textual's own "gfm-like" Markdown, without HTML: a model's text is never markup for a browser, and with
    HTML on, anything in angle brackets (``List<String>``, ``<div>``, even ``x<y and y>z``) is taken for a tag
    and not shown."""
    return MarkdownIt("gfm-like", {"html": False})


def last_code_block(markdown: str) -> str | None:
    blocks = _CODE_BLOCK.findall(markdown)
    return blocks[-1].rstrip("\n") if blocks else None


class UserMessage(Vertical):
    """What the user sent: text and the chips of the files attached to it."""

    def __init__(self, text: str, chips: list[tuple[str, Path, str]] = ()) -> None:
        super().__init__(classes="message user")
        self.text, self.chips = text, list(chips)

    def compose(self) -> ComposeResult:
        yield Label("You", classes="author")
        yield AttachmentChips(self.chips)
        if self.text:
            yield Static(self.text, classes="body", markup=False)


class ModelMessage(Vertical):
    """One answer: a collapsed Thinking section (when there is one), the Markdown answer, the tool calls it
    made (name, arguments, result), a footer note.

    `thinking` / `answer` / `calls` are what it should show; text may arrive before the widget is composed or
    mounted (a fast first token), so `show` only records it there and the widget catches up when it is mounted.
    """

    def __init__(self, thinking: str = "", answer: str = "", note: str = "",
                 calls: list[dict] | None = None) -> None:
        super().__init__(classes="message model")
        self.thinking, self.answer, self.note = thinking, answer, note
        self.calls: list[dict] = list(calls or [])
        self._shown: tuple[str, str] | None = None  # what the child widgets hold, once composed

    def compose(self) -> ComposeResult:
        yield Label("Gemma", classes="author")
        with Collapsible(title="Thinking", collapsed=True, classes="thinking") as c:
            c.display = bool(self.thinking)
            yield Markdown(self.thinking, classes="thinking-text", parser_factory=_markdown_parser)
        yield Markdown(self.answer, classes="answer", parser_factory=_markdown_parser)
        for call in self.calls:
            yield ToolCallView(call)
        note = Label(self.note, classes="note", markup=False)
        note.display = bool(self.note)
        yield note
        self._shown = (self.thinking, self.answer)

    async def on_mount(self) -> None:
        await self._sync()

    async def show(self, thinking: str, answer: str, calls: list[dict] | None = None) -> None:
        """Bring the widget up to date with the text so far; appends when the answer only grew. ``calls``
        (None: unchanged) replaces the tool calls shown."""
        self.thinking, self.answer = thinking, answer
        if calls is not None:
            self.calls = list(calls)
        await self._sync()

    async def _sync(self) -> None:
        answers = self.query(".answer")
        if self._shown is None or not answers:
            return  # not composed or not mounted yet: on_mount catches up
        shown_thinking, shown_answer = self._shown
        thinking, answer = self.thinking, self.answer
        self._shown = (thinking, answer)
        if thinking != shown_thinking:
            self.query_one(".thinking", Collapsible).display = bool(thinking)
            await self.query_one(".thinking-text", Markdown).update(thinking)
        md = answers.first(Markdown)
        if shown_answer and answer.startswith(shown_answer):
            if answer != shown_answer:
                await md.append(answer[len(shown_answer):])
        elif answer != shown_answer:
            await md.update(answer)
        await self._sync_calls()

    async def _sync_calls(self) -> None:
        views = list(self.query(ToolCallView))
        for view, call in zip(views, self.calls):
            if view.call != call:
                view.call = call
                view.update(view.text())
        for view in views[len(self.calls):]:
            await view.remove()
        if len(self.calls) > len(views):
            await self.mount_all([ToolCallView(c) for c in self.calls[len(views):]], before=self.query_one(".note"))

    def set_note(self, note: str) -> None:
        self.note = note
        for label in self.query(".note"):
            label.update(note)
            label.display = bool(note)


class Notice(Static):
    """A line from the app itself: errors, banners, what happened to a pasted path."""

    def __init__(self, text: str, kind: str = "info", classes: str = "") -> None:
        super().__init__(text, classes=f"notice {kind} {classes}".strip(), markup=False)


class Transcript(VerticalScroll):
    """The conversation, kept scrolled to the newest message unless the user scrolls up (``follow`` takes it back
    down: a new message). Focused with Tab to scroll it with the keys; typing there goes on in the prompt."""

    def on_mount(self) -> None:
        self.anchor()

    def follow(self) -> None:
        """Back to the newest message, and keep following it as it grows."""
        self.anchor()
        self.scroll_end(animate=False, immediate=True)

    def on_key(self, event: events.Key) -> None:
        if isinstance(self.screen.focused, Button):   # its own Enter / space (the one that draws earlier messages)
            return
        if event.key == "enter":   # sends what the prompt holds (a typed line then Enter was left unsent)
            prompt = self._to_prompt(event)
            prompt.post_message(prompt.Submitted(prompt, prompt.text))
        elif event.is_printable and event.character:
            self._to_prompt(event).insert(event.character)

    def on_paste(self, event: events.Paste) -> None:
        """A paste (a dragged file's path) goes to the prompt, as typing does: it vanished."""
        self._to_prompt(event).post_message(events.Paste(event.text))

    def _to_prompt(self, event: events.Event):
        """The prompt, focused, taking ``event`` over from here."""
        event.stop()
        event.prevent_default()
        prompt = self.screen.query_one("#prompt")
        prompt.focus()
        return prompt

    def last_model_message(self) -> ModelMessage | None:
        found = self.query(ModelMessage)
        return found.last() if found else None
