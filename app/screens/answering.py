"""One turn's answer on the chat screen: asked of the backend, streamed into the transcript, saved to history when
it ends (as far as it got when stopped or when the app closes), taken back when it fails, and answered again.

ChatScreen builds on this screen: it opens conversations (``conversation_id``, ``conversation_messages``,
``render_conversation``) and offers to drop turns when the context is full (``offer_to_drop_turns``).
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.reactive import reactive

from .. import events as ev
from ..attachments import Attachment
from ..widgets.activity import Activity
from ..widgets.messages import ModelMessage, Transcript, UserMessage
from ..widgets.prompt import PromptArea
from ..widgets.status import StatusBar
from ..widgets.thumbnail import ImagePreview
from .attaching import AttachingScreen

FINISH_NOTES = {"cancelled": "stopped", "length": "cut off at the max tokens limit",
                "context": "stopped: the context is full"}


def finish_note(reason: str | None) -> str:
    return FINISH_NOTES.get(reason or "", "")


class AnsweringScreen(AttachingScreen):
    generating = reactive(False)

    def __init__(self) -> None:
        super().__init__()
        self.conversation_id: int | None = None  # the conversation on show (ChatScreen opens them)
        self.turn_id: int | None = None  # the user message being answered; events of other turns are dropped
        self.current: ModelMessage | None = None
        self.replacing: int | None = None  # the answer a regenerate replaces once the new one is in
        self.typed: tuple[str, list[Attachment]] | None = None  # put back in the prompt if the turn fails
        self.turn_images: list[Path] = []  # images of the last user turn, for box answers
        self.streamed_stats: ev.Stats | None = None  # the answer's stats so far (saved with it if the app closes)

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
        if not generating and not self.chat.backend.loaded and self.chat.backend.load_error is None:
            self.query_one(StatusBar).state = "loading"

    def leave_turn(self) -> None:
        """Stop answering (the backend keeps the partial answer for the conversation it belongs to) and stop
        listening to the running turn: its late events are dropped."""
        if self.generating:
            self.chat.backend.cancel()
        self._end_turn()

    def _end_turn(self) -> None:
        """No turn is answered any more: its state goes and its later events are not this screen's."""
        self.turn_id = self.current = self.replacing = self.typed = None
        self.generating = False

    def keep_partial_answer(self) -> None:
        """The app is closing mid-answer: the model's thread is stopped and its last events never arrive, so
        the answer as shown so far is saved now (as a stopped answer) and the turn is left."""
        message, cid = self.current, self.conversation_id
        if self.generating and message is not None and self.turn_id is not None and self.replacing is None:
            history = self.chat.history
            if history.exists(cid) and not self._answered(cid, self.turn_id):
                stats = dict(vars(self.streamed_stats or ev.Stats()), finish="cancelled")
                if message.calls:
                    stats["tool_calls"] = message.calls
                history.add_message(cid, "assistant", message.answer, thinking=message.thinking, stats=stats)
        self.turn_id = self.current = self.replacing = self.typed = None  # a late Finished is not this turn's

    def _mine(self, event: ev.TurnEvent) -> bool:
        return event.conversation_id == self.conversation_id and event.turn_id == self.turn_id

    def start_answer(self, turn_id: int, media: dict[str, int] | None = None) -> None:
        self.turn_id, self.streamed_stats = turn_id, None
        self.current = ModelMessage()
        self.transcript.mount(self.current)
        self.transcript.follow()   # scrolled up to read: a new turn brings the view back down
        self.generating = True
        backend = self.chat.backend
        self.query_one(Activity).start(media or {}, waiting=lambda: not backend.loaded and backend.load_error is None)
        if not self.chat.backend.loaded:
            self.query_one(StatusBar).state = "waiting for the model…"
        self.chat.backend.generate(self.post_message, self.conversation_id, turn_id,
                                   self.conversation_messages(self.conversation_id, upto=turn_id, say_missing=True))

    @on(ev.Working)
    def working(self, event: ev.Working) -> None:
        if self._mine(event):
            self.query_one(Activity).progress(event.done, event.total)

    @on(ev.Streamed)
    async def streamed(self, event: ev.Streamed) -> None:
        if not self._mine(event) or self.current is None:
            return  # a conversation no longer shown
        if event.thinking or event.answer:
            self.query_one(Activity).stop()
        self.query_one(StatusBar).stats = self.streamed_stats = event.stats
        await self.current.show(event.thinking, event.answer, event.tool_calls)

    @on(ev.Finished)
    async def finished(self, event: ev.Finished) -> None:
        history = self.chat.history
        stats = dict(vars(event.stats), finish=event.finish_reason)
        if event.tool_calls:  # kept with the answer (the messages table has no column for them)
            stats["tool_calls"] = event.tool_calls
        if not self._mine(event):
            # The user left this conversation mid-answer: its record still gets the (partial) answer, unless it
            # was deleted (add_message then saves nothing) or the answer replaced one (regenerate) and was stopped.
            if history.exists(event.conversation_id) and not self._answered(event.conversation_id, event.turn_id):
                history.add_message(event.conversation_id, "assistant", event.answer, thinking=event.thinking,
                                    stats=stats)
                if event.conversation_id == self.conversation_id and not self.generating:
                    # Left and opened again before the answer ended: drawn now (it was saved but not shown, and
                    # Ctrl+G then took the answer before it off the screen).
                    self.render_conversation()
            return
        message, self.current = self.current, None
        if self.replacing is not None and event.finish_reason == "cancelled":
            # Ctrl+G stopped with Esc: the answer it was to replace stays (the fragment replaced it for good, where
            # leaving the conversation or quitting mid-answer kept it).
            self._end_turn()
            self.render_conversation()
            self.notify("Stopped; the earlier answer is kept.")
            return
        annotated = self.draw_boxes(event.answer) if self.turn_images and event.answer else None
        if annotated is not None:  # kept with the conversation, shown again on resume
            stats["annotated"] = str(annotated)
        if self.replacing is not None:
            history.delete_message(self.replacing)
        history.add_message(event.conversation_id, "assistant", event.answer, thinking=event.thinking, stats=stats)
        self._end_turn()
        self.query_one(StatusBar).stats = event.stats
        if message is not None:
            message.set_note(finish_note(event.finish_reason))
        if annotated is not None:
            self.notice(f"Boxes drawn on the image: {annotated}")
            self.transcript.mount(ImagePreview(annotated))
        if event.finish_reason == "context":
            self.offer_to_drop_turns(f"The conversation now fills the context ({event.stats.context_used}"
                                     f"/{event.stats.context_limit} tokens).", 1)
        if message is not None:
            await message.show(event.thinking, event.answer, event.tool_calls)
        # The conversation as the next turn reads it (the answer as kept, thoughts left out): the cache's count
        # said 3,883 of 4,096 where the next message was refused as 4,414.
        self.count_context()

    def _answered(self, conversation_id: int, turn_id: int) -> bool:
        later = [m for m in self.chat.history.messages(conversation_id) if m.id > turn_id]
        return bool(later)

    @on(ev.GenerationFailed)
    def failed(self, event: ev.GenerationFailed) -> None:
        if not self._mine(event):
            # A conversation left before its turn failed: the turn leaves history all the same (it stayed, and a
            # 10,000-line message blocked the conversation), unless it was answered before (a regenerate).
            history = self.chat.history
            if history.exists(event.conversation_id) and not self._answered(event.conversation_id, event.turn_id):
                sent = [m for m in history.messages(event.conversation_id) if m.id == event.turn_id]
                history.delete_message(event.turn_id)
                if sent and sent[0].content.strip():   # nothing typed is lost: it comes back to the prompt
                    self.put_back(sent[0].content, [])
                    self.notify("A message sent in another conversation was not answered "
                                f"({event.error[:120]}); its text is back in the prompt.", severity="warning",
                                timeout=12)
            return
        error = event.error
        for m in self.chat.history.messages(event.conversation_id):   # the user's file names, not the app's copies
            for a in m.attachments:
                error = error.replace(str(a.path), a.name)
        typed, replacing, message = self.typed, self.replacing, self.current
        self._end_turn()
        if replacing is None:
            # The turn did not happen: it leaves history and the transcript (the notices above it stay: they say
            # what happened to its files), and what the user typed goes back to the prompt.
            self.chat.history.delete_message(event.turn_id)
            if typed is not None:
                self.put_back(*typed)
            users = self.transcript.query(UserMessage)
            if users:
                users.last().remove()
            if message is not None:
                message.remove()
        else:
            self.render_conversation()  # the answer a regenerate would have replaced comes back
        if event.context_full and event.drop_turns:
            self.offer_to_drop_turns(error, event.drop_turns)
        elif event.context_full:   # (the message is not what to blame when the system prompt alone is too long)
            self.notice(error if event.too_long != "message" else
                        f"That message does not fit in the model's context. {error}", "error")
        else:
            self.notice(f"Generation failed. {error}", "error")

    def put_back(self, text: str, pending: list[Attachment]) -> None:
        """Restore a message that was not sent: its text (paths typed in it included), cursor at the end, and
        the attachments that were waiting."""
        typed_since = self.prompt.text.strip()  # what the user started while the turn ran is kept after it
        self.prompt.text = f"{text}\n{typed_since}" if typed_since else text
        self.prompt.move_cursor(self.prompt.document.end)
        self.pending = list(pending) + self.pending
        self.show_pending()

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

    def action_stop(self) -> None:
        if self.recording:
            self.discard_recording()
        elif self.generating:
            self.chat.backend.cancel()

    def action_regenerate(self) -> None:
        if self.generating:
            self.notify("Still answering; Esc stops it, then Ctrl+G answers again." if self.chat.backend.loaded else
                        "The model is still loading; your message is answered once it is. Esc cancels it.",
                        severity="warning")
            return
        if self.changed_elsewhere():
            return
        saved = self.chat.history.messages(self.conversation_id) if self.conversation_id is not None else []
        users = [m for m in saved if m.role == "user"]
        if not users:
            self.notify("Nothing to regenerate yet.")
            return
        answers = [m for m in saved if m.role == "assistant" and m.id > users[-1].id]
        last = self.transcript.last_model_message()
        if answers and last is not None:   # (the last user turn may have no answer: the app was killed mid-turn)
            last.remove()
        self.replacing = answers[-1].id if answers else None
        self.turn_images = [a.path for a in users[-1].attachments if a.kind == "image"]
        self.start_answer(users[-1].id)
