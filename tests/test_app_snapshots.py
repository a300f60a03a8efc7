"""Snapshots (pytest-textual-snapshot) of the chat, help and settings screens at 80x24 over a scripted session.

Update them after an intended change with: pytest tests/test_app_snapshots.py --snapshot-update
"""

from __future__ import annotations

from tests.app_helpers import answered_and_counted, make_app, send, until

REPLY = "Here is a list:\n\n- **bold** item\n- `code` item\n\n```python\nprint('hi')\n```"
SIZE = (80, 24)  # the MacBook terminal's default


def chat_app(tmp_path):
    return make_app(tmp_path, reply=REPLY)


async def steady(pilot) -> None:
    """Stop cursors blinking, so a slow machine cannot catch one half way through a blink."""
    for screen in (pilot.app.chat_screen, pilot.app.screen):
        for widget in screen.query("*"):
            if hasattr(widget, "cursor_blink"):
                widget.cursor_blink = False
    await pilot.pause()


async def after_answer(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.backend.loaded)
    await send(pilot, "Show me a list")
    await answered_and_counted(pilot)
    await pilot.pause(0.1)
    await steady(pilot)


def test_chat_screen(snap_compare, tmp_path):
    assert snap_compare(chat_app(tmp_path), terminal_size=SIZE, run_before=after_answer)


def test_help_screen(snap_compare, tmp_path):
    async def open_help(pilot):
        await until(pilot, lambda: pilot.app.backend.loaded)
        await pilot.press("f1")
        await pilot.pause(0.1)
        await steady(pilot)

    assert snap_compare(chat_app(tmp_path), terminal_size=SIZE, run_before=open_help)


def test_settings_screen(snap_compare, tmp_path):
    async def open_settings(pilot):
        await until(pilot, lambda: pilot.app.backend.loaded)
        await pilot.press("f2")
        await pilot.pause(0.1)
        await steady(pilot)

    assert snap_compare(chat_app(tmp_path), terminal_size=SIZE, run_before=open_settings)
