"""The chat screen: transcript, prompt, attachments, recording bar and status bar.

It turns what the user does into calls on the backend (which return at once) and renders what the backend
posts back (LoadProgress, ContextCounted, ...). Every message is saved to history as it completes. One turn's
answer (streamed, saved, stopped, failed, answered again) lives in AnsweringScreen, collecting attachments and
recording in AttachingScreen, and guarding and dropping turns in TurnsScreen, which it builds on.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Footer, Label, ProgressBar, Static

from mlx_gemma4.media import MEDIA

from .. import backend as b
from .. import events as ev
from ..attachments import Attachment, once_each, parse_prompt, repeat_notice
from ..demo import BANNER
from ..widgets.activity import Activity
from ..widgets.chips import AttachmentChips
from ..widgets.messages import Transcript, UserMessage, last_code_block
from ..widgets.meter import LevelMeter
from ..widgets.prompt import PLACEHOLDER, PromptArea
from ..widgets.status import StatusBar
from .saved import SHOWN, message_widgets, session_messages
from .turns import TurnsScreen


def copied(what: str, by: str | None) -> str:
    """What a copy key did: the system clipboard took it, or only the terminal was asked to (OSC 52)."""
    if by:
        return f"Copied {what}."
    return (f"Sent {what} to the terminal's clipboard (a terminal without OSC 52, like macOS Terminal, ignores "
            "it: select the text with the mouse instead).")


class EarlierButton(Button):
    """Draws the messages saved before ``first_shown`` (``count`` of them) above it when pressed."""

    def __init__(self, first_shown: int, count: int) -> None:
        super().__init__(f"Show the {count} earlier messages", classes="earlier", compact=True)
        self.first_shown = first_shown


class ChatScreen(TurnsScreen):
    CSS_PATH = "chat.tcss"
    BINDINGS = [
        # In the footer's order, which cuts what does not fit (80 columns: up to History): Help first, since it
        # lists every key.
        Binding("f1", "help", "Help", id="chat.help"),
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+o", "attach", "Attach", id="chat.attach"),
        Binding("ctrl+r", "record", "Record", id="chat.record"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", id="chat.thinking"),
        Binding("ctrl+n", "new_conversation", "New", id="chat.new"),
        Binding("ctrl+l", "conversations", "History", id="chat.history"),
        Binding("f2", "settings", "Settings", id="chat.settings"),
        Binding("ctrl+g", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("f3", "copy_answer", "Copy answer", id="chat.copy_answer"),
        Binding("ctrl+b", "copy_code", "Copy code", show=False, id="chat.copy_code"),
    ]

    def compose(self) -> ComposeResult:
        if self.chat.backend.demo:
            yield Static(BANNER, id="banner")
        with Horizontal(id="loading"):
            yield Label("Loading model…", id="loading-label")
            yield ProgressBar(id="loading-bar", show_eta=False)
        yield Transcript(id="transcript")
        yield Activity(id="activity")
        meter = LevelMeter(id="meter")
        meter.display = False
        yield meter
        yield AttachmentChips(id="pending", thumbnails=False)
        yield PromptArea(id="prompt", placeholder=PLACEHOLDER)
        yield StatusBar(id="status")
        # Without the palette's hint (F1 lists Ctrl+P): at 80 columns it cut "History" to "Hi".
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        status.model = self.chat.backend.name
        status.thinking = self.chat.backend.settings.enable_thinking
        status.state = "loading"
        self.query_one(PromptArea).focus()


    # -- model loading -----------------------------------------------------------------------------

    def model_changed(self) -> None:
        """The app swapped in another backend (the demo model): show its name, banner and loading bar again."""
        backend = self.chat.backend
        self.query(".no-model").remove()   # ("No model loaded": one is loading now)
        if backend.demo and not self.query("#banner"):
            self.mount(Static(BANNER, id="banner"), before=0)
        self.query_one("#loading").display = True
        self.query_one("#loading-label", Label).update("Loading model…")
        status = self.query_one(StatusBar)
        status.model, status.state = backend.name, "loading"

    @on(ev.LoadProgress)
    def load_progress(self, event: ev.LoadProgress) -> None:
        bar = self.query_one("#loading-bar", ProgressBar)
        bar.update(total=event.total or None, progress=event.done)
        desc = event.desc
        if event.total > 10_000_000:  # bytes: say how much of how much
            desc = f"{desc} {event.done / 1e9:.1f}/{event.total / 1e9:.1f} GB"
        if desc:
            self.query_one("#loading-label", Label).update(desc)

    @on(ev.ModelLoaded)
    def model_loaded(self, event: ev.ModelLoaded) -> None:
        self.chat.model_loaded()
        self.query_one("#loading").display = False
        status = self.query_one(StatusBar)
        status.state = "answering" if self.generating else ""
        status.stats = ev.Stats(context_limit=event.context_limit)
        self.count_context()

    @on(ev.LoadFailed)
    def load_failed(self, event: ev.LoadFailed) -> None:
        self.load_failed_text(f"The model could not be loaded. {event.error}")

    def load_failed_text(self, text: str) -> None:
        self.query_one("#loading").display = False
        self.query_one(StatusBar).state = "no model"
        self.notice(text, "error", classes="no-model")

    # -- the conversation on show -------------------------------------------------------------------

    def conversation_messages(self, conversation_id: int, upto: int | None = None, say_missing: bool = False
                              ) -> list[dict]:
        """The conversation as chat messages for the model (system prompt first), up to message `upto`;
        `say_missing`: a notice names the attachments whose saved copies are gone (left out)."""
        history = self.chat.history
        conv = history.get(conversation_id)
        saved = [m for m in history.messages(conversation_id) if upto is None or m.id <= upto]
        system = [{"role": "system", "content": conv.system_prompt}] if conv and conv.system_prompt else []
        missing: list[str] = []
        messages = system + session_messages(saved, missing)
        if missing and say_missing:
            self.notice(f"The app's copy of {', '.join(missing)} (attached earlier) is gone from "
                        f"{history.attachments_dir / str(conversation_id)}; the conversation goes on without "
                        f"{'it' if len(missing) == 1 else 'them'}.", "warning")
        return messages

    def render_conversation(self) -> None:
        """Draw the transcript from the history store (the one record of the conversation)."""
        self.transcript.remove_children()
        if self.conversation_id is None:
            return
        self.chat.history.seen(self.conversation_id)
        saved = self.chat.history.messages(self.conversation_id)
        cut = max(0, len(saved) - SHOWN)
        while 0 < cut and saved[cut].role != "user":   # whole turns
            cut -= 1
        # (a class, not an id: the old transcript's button is still being removed when the new one mounts)
        earlier = [EarlierButton(saved[cut].id, cut)] if cut else []
        self.transcript.mount_all(earlier + message_widgets(saved[cut:]))

    @on(Button.Pressed, ".earlier")
    async def show_earlier(self, event: Button.Pressed) -> None:
        """Draw the messages a long conversation opened without, above the ones on show (those saved before the
        first on show: a count of the widgets went wrong while an answer streamed)."""
        event.stop()
        button = event.button
        saved = self.chat.history.messages(self.conversation_id) if self.conversation_id is not None else []
        widgets = message_widgets([m for m in saved if m.id < button.first_shown])
        siblings = list(self.transcript.children)
        after = siblings[siblings.index(button) + 1] if button in siblings[:-1] else None
        self.prompt.focus()
        if widgets:
            await self.transcript.mount_all(widgets, before=button)
        await button.remove()
        if after is not None:   # the view stays where it was, on the first message it showed (it went to the top)
            self.call_after_refresh(self.transcript.scroll_to_widget, after, top=True, animate=False)

    def open_conversation(self, conversation_id: int | None) -> None:
        """Show another conversation (None: a new, empty one). The one on show, picked again while it is being
        answered, goes on as it is (it was stopped, and its answer so far vanished from the screen)."""
        if conversation_id is not None and conversation_id == self.conversation_id and self.generating:
            return
        self.leave_turn()
        self.conversation_id = conversation_id
        self.render_conversation()
        limit = self.chat.backend.session.context_limit if self.chat.backend.session else 0
        self.query_one(StatusBar).stats = ev.Stats(context_limit=limit)
        self.count_context()

    def count_context(self) -> None:
        """Have the status bar show how much of the context the conversation takes (a new one: its system prompt,
        which alone may not fit; it showed 0)."""
        if not self.chat.backend.loaded:
            return
        if self.conversation_id is not None:
            messages = self.conversation_messages(self.conversation_id)
        else:
            system = self.chat.backend.settings.system_prompt
            if not system:
                return
            messages = [{"role": "system", "content": system}]
        self.chat.backend.count(self.post_message, self.conversation_id, messages)


    # -- sending -----------------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    def submitted(self, event: PromptArea.Submitted) -> None:
        text = event.text.strip()
        if self.recording:
            self.action_record()
        if not text and not self.pending:
            return
        done = self.command(text) if text.startswith("/") and not text.startswith("//") else None
        if done is not None:
            if isinstance(done, str):   # done, and the words after the command stay, to be sent
                event.prompt.text = done
                event.prompt.move_cursor(event.prompt.document.end)
            elif done:  # a command that failed (a mistyped /image path) stays in the prompt to be corrected
                event.prompt.clear()
            return
        if self.generating:
            self.notify("Still answering; Esc stops it.", severity="warning")
            return
        if self.chat.backend.load_error is not None:
            again = ("Ctrl+P 'Get a model' downloads one or starts the demo; or start again with --model DIR naming "
                     "a converted model." if self.chat.backend.load_error == b.NO_MODEL_CHOSEN else
                     "Start again with --model DIR naming a converted model, or --demo.")
            self.notify(f"No model is loaded, so nothing can answer. {again}", severity="warning", timeout=10)
            return
        if self.drop_gone_pending():
            return  # the message stays in the prompt, to be sent again without the file or with it attached anew
        parsed = parse_prompt(text[1:] if text.startswith("//") else text)   # //text: text that starts with /
        for n in parsed.notices:
            self.notice(n, "warning")
        pending = self.take_pending()
        event.prompt.clear()
        attachments, repeats = once_each(pending + parsed.attachments)
        for a in repeats:
            self.notice(repeat_notice(a))
        self.send(parsed.text, attachments, typed=(event.text, pending))

    def drop_gone_pending(self) -> bool:
        """Take out of the waiting attachments the files moved or deleted since they were attached, saying so
        (True when there were any: the message is not sent as if they were still there)."""
        gone = [a for a in self.pending if not a.path.is_file()]
        for a in gone:
            self.notice(f"{a.path} was moved or deleted after it was attached, so the message was not sent. Attach "
                        "the file again (drag it in), or press Enter to send the message without it.", "error")
        if gone:
            self.pending = [a for a in self.pending if a not in gone]
            self.show_pending()
        return bool(gone)

    def send(self, text: str, attachments: list[Attachment],
             typed: tuple[str, list[Attachment]] | None = None) -> None:
        """Save the user's message, show it and ask for the answer (queued behind loading if need be)."""
        history = self.chat.history
        if self.changed_elsewhere() or self.unanswered():
            self.put_back(*(typed or (text, attachments)))
            return
        try:
            if not history.exists(self.conversation_id):  # new, or deleted while open
                s = self.chat.backend.settings
                self.conversation_id = history.new_conversation(model=self.chat.backend.name,
                                                                system_prompt=s.system_prompt)
            mid = history.add_message(self.conversation_id, "user", text, attachments=attachments)
        except (OSError, sqlite3.Error) as e:  # a file gone while it was copied, a full disk: nothing is sent
            self.put_back(*(typed or (text, attachments)))
            self.notice(f"The message was not sent: it could not be saved ({e}). It is back in the prompt; check "
                        f"the attached files and the free space in {history.dir}, then press Enter again.", "error")
            return
        saved = history.messages(self.conversation_id)[-1]
        self.transcript.mount(UserMessage(text, [(a.kind, a.path, a.label) for a in saved.attachments]))
        self.typed = typed or (text, attachments)
        self.turn_images = [a.path for a in saved.attachments if a.kind == "image"]
        self.start_answer(mid, {k: sum(a.kind == k for a in attachments) for k in (m.kind for m in MEDIA)})


    def command(self, text: str) -> bool | str | None:
        """Slash commands: True when done (or the text to leave in the prompt: the words after `/new` or after a
        media command's path), False when it failed (the user was told why), None for 'not a command, send it as
        it is'."""
        name, arg = re.match(r"(\S*)\s*(.*)\Z", text, re.S).groups()   # (a new line ends the name too)
        name, arg = name.lower(), arg.strip()   # (/NEW is /new)
        attached = self.media_command(name, arg)
        if attached is not None:
            return attached
        if name == "/new":
            self.action_new_conversation()
            return arg or True   # (`/new what is ...`: the question stays, to be sent in the new conversation)
        if name == "/system":
            if not arg:   # (it cleared the saved prompt without a word of it)
                now = self.chat.backend.settings.system_prompt
                self.notice(f"The system prompt is: {now}" if now else "There is no system prompt.")
                self.notice("/system TEXT sets it and starts a new conversation; F2 (Settings) edits or clears it.")
                return True
            self.chat.backend.settings.system_prompt = arg
            self.chat.save_settings()
            self.action_new_conversation()
            self.notify("System prompt set; new conversation started.")
            return True
        if name == "/help":
            self.action_help()
            return True
        if re.fullmatch(r"/[A-Za-z]*", name):   # a mistyped command (/sytem), or a lone /, is not sent as text
            self.notify(f"There is no command {name}; /help lists them. To send text that starts with a slash, "
                        "begin it with two (//).", severity="warning", timeout=8)
            return False
        return None

    # -- streaming ---------------------------------------------------------------------------------


    @on(ev.ContextCounted)
    def context_counted(self, event: ev.ContextCounted) -> None:
        if event.conversation_id != self.conversation_id or self.generating:
            return
        status = self.query_one(StatusBar)
        status.stats = replace(status.stats, context_used=event.used, context_limit=event.limit)


    # -- actions -----------------------------------------------------------------------------------


    def action_toggle_thinking(self) -> None:
        on = not self.chat.backend.settings.enable_thinking
        self.chat.backend.settings.enable_thinking = on  # read by the next turn
        self.chat.save_settings()
        self.query_one(StatusBar).thinking = on
        self.notify(f"Thinking {'on' if on else 'off'}.")


    def action_copy_answer(self) -> None:
        last = self.transcript.last_model_message()
        if last is None or not last.answer:
            self.notify("No answer to copy yet.")
            return
        self._copy("the last answer", last.answer)

    def action_copy_code(self) -> None:
        last = self.transcript.last_model_message()
        code = last_code_block(last.answer) if last else None
        if code is None:
            self.notify("The last answer has no code block.")
            return
        self._copy("the last code block", code)

    def _copy(self, what: str, text: str) -> None:
        self.chat.copy_to_clipboard(text)
        self.notify(copied(what, self.chat.copied_by))

    def action_new_conversation(self) -> None:
        self.open_conversation(None)

    def action_conversations(self) -> None:
        self.chat.action_conversations()

    def action_settings(self) -> None:
        self.chat.action_settings()

    def action_help(self) -> None:
        self.chat.action_help()
