"""The App: owns the backend, the history store and the recorder; screens do the rest."""

from __future__ import annotations

import asyncio
import signal

from dataclasses import replace
from typing import Any, Callable, Iterable

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.notifications import SeverityLevel
from textual.screen import Screen

from .backend import NO_MODEL_CHOSEN, Backend
from .events import AssistantChanged, AssistantRefused, DrafterSkipped
from .history import History
from .model_source import DEFAULT_NAME, hub_reachable, models_dir
from .recorder import Recorder
from .settings_store import SettingsStore
from .screens.chat import ChatScreen
from .screens.conversations import Choice, ConversationsScreen
from .screens.get_model import GetModelScreen
from .screens.help import HelpScreen
from .screens.settings import SettingsScreen


def key_label(keys: str) -> str:
    """"ctrl+o,escape" -> "Ctrl+O / Esc"."""
    names = {"escape": "Esc", "delete": "Del", "enter": "Enter"}

    def one(key: str) -> str:
        *mods, base = key.split("+")
        base = names.get(base, base.upper() if len(base) <= 3 else base.capitalize())
        return "+".join([m.capitalize() for m in mods] + [base])

    return " / ".join(one(k.strip()) for k in keys.split(","))


class ChatApp(App):
    TITLE = "gemma4-chat"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit")]

    def __init__(
        self,
        backend: Backend,
        history: History,
        recorder: Recorder | None = None,
        resume: int | bool | None = None,
        offer_download: bool = False,
        messages: list[str] = (),
        settings_store: SettingsStore | None = None,
        hub_check: Callable[[], bool] = hub_reachable,
        one_run: dict[str, Any] | None = None,
    ) -> None:
        """``one_run``: the settings the command line set for this run only ({name: value}; an ``assistant`` there
        is kept once the model has loaded with it, when it is known to fit): what is saved keeps the stored value
        of each one the user has not changed since."""
        super().__init__()
        self.backend = backend
        self.history = history
        self.data_dir = history.dir
        self.settings_store = settings_store
        self.one_run = dict(one_run or {})
        self.stored = settings_store.load() if settings_store is not None else None
        self.hub_check = hub_check
        self.recorder = recorder or Recorder(history.dir / "recordings")
        self.copied_by: str | None = None   # the system clipboard tool the last copy went to (copy_to_clipboard)
        self.resume_id = resume
        self.offer_download = offer_download
        self.startup_messages = list(messages)
        self.chat_screen = ChatScreen()

    async def on_mount(self) -> None:
        await self.push_screen(self.chat_screen)
        # A closed terminal window (SIGHUP) or `kill` (SIGTERM) quits as Ctrl+Q does: the answer so far is saved
        # and the terminal is given back as it was (they ended the process mid-frame, answer lost).
        for name in ("SIGTERM", "SIGHUP"):
            try:
                asyncio.get_running_loop().add_signal_handler(getattr(signal, name), self.exit)
            except (AttributeError, NotImplementedError, RuntimeError, ValueError):  # Windows; not the main thread
                pass
        for text in self.startup_messages + ([self.history.notice] if self.history.notice else []):
            self.chat_screen.notice(text, "warning")
        if self.offer_download:
            self.chat_screen.query_one("#loading").display = False  # nothing loads until a model is chosen
            self.ask_to_download()
        else:
            self.backend.load(self.chat_screen.post_message)
        if self.resume_id is not None and self.resume_id is not False:   # (--resume 0 was ignored without a word)
            latest = self.history.latest() if self.resume_id is True else self.history.get(int(self.resume_id))
            if latest is None:
                self.chat_screen.notice("There is no saved conversation to resume." if self.resume_id is True else
                                        f"There is no saved conversation #{self.resume_id}; Ctrl+L lists the "
                                        "saved ones.", "warning")
            else:
                self.resume(latest.id)

    def on_unmount(self) -> None:
        # Stop the model's thread and wait for it: a thread still running when the interpreter exits can abort it.
        self.chat_screen.keep_partial_answer()
        self.backend.shutdown()
        if self.recorder.recording:
            self.recorder.cancel()

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        # Toasts carry file names, paths and error text, which show as written ("photo [1].png"), never as markup;
        # but Textual's own screenshot toast is written in markup (it showed "[$text-success]").
        if title == "Screenshot" and markup:
            from textual.content import Content

            message = Content.from_markup(message).plain
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """Textual's screenshot, into the Downloads folder, or the app's data folder where there is none (a
        headless Linux): it failed there, with no reason given."""
        if path is None:
            from platformdirs import user_downloads_path

            path = str(user_downloads_path() if user_downloads_path().is_dir() else self.history.dir)
        super().action_screenshot(filename, path)

    def action_help_quit(self) -> None:
        # Textual's own hint for Ctrl+C is written in markup, which toasts here do not read.
        self.notify("Press Ctrl+Q to quit the app.", title="Do you want to quit?")

    def ask_to_download(self) -> None:
        def answered(choice: str | None) -> None:
            if choice == "download":
                self.chat_screen.query_one("#loading").display = True
                self.chat_screen.query_one("#status").state = "loading"
                self.backend.load(self.chat_screen.post_message)
            elif choice == "demo":
                self.use_demo()
            elif choice == "quit":
                self.exit()
            else:  # nothing will load: messages are refused with this reason rather than waiting for a model
                self.backend.load_error = NO_MODEL_CHOSEN
                self.chat_screen.load_failed_text(
                    "No model loaded. Ctrl+P 'Get a model' asks again (download, or the demo); or start again with "
                    "--model DIR naming a converted model.")

        dest = models_dir(self.data_dir) / DEFAULT_NAME
        self.chat_screen.query_one("#status").state = "no model yet"   # not "loading": nothing loads until chosen
        self.push_screen(GetModelScreen(dest, self.hub_check), answered)

    def use_demo(self) -> None:
        """Swap in the tiny random-weight model, with its own history (demo chats stay apart from real ones)."""
        from .demo import build_demo

        self.backend.shutdown()
        self.backend = Backend("demo (random weights)", build_demo, demo=True, settings=self.backend.settings)
        self.history = History(self.data_dir / "demo")
        self.chat_screen.open_conversation(None)   # the one on show is the other history's: a new one in this
        self.chat_screen.model_changed()
        self.backend.load(self.chat_screen.post_message)

    def model_loaded(self) -> None:
        """The model loaded (with the drafter the command line named, if any: it fits, so it is kept now)."""
        if self.one_run.get("assistant") and self.backend.settings.assistant == self.one_run["assistant"]:
            del self.one_run["assistant"]
            self.save_settings()

    def save_settings(self) -> None:
        if self.settings_store is None:
            return
        settings = self.backend.settings
        for name, value in self.one_run.items():
            if getattr(settings, name) == value:   # still the command line's value for this run: not kept
                settings = replace(settings, **{name: getattr(self.stored, name)})
        try:
            self.settings_store.save(settings)
            self.stored = settings
        except OSError as e:  # a read-only or full data folder: the settings still hold for this run
            self.notify(f"The settings hold for this run but could not be saved ({e}). Make {self.data_dir} "
                        "writable, or start with --data-dir pointing at a writable folder.", severity="error",
                        timeout=12)

    def resume(self, conversation_id: int) -> None:
        """Show a saved conversation; the model picks it up from the history store with the next message."""
        self.chat_screen.open_conversation(conversation_id)

    @on(AssistantChanged)
    def assistant_changed(self, event: AssistantChanged) -> None:
        self.one_run.pop("assistant", None)   # chosen now: kept, whatever this run started with
        self.backend.settings = replace(self.backend.settings, assistant=event.path)
        self.save_settings()
        status = self.chat_screen.query_one("#status")
        status.stats = replace(status.stats, drafted_tokens=0, accepted_tokens=0)  # the last turn's drafts
        self.chat_screen.count_context()  # a new session: its cache starts empty
        self.notify(f"Drafter {event.path} in use: answers decode speculatively, with the same text."
                    if event.path else "Drafter off: answers decode without one.")

    @on(DrafterSkipped)
    def drafter_skipped(self, event: DrafterSkipped) -> None:
        # This run decodes without it (the backend's settings say so); the saved setting stays (it may fit the
        # model it was chosen with).
        self.one_run["assistant"] = ""
        self.notify(f"The drafter {event.path} was not used: {event.error} Answers decode without one; F2 sets "
                    "another.", severity="error", timeout=15)

    @on(AssistantRefused)
    def assistant_refused(self, event: AssistantRefused) -> None:
        kept = self.backend.settings.assistant or "none"
        self.notify(f"The drafter {event.path} was not taken: {event.error} The drafter stays as it was ({kept}).",
                    severity="error", timeout=12)

    @on(ConversationsScreen.Deleted)
    def conversation_deleted(self, event: ConversationsScreen.Deleted) -> None:
        if event.conversation_id == self.chat_screen.conversation_id:
            self.chat_screen.open_conversation(None)  # stops its answer first

    # -- actions shared by the palette and the chat screen's keys ------------------------------------

    def action_help(self) -> None:
        rows = [(key_label(b.key), b.description) for b in ChatScreen.BINDINGS]
        rows += [("Ctrl+P", "commands: export…"), ("Ctrl+Q", "quit")]
        self.push_screen(HelpScreen(rows))

    def action_settings(self) -> None:
        old = self.backend.settings

        def saved(new) -> None:
            if new is None:
                return
            # a new drafter is kept once the model's thread has loaded it and found that it fits
            self.backend.settings = replace(new, assistant=old.assistant)
            self.save_settings()
            if new.assistant != old.assistant:
                self.backend.set_assistant(self.chat_screen.post_message, new.assistant)
            self.chat_screen.query_one("#status").thinking = new.enable_thinking
            if new.system_prompt != old.system_prompt:
                self.chat_screen.action_new_conversation()
                self.notify("System prompt changed; new conversation started.")

        stats = self.chat_screen.query_one("#status").stats
        used, limit = stats.context_used, stats.context_limit
        info = f"Model: {self.backend.name}" + (f" · context {used}/{limit} tokens" if limit else "")
        self.push_screen(SettingsScreen(self.backend.settings, info), saved)

    def action_conversations(self) -> None:
        def chosen(choice: Choice | None) -> None:
            if choice is not None:
                self.resume(choice.conversation_id)

        self.push_screen(ConversationsScreen(self.history), chosen)

    def action_export(self) -> None:
        cid = self.chat_screen.conversation_id
        if cid is None:
            self.notify("Nothing to export yet.")
            return
        try:
            self.notify(f"Exported to {self.history.export_markdown(cid)}", timeout=8)
        except OSError as e:
            self.notify(f"Could not export: {e}. Make {self.history.dir} writable, or start with --data-dir "
                        "pointing at a writable folder.", severity="error", timeout=12)

    def copy_to_clipboard(self, text: str) -> None:
        """The terminal's clipboard (OSC 52, which Textual sends) and, where there is one, the system's: macOS
        Terminal ignores OSC 52, so "Copied" was said and nothing was. ``copied_by`` says which took it."""
        super().copy_to_clipboard(text)
        self.copied_by = system_clipboard(text)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is not self.chat_screen:
            # Over a dialog the chat's commands acted on the chat behind it, and Settings opened a second settings
            # dialog on top of the first (saving the lower one undid the upper one's changes).
            return
        chat = self.chat_screen
        yield SystemCommand("Toggle thinking", "Show the model's reasoning (Ctrl+T)", chat.action_toggle_thinking)
        yield SystemCommand("Regenerate", "Answer the last message again (Ctrl+G)", chat.action_regenerate)
        yield SystemCommand("Copy last answer", "To the clipboard (F3)", chat.action_copy_answer)
        yield SystemCommand("Copy last code block", "To the clipboard (Ctrl+B)", chat.action_copy_code)
        yield SystemCommand("Attach a file", "Image, audio or video (Ctrl+O)", chat.action_attach)
        yield SystemCommand("Record from the microphone", "Start / stop (Ctrl+R)", chat.action_record)
        yield SystemCommand("New conversation", "Start over (Ctrl+N)", chat.action_new_conversation)
        yield SystemCommand("Conversations", "Resume, delete or export saved chats (Ctrl+L)", self.action_conversations)
        yield SystemCommand("Export conversation", "Save this chat as Markdown", self.action_export)
        yield SystemCommand("Drop oldest turn", "Make room in the context", chat.drop_oldest_turn)
        yield SystemCommand("Settings", "System prompt, thinking, sampling, drafter (F2)", self.action_settings)
        yield SystemCommand("Help", "Keys and commands (F1)", self.action_help)
        if self.backend.load_error == NO_MODEL_CHOSEN:   # the first-run dialog was closed: it can be had again
            yield SystemCommand("Get a model", "Download Gemma 4 E4B, or try the demo", self.ask_to_download)


def system_clipboard(text: str) -> str | None:
    """Put ``text`` on the system clipboard with the platform's tool (pbcopy; wl-copy or xclip under a display);
    the tool's name, or None where there is none (over SSH, a bare console) or it failed."""
    import os
    import shutil
    import subprocess
    import sys

    tools = [["pbcopy"]] if sys.platform == "darwin" else []
    if os.environ.get("WAYLAND_DISPLAY"):
        tools.append(["wl-copy"])
    if os.environ.get("DISPLAY"):
        tools += [["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]]
    for tool in tools:
        if shutil.which(tool[0]) is None:
            continue
        try:
            subprocess.run(tool, input=text.encode(), check=True, timeout=3, capture_output=True)
            return tool[0]
        except (OSError, subprocess.SubprocessError):
            continue
    return None
