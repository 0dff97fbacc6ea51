"""How a model is told about its tools, and which grammar its calls follow.

Two formats; the replica picks one per model (`tool_format` in
model_configs.yaml, `auto` by default):

- `json`, rayfit's own, for any model: the system prompt lists the tools and
  asks for `{"tool_calls": [{"name": ..., "arguments": {...}}]}`; tool turns
  of the history become plain turns any template can render. Gemma 3 /
  MedGemma and the demo's SmolLM2, whose templates know no tools, use it.
- `hermes`: the chat template renders the tools itself
  (`apply_chat_template(..., tools=...)`), also the history's assistant
  `tool_calls` and `tool` turns, and the model answers with
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, the
  format the model was trained on (Qwen 2.5 / 3, Hermes and many more).

`auto` picks `hermes` when the chat template takes `tools` and writes
`<tool_call>`; any other template gets `json` (a template with another
format of its own, e.g. Llama 3.1's, still gets rayfit's: set a template
with `chat_template:` to change that). Both formats are constrained alike:
`required` or a named tool allow only calls, `auto` prose or calls.

The ingress reads both formats back (deployments.engine.structured.parse_tool_calls),
so it never needs to know which one a model uses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.structured import TOOL_CALL_TAG, history_messages, tagged_tool_call_grammar, tools_prompt

ToolFormatName = Literal["json", "hermes"]


def detect_tool_format(chat_template: str | None) -> ToolFormatName:
    """`hermes` for a template that renders `tools` and writes `<tool_call>` blocks, else `json`."""
    if chat_template and "tools" in chat_template and TOOL_CALL_TAG in chat_template:
        return "hermes"
    return "json"


class ToolFormat:
    """One model's tool format: the messages and template arguments a chat request renders
    with, and the grammar its calls follow."""

    def __init__(self, name: str):
        if name not in ("json", "hermes"):
            raise ValueError(f"tool_format must be auto, json or hermes, not {name!r}")
        self.name = name

    def chat(self, inp: GenerationInput) -> tuple[list[dict], dict[str, Any]]:
        """(messages for the chat template, extra apply_chat_template arguments)."""
        messages = list(inp.messages or ())
        tools = inp.tools
        if self.name == "json":
            messages = history_messages(messages)
            if tools is not None:
                messages = _with_system(messages, tools_prompt(list(tools.tools), tools.mode, tools.parallel))
            return messages, {}
        template_args = {"tools": [spec.as_openai() for spec in tools.tools]} if tools is not None else {}
        return [_template_message(message) for message in messages], template_args

    def params(self, inp: GenerationInput) -> SamplingParams:
        """The request's sampling settings with this format's call grammar. The ingress already
        set the json format's grammar (building it checked the schemas); hermes swaps it."""
        tools = inp.tools
        if self.name == "json" or tools is None:
            return inp.params
        grammar = tagged_tool_call_grammar(list(tools.tools), tools.mode, tools.parallel)
        rules = dataclasses.replace(inp.params.rules, grammar=grammar)
        return dataclasses.replace(inp.params, rules=rules)


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` appended to the first system message, or a new system message first."""
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A history message as templates that render tools expect it: call arguments as objects
    (OpenAI sends them as JSON text)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    rendered = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass  # left as text: the template renders what the client sent
        rendered.append({**call, "function": function})
    return {**message, "tool_calls": rendered}
