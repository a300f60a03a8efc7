"""The app shows the tool calls a model makes as calls (name, arguments, result), never as the tokens they were
written in; they are kept with the answer and given back to the model as calls with their results."""

from __future__ import annotations

import asyncio

from app.history import History
from app.widgets.messages import ModelMessage
from app.widgets.tool_calls import NOT_RUN, ToolCallView
from tests.app_helpers import make_app, send
from tests.app_helpers import until as wait_for

Q = '<|"|>'
# Streamed a word at a time: the call arrives in pieces and is shown once it is complete.
REPLY = f"Let me check. <|tool_call>call:get_weather{{city:{Q}New York{Q},days:2}}<tool_call|>"


def test_tool_call_is_shown_as_a_call_and_kept(tmp_path):
    asyncio.run(_tool_call_is_shown_as_a_call_and_kept(tmp_path))


async def _tool_call_is_shown_as_a_call_and_kept(tmp_path):
    app = make_app(tmp_path, reply=REPLY)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "weather?")
        chat = app.chat_screen
        await wait_for(pilot, lambda: not chat.generating and chat.query(ToolCallView))
        msg = chat.query_one(ModelMessage)
        assert msg.answer == "Let me check." and "tool_call" not in msg.answer
        [view] = chat.query(ToolCallView)
        assert view.text() == f'⚙ get_weather(city="New York", days=2)\n→ {NOT_RUN}'
        assert "get_weather" in str(view.render())
        # The next turn gives the model the call, the result it got and the answer's text.
        await send(pilot, "and tomorrow?")
        await wait_for(pilot, lambda: len(app.sessions[0].calls) == 2 and not chat.generating)
        sent = app.sessions[0].calls[1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
        call = sent[1]["tool_calls"][0]
        assert call["function"] == {"name": "get_weather", "arguments": {"city": "New York", "days": 2}}
        assert sent[2] == {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": NOT_RUN}
        assert sent[3] == {"role": "assistant", "content": "Let me check."}
        # Opened again from the history, the answer shows its call again.
        conversation = chat.conversation_id
        chat.open_conversation(None)
        await pilot.pause()
        chat.open_conversation(conversation)
        await wait_for(pilot, lambda: len(chat.query(ToolCallView)) == 2)
    h = History(tmp_path / "data")
    [conv] = h.conversations()
    first = h.messages(conv.id)[1]
    assert first.content == "Let me check."
    assert first.stats["tool_calls"][0]["arguments"] == {"city": "New York", "days": 2}


def test_control_characters_never_reach_the_terminal(tmp_path):
    asyncio.run(_control_characters_never_reach_the_terminal(tmp_path))


async def _control_characters_never_reach_the_terminal(tmp_path):
    # A model can write escape sequences and bells, in its answer and inside a call's arguments.
    reply = f"\x1b[2JCleared\x07 <|tool_call>call:echo{{text:{Q}\x1b[31mred\x7f{Q}}}<tool_call|>"
    app = make_app(tmp_path, reply=reply)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.backend.loaded)
        await send(pilot, "go")
        chat = app.chat_screen
        await wait_for(pilot, lambda: not chat.generating and chat.query(ToolCallView))
        msg = chat.query_one(ModelMessage)
        assert msg.answer == "[2JCleared"
        [view] = chat.query(ToolCallView)
        assert not any(c in view.text() for c in "\x1b\x07\x7f")
        assert "red" in view.text()
