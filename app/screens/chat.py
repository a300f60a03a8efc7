"""The chat screen: transcript, prompt, attachments, recording bar and status bar.

It turns what the user does into calls on the backend (which return at once) and renders what the backend
posts back (LoadProgress, Streamed, Finished, ...). Every message is saved to history as it completes.
Collecting attachments and recording live in AttachingScreen, which this screen builds on.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import Footer, Label, ProgressBar, Static

from .. import backend as b
from ..attachments import Attachment, parse_prompt
from ..demo import BANNER
from ..history import SavedMessage
from ..widgets.activity import Activity
from ..widgets.chips import AttachmentChips
from ..widgets.messages import ModelMessage, Transcript, UserMessage, last_code_block
from ..widgets.meter import LevelMeter
from ..widgets.prompt import PLACEHOLDER, PromptArea
from ..widgets.status import StatusBar
from ..widgets.thumbnail import ImagePreview
from .attaching import AttachingScreen, chips_of
from .confirm import ConfirmScreen


class ChatScreen(AttachingScreen):
    CSS_PATH = "chat.tcss"
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+o", "attach", "Attach", id="chat.attach"),
        Binding("ctrl+r", "record", "Record", id="chat.record"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", id="chat.thinking"),
        Binding("ctrl+g", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("ctrl+n", "new_conversation", "New", id="chat.new"),
        Binding("ctrl+l", "conversations", "History", id="chat.history"),
        Binding("f3", "copy_answer", "Copy answer", id="chat.copy_answer"),
        Binding("ctrl+b", "copy_code", "Copy code", show=False, id="chat.copy_code"),
        Binding("f2", "settings", "Settings", id="chat.settings"),
        Binding("f1", "help", "Help", id="chat.help"),
    ]

    generating = reactive(False)

    def __init__(self) -> None:
        super().__init__()
        self.conversation_id: int | None = None
        self.current: ModelMessage | None = None
        self.regenerating = False
        self.last_sent = ""
        self.turn_images: list[Path] = []  # images of the last user turn, for box answers

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
        yield Footer()

    def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        status.model = self.chat.backend.name
        status.thinking = self.chat.backend.settings.enable_thinking
        status.state = "loading"
        self.query_one(PromptArea).focus()

    # -- small helpers -----------------------------------------------------------------------------

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one(PromptArea)

    def watch_generating(self, generating: bool) -> None:
        self.query_one(StatusBar).state = "answering" if generating else ""
        if not generating:
            self.query_one(Activity).stop()

    # -- model loading -----------------------------------------------------------------------------

    def model_changed(self) -> None:
        """The app swapped in another backend (the demo model): show its name, banner and loading bar again."""
        backend = self.chat.backend
        if backend.demo and not self.query("#banner"):
            self.mount(Static(BANNER, id="banner"), before=0)
        self.query_one("#loading").display = True
        self.query_one("#loading-label", Label).update("Loading model…")
        status = self.query_one(StatusBar)
        status.model, status.state = backend.name, "loading"

    @on(b.LoadProgress)
    def load_progress(self, event: b.LoadProgress) -> None:
        bar = self.query_one("#loading-bar", ProgressBar)
        bar.update(total=event.total or None, progress=event.done)
        desc = event.desc
        if event.total > 10_000_000:  # bytes: say how much of how much
            desc = f"{desc} {event.done / 1e9:.1f}/{event.total / 1e9:.1f} GB"
        if desc:
            self.query_one("#loading-label", Label).update(desc)

    @on(b.ModelLoaded)
    def model_loaded(self, event: b.ModelLoaded) -> None:
        self.query_one("#loading").display = False
        status = self.query_one(StatusBar)
        status.state = ""
        status.stats = b.Stats(context_limit=event.context_limit)

    @on(b.LoadFailed)
    def load_failed(self, event: b.LoadFailed) -> None:
        self.load_failed_text(f"The model could not be loaded. {event.error}")

    def load_failed_text(self, text: str) -> None:
        self.query_one("#loading").display = False
        self.query_one(StatusBar).state = "no model"
        self.notice(text, "error")

    # -- sending -----------------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    def submitted(self, event: PromptArea.Submitted) -> None:
        text = event.text.strip()
        if self.recording:
            self.action_record()
        if not text and not self.pending:
            return
        if text.startswith("/") and self.command(text):
            event.prompt.clear()
            return
        if self.generating:
            self.notify("Still answering; Esc stops it.", severity="warning")
            return
        if not self.chat.backend.loaded:
            self.notify("No model is loaded yet.", severity="warning")
            return
        parsed = parse_prompt(text)
        for n in parsed.notices:
            self.notice(n, "warning")
        attachments = self.take_pending() + parsed.attachments
        event.prompt.clear()
        self.send(parsed.text, attachments)

    def send(self, text: str, attachments: list[Attachment]) -> None:
        history = self.chat.history
        if self.conversation_id is None:
            s = self.chat.backend.settings
            self.conversation_id = history.new_conversation(model=self.chat.backend.name, system_prompt=s.system_prompt)
        history.add_message(self.conversation_id, "user", text, attachments=attachments)
        self.transcript.mount(UserMessage(text, chips_of(attachments)))
        self.last_sent = text
        self.turn_images = [a.path for a in attachments if a.kind == "image"]
        self.start_answer({k: sum(a.kind == k for a in attachments) for k in ("image", "audio", "video")})
        self.chat.backend.send(self.post_message, text, attachments)

    def start_answer(self, media: dict[str, int] | None = None) -> None:
        self.current = ModelMessage()
        self.transcript.mount(self.current)
        self.generating = True
        self.query_one(Activity).start(media or {})

    def command(self, text: str) -> bool:
        """Slash commands; False means 'not a command, send it as it is'."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if self.media_command(name, arg):
            return True
        if name == "/new":
            self.action_new_conversation()
            return True
        if name == "/system":
            self.chat.backend.settings.system_prompt = arg
            self.chat.save_settings()
            self.action_new_conversation()
            self.notify("System prompt set; new conversation started.")
            return True
        if name == "/help":
            self.action_help()
            return True
        return False

    # -- streaming ---------------------------------------------------------------------------------

    @on(b.Working)
    def working(self, event: b.Working) -> None:
        self.query_one(Activity).progress(event.done, event.total)

    @on(b.Streamed)
    async def streamed(self, event: b.Streamed) -> None:
        if event.thinking or event.answer:
            self.query_one(Activity).stop()
        if self.current is not None:
            await self.current.show(event.thinking, event.answer)
        self.query_one(StatusBar).stats = event.stats

    @on(b.Finished)
    async def finished(self, event: b.Finished) -> None:
        message, self.current = self.current, None
        self.generating = False
        self.query_one(StatusBar).stats = event.stats
        if message is not None:
            await message.show(event.thinking, event.answer)
            if event.finish_reason == "cancelled":
                message.set_note("stopped")
            elif event.finish_reason == "length":
                message.set_note("cut off at the max tokens limit")
        annotated = self.draw_boxes(event.answer) if self.turn_images and event.answer else None
        if self.conversation_id is not None:
            if self.regenerating:
                self.chat.history.delete_last_message(self.conversation_id, "assistant")
            stats = dict(vars(event.stats), finish=event.finish_reason)
            if annotated is not None:  # kept with the conversation, shown again on resume
                stats["annotated"] = str(annotated)
            self.chat.history.add_message(self.conversation_id, "assistant", event.answer,
                                          thinking=event.thinking, stats=stats)
        self.regenerating = False
        if annotated is not None:
            self.notice(f"Boxes drawn on the image: {annotated}")
            self.transcript.mount(ImagePreview(annotated))
        if event.context_full:
            self.offer_to_drop_turns(f"The conversation now fills the context ({event.stats.context_used}"
                                     f"/{event.stats.context_limit} tokens).")

    @on(b.GenerationFailed)
    def failed(self, event: b.GenerationFailed) -> None:
        self.generating = False
        if self.current is not None:
            self.current.remove()
            self.current = None
        if self.conversation_id is not None and not self.regenerating:
            # The session did not keep the turn, so neither does history; the text goes back to the prompt.
            self.chat.history.delete_last_message(self.conversation_id, "user")
            self.transcript.query(UserMessage).last().remove()
            self.prompt.text = self.last_sent
        self.regenerating = False
        if event.context_full:
            self.offer_to_drop_turns(f"That message does not fit in the context. {event.error}")
        else:
            self.notice(f"Generation failed. {event.error}", "error")

    def draw_boxes(self, answer: str) -> Path | None:
        """The last image of the turn with the answer's boxes drawn, saved beside the conversation's files."""
        from ..boxes import annotate

        history = self.chat.history
        where = history.attachments_dir / str(self.conversation_id) if self.conversation_id else history.dir
        try:
            return annotate(answer, self.turn_images[-1], where / "annotated")
        except Exception as e:  # drawing is a bonus; the answer itself is already shown
            self.notice(f"Could not draw the boxes: {e}", "warning")
            return None

    def offer_to_drop_turns(self, why: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.drop_oldest_turn()

        self.app.push_screen(ConfirmScreen(f"{why}\nDrop the oldest turn to make room?", "Drop oldest turn",
                                           "Keep"), answered)

    def drop_oldest_turn(self) -> None:
        self.chat.backend.drop_oldest_turns(1)
        if self.conversation_id is not None:
            self.chat.history.delete_oldest_turns(self.conversation_id, 1)
        users = self.transcript.query(UserMessage)
        if users:
            first = users.first()
            children = list(self.transcript.children)
            start = children.index(first)
            following = [w for w in children[start + 1:] if isinstance(w, UserMessage)]
            end = children.index(following[0]) if following else len(children)
            for w in children[start:end]:
                w.remove()
        self.notify("Dropped the oldest turn.")

    # -- actions -----------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.recording:
            self.discard_recording()
        elif self.generating:
            self.chat.backend.cancel()

    def action_toggle_thinking(self) -> None:
        on = not self.chat.backend.settings.enable_thinking
        self.chat.backend.set_thinking(on)
        self.chat.save_settings()
        self.query_one(StatusBar).thinking = on
        self.notify(f"Thinking {'on' if on else 'off'}.")

    def action_regenerate(self) -> None:
        if self.generating or not self.chat.backend.loaded:
            return
        last = self.transcript.last_model_message()
        if last is None:
            self.notify("Nothing to regenerate yet.")
            return
        last.remove()
        self.regenerating = True
        self.start_answer()
        self.chat.backend.regenerate(self.post_message)

    def action_copy_answer(self) -> None:
        last = self.transcript.last_model_message()
        if last is None or not last.answer:
            self.notify("No answer to copy yet.")
            return
        self.app.copy_to_clipboard(last.answer)
        self.notify("Copied the last answer.")

    def action_copy_code(self) -> None:
        last = self.transcript.last_model_message()
        code = last_code_block(last.answer) if last else None
        if code is None:
            self.notify("The last answer has no code block.")
            return
        self.app.copy_to_clipboard(code)
        self.notify("Copied the last code block.")

    def action_new_conversation(self) -> None:
        if self.generating:
            self.chat.backend.cancel()
        self.conversation_id = None
        self.transcript.remove_children()
        self.chat.backend.new_session()
        self.query_one(StatusBar).stats = b.Stats(context_limit=self.chat.backend.context()[1])

    def action_conversations(self) -> None:
        self.chat.action_conversations()

    def action_settings(self) -> None:
        self.chat.action_settings()

    def action_help(self) -> None:
        self.chat.action_help()

    # -- resume ------------------------------------------------------------------------------------

    def show_saved(self, conversation_id: int, messages: list[SavedMessage]) -> None:
        self.transcript.remove_children()
        self.conversation_id = conversation_id
        for m in messages:
            if m.role == "user":
                self.transcript.mount(UserMessage(m.content, [(a.kind, a.path, a.name) for a in m.attachments]))
            else:
                note = "stopped" if m.stats.get("finish") == "cancelled" else ""
                self.transcript.mount(ModelMessage(m.thinking, m.content, note))
                if m.stats.get("annotated") and Path(m.stats["annotated"]).exists():
                    self.transcript.mount(ImagePreview(Path(m.stats["annotated"])))

