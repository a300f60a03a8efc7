"""A tool loop over plain Python functions: the model answers, its tool calls are run, their results go back as
tool turns, and the model answers again, until it answers without calls or the step limit is reached.

    loop = ToolLoop(session, [{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather])
    for event in loop:          # ChatResponse pieces as they stream, and a ToolRun after each call
        ...
    loop.answer.text, loop.messages   # the last answer; the conversation with every assistant and tool turn

``run_tools(...)`` does the same without streaming and returns the finished loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .chat import ChatResponse, ChatSession
from .errors import InputError
from .generation import check_positive_int
from .tool_use import Answer, tool_result_message
from .tools import ToolCall, tool_schema

logger = logging.getLogger(__name__)


@dataclass
class ToolRun:
    """One call that was run: what it returned (the error text given to the model if it failed), and ``error``."""

    call: ToolCall
    result: Any
    error: str | None = None


class ToolLoop:
    """Iterate to run the loop (see the module docstring). ``messages`` starts as a copy of the given ones and
    grows by each assistant and tool turn; ``answer`` is the last answer; ``finished`` is False when the step
    limit stopped the loop with calls still unanswered; ``runs`` lists every call that was run.

    A tool that raises does not end the loop: the model is told the error as the call's result (it may try
    again or answer without it). A call that does not parse raises ``ToolCallError`` with the raw text.
    """

    def __init__(self, session: ChatSession, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                 *, max_steps: int = 8, **gen_kwargs: Any) -> None:
        check_positive_int("max_steps", max_steps)
        self.session = session
        self.tools = list((session.tools or []) if tools is None else tools)
        self.functions: dict[str, Callable[..., Any]] = {}
        for tool in self.tools:
            if callable(tool):
                self.functions[tool_schema(tool)["function"]["name"]] = tool
        self.messages = [dict(m) for m in messages]
        self.max_steps = max_steps
        self.gen_kwargs = gen_kwargs
        self.answer: Answer | None = None
        self.finished = False
        self.steps = 0
        self.runs: list[ToolRun] = []

    def __iter__(self) -> Iterator[ChatResponse | ToolRun]:
        while self.steps < self.max_steps:
            self.steps += 1
            answer = None
            for r in self.session.stream(self.messages, tools=self.tools, **self.gen_kwargs):
                answer = r.answer or answer
                yield r
            if answer is None:
                return
            self.answer = answer
            if answer.error is not None:
                raise answer.error
            self.messages.append(answer.to_message() if answer.tool_calls
                                 else {"role": "assistant", "content": answer.text})
            if not answer.tool_calls:
                self.finished = True
                return
            if self.steps == self.max_steps:
                return  # the calls stay unanswered: the caller may run them and go on
            for call in answer.tool_calls:
                run = self.run(call)
                self.runs.append(run)
                self.messages.append(tool_result_message(call, run.result))
                yield run

    def run(self, call: ToolCall) -> ToolRun:
        """Run one call; failures become a result the model can read."""
        fn = self.functions.get(call.name)
        if fn is None:
            known = ", ".join(sorted(self.functions)) or "none"
            error = f"There is no tool named {call.name!r}; the tools are: {known}."
            return ToolRun(call, f"Error: {error}", error)
        try:
            return ToolRun(call, fn(**call.arguments))
        except Exception as e:  # noqa: BLE001 (any failure of a tool is told to the model, which may recover)
            logger.info("tool %s failed: %r", call.name, e)
            error = f"{type(e).__name__}: {e}"
            return ToolRun(call, f"Error: {error}", error)


def run_tools(session: ChatSession, messages: list[dict[str, Any]], tools: list[Any] | None = None, *,
              max_steps: int = 8, **gen_kwargs: Any) -> ToolLoop:
    """Run a ``ToolLoop`` to its end and return it (``answer``, ``messages``, ``runs``, ``finished``)."""
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise InputError("tools must be a list of functions or JSON-schema dicts.")
    loop = ToolLoop(session, messages, tools, max_steps=max_steps, **gen_kwargs)
    for _ in loop:
        pass
    return loop
