"""The conversation's turns guarded and trimmed: another window's changes to it and a message still without an
answer (nothing is sent after them), and dropping its oldest turns (asked first). ChatScreen builds on it and
draws the conversation (``render_conversation``, ``count_context``)."""

from __future__ import annotations

from .answering import AnsweringScreen
from .confirm import ConfirmScreen


class TurnsScreen(AnsweringScreen):
    def changed_elsewhere(self) -> bool:
        """Whether another window changed this conversation since it was drawn here (both windows' turns went into
        one conversation unseen, and Ctrl+G here replaced the other window's answer): if so it is drawn again as
        saved, and the caller does nothing this time."""
        history = self.chat.history
        if not history.changed_elsewhere(self.conversation_id):
            return False
        gone = not history.exists(self.conversation_id)
        if gone:   # (a message sent now started a new conversation under the old one's turns)
            self.conversation_id = None
        self.render_conversation()
        self.count_context()
        self.notice("This conversation was deleted in another window. Press Enter again to start a new one with your "
                    "message." if gone else "This conversation was changed in another window; it is shown as saved "
                    "now. Press Enter (or Ctrl+G) again to go on from here.", "warning")
        return True

    def unanswered(self) -> bool:
        """Whether the conversation ends with a message that has no answer (another window answering it, or an app
        killed mid-answer): a message sent now would follow it unanswered, two turns of the user's in a row (two
        windows answering at once saved theirs crossed). Says what to do."""
        saved = self.chat.history.messages(self.conversation_id) if self.conversation_id is not None else []
        if not saved or saved[-1].role != "user":
            return False
        self.notice("The conversation's last message has no answer yet: another window may be answering it. Wait "
                    "for it (Ctrl+L and Enter draws the conversation again), or press Ctrl+G to answer it here; "
                    "your message stays in the prompt.", "warning")
        return True

    def offer_to_drop_turns(self, why: str, n: int) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.drop_oldest_turns(n)

        turns = "turn" if n == 1 else f"{n} turns"
        # Asked unasked (an answer ran into the context, a message did not fit), while the user may be typing: a
        # typed y or Enter deleted every turn of a long conversation for good.
        self.app.push_screen(ConfirmScreen(f"{why}\nDrop the oldest {turns} from this conversation for good to "
                                           "make room?", f"Drop {n} oldest", "Keep", unasked=True), answered)

    def drop_oldest_turn(self) -> None:
        """The palette's "Drop oldest turn": asked first, as the app's own offer is (it dropped at once, for good)."""
        def answered(yes: bool | None) -> None:
            if yes:
                self.drop_oldest_turns(1)

        if self.conversation_id is None or not self.chat.history.messages(self.conversation_id):
            self.notify("There is no turn to drop.")
            return
        self.app.push_screen(ConfirmScreen("Drop the oldest turn (your message and its answer) from this "
                                           "conversation for good?", "Drop it", "Keep", safe=True), answered)

    def drop_oldest_turns(self, n: int) -> None:
        if self.generating:
            self.notify("Still answering; Esc stops it first.", severity="warning")
            return
        if self.changed_elsewhere():   # (an offer worked out before another window's change: it could drop all)
            return
        cid = self.conversation_id
        before = len(self.chat.history.messages(cid)) if cid is not None else 0
        if cid is not None:
            self.chat.history.delete_oldest_turns(cid, n)
        dropped = before - (len(self.chat.history.messages(cid)) if cid is not None else 0)
        if not dropped:
            self.notify("There is no turn to drop.")
            return
        self.render_conversation()
        self.count_context()
        self.notify(f"Dropped the {'oldest turn' if n == 1 else f'{n} oldest turns'}.")
