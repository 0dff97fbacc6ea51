"""Structured output and tool calls as grammars, and reading tool calls back.

- `response_format` (`json_object`, `json_schema`) becomes an llguidance
  grammar: the model can only write text that parses (and validates against
  the schema). Non-strict schemas are compiled leniently (unknown keywords
  ignored); `strict: true` refuses what the grammar engine cannot enforce.
- Tools: rayfit's tool-call format is one JSON object per answer,
  `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`. The system
  prompt describes the tools and the format; `tool_choice` `required` or a
  named tool constrains the answer to that object (names limited to the
  allowed tools, arguments to each tool's parameter schema), `auto` lets the
  model either answer in prose or start the object, which is then constrained
  (a grammar with both branches). Models whose chat template renders tools
  still get the same format, so every model calls tools the same way.

Grammars are built here from the request alone (no tokenizer): a bad schema
is a 400 at the ingress, before any replica is asked.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance

from deployments.engine.errors import BadRequestError
from deployments.engine.generation import ToolSpec

# How templates in the Hermes style (Qwen 2.5/3, Hermes, ...) open a call.
TOOL_CALL_TAG = "<tool_call>"

# Compact JSON with the separators OpenAI's own outputs use: no free whitespace,
# so a grammar never lets a small model pad forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_error(grammar: str) -> str | None:
    """The grammar's error without a tokenizer (regex, schema, lark syntax), or None.
    Only llguidance's core: the ingress checks grammars and must not load torch."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    return messages[0] if is_error else None


def _compile_schema(schema: dict[str, Any], *, strict: bool, param: str) -> str:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise BadRequestError(f"{param}: invalid JSON schema: {exc.message}", param=param) from exc
    options = {**_JSON_OPTIONS, "lenient": not strict}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except ValueError as exc:
        raise BadRequestError(f"{param}: invalid JSON schema: {exc}", param=param) from exc
    error = grammar_error(grammar)
    if error:
        raise BadRequestError(f"{param}: schema cannot be enforced: {error}", param=param)
    return grammar


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for an OpenAI `response_format`, or None for plain text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return _compile_schema({"type": "object"}, strict=False, param="response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise BadRequestError(
                "response_format.json_schema.schema must be a JSON schema object", param="response_format"
            )
        strict = bool(spec.get("strict"))
        # Undeclared keys: `strict: true` closes every object that does not say otherwise, as
        # OpenAI's strict mode does (it requires `additionalProperties: false` on every object)
        # and xgrammar, vLLM's default, does. Without `strict` the schema is followed as written,
        # JSON Schema's meaning (an object without `additionalProperties` takes any other key):
        # the client asked for exactly that schema, and one that wants it closed says so.
        if strict:
            schema = closed_schema(schema)
        return _compile_schema(schema, strict=strict, param="response_format.json_schema.schema")
    raise BadRequestError(
        f"response_format type {kind!r} is not supported (use text, json_object or json_schema)",
        param="response_format",
    )


# ------------------------------------------------------------------ tools


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def tool_specs(tools: Sequence[dict[str, Any]]) -> list[ToolSpec]:
    """OpenAI `tools` (function tools) checked: names unique, parameter schemas valid."""
    specs: list[ToolSpec] = []
    for index, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise BadRequestError(f"tools[{index}]: only function tools are supported", param=f"tools.{index}.type")
        function = tool.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"tools[{index}].function.name is required", param=f"tools.{index}.function.name")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        try:
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except jsonschema.SchemaError as exc:
            raise BadRequestError(
                f"tools[{index}] ({name}): invalid parameters schema: {exc.message}",
                param=f"tools.{index}.function.parameters",
            ) from exc
        if any(spec.name == name for spec in specs):
            raise BadRequestError(f"tools: the name {name!r} is used twice", param="tools")
        specs.append(ToolSpec(name, function.get("description") or "", parameters))
    return specs


def chosen_tools(specs: list[ToolSpec], tool_choice: Any) -> tuple[str, list[ToolSpec]]:
    """(mode, tools the answer may call): mode is none, auto or required."""
    if tool_choice is None:
        return ("auto" if specs else "none"), specs
    if tool_choice == "none":
        return "none", []  # the answer may call nothing: it is never read as tool calls either
    if tool_choice in ("auto", "required"):
        if tool_choice == "required" and not specs:
            raise BadRequestError("tool_choice is 'required' but no tools were given", param="tool_choice")
        return tool_choice, specs
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    named = [spec for spec in specs if spec.name == name]
    if not named:
        known = ", ".join(spec.name for spec in specs) or "none"
        raise BadRequestError(
            f"tool_choice names the tool {name!r}, which is not in tools ({known})", param="tool_choice"
        )
    return "required", named


# Keywords whose schemas apply to the same instance as the schema holding them (their keys
# count as that object's declared keys), and those that hold schemas of other values.
_CONJUNCT_LISTS = ("allOf",)
_CONJUNCT_ONES = ("then", "else")
_ALTERNATIVE_LISTS = ("anyOf", "oneOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_ONES = ("items", "additionalItems", "additionalProperties", "contains", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("prefixItems", "items")  # `items` as a list: draft 4-7 tuples
_OBJECT_KEYWORDS = ("properties", "patternProperties", "required", "additionalProperties", "unevaluatedProperties")


def closed_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which every object schema that does not say otherwise takes only its
    declared keys: `additionalProperties: false`, as OpenAI's strict tools and xgrammar (vLLM's
    default) read a schema. JSON Schema itself lets an object without `additionalProperties` take
    any other key, and a small model at temperature 0 then writes undeclared key after undeclared
    key until max_tokens. An explicit `additionalProperties` (true or a schema) or
    `unevaluatedProperties` is kept; `not` and `if` are left as written (closing them would
    change what they match). The caller's dict is not changed.

    Subschemas that apply to the same object (`allOf` branches, `then`/`else`, and `anyOf`/`oneOf`
    branches beside the object's own `properties`) are not closed on their own, which would
    make a key declared in one branch forbidden by another: their keys are declared on the object
    that holds them, which is closed instead. `anyOf`/`oneOf` branches of a schema that is not
    itself an object (e.g. `anyOf: [<an object>, {"type": "null"}]`) are alternatives: each is closed.
    A required key that `properties` lacks is declared (any value), so a closed object stays
    satisfiable."""
    closed = copy.deepcopy(schema)
    _close(closed, whole=True)
    return closed


def _close(schema: Any, *, whole: bool) -> None:
    """Close `schema` in place; `whole` False: it is a branch whose keys its holder declares."""
    if not isinstance(schema, dict):
        return
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                _close(sub, whole=True)
    for key in _SUBSCHEMA_ONES:
        _close(schema.get(key), whole=True)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                _close(sub, whole=True)
    conjuncts = _branches(schema, _CONJUNCT_LISTS, _CONJUNCT_ONES)
    alternatives = _branches(schema, _ALTERNATIVE_LISTS, ())
    one_object = _is_object(schema) or any(_is_object(branch) for branch in conjuncts)
    if not whole or one_object:
        # All of these apply to this one object: its holder (or this schema) declares their keys.
        for branch in conjuncts + alternatives:
            _close(branch, whole=False)
    else:
        for branch in conjuncts:
            _close(branch, whole=False)
        for branch in alternatives:
            _close(branch, whole=True)
    if not (whole and one_object) or "additionalProperties" in schema or "unevaluatedProperties" in schema:
        return
    if not isinstance(schema.get("properties", {}), dict):
        return  # not a valid schema; left for the validator to refuse
    properties = schema.setdefault("properties", {})
    if not schema.get("patternProperties"):  # a required key may match a pattern: leave those alone
        for name in _declared_keys(schema):
            properties.setdefault(name, {})
    schema["additionalProperties"] = False


def _branches(schema: dict[str, Any], lists: tuple[str, ...], ones: tuple[str, ...]) -> list[dict[str, Any]]:
    found = [sub for key in lists if isinstance(schema.get(key), list) for sub in schema[key]]
    found += [schema[key] for key in ones if key in schema]
    return [sub for sub in found if isinstance(sub, dict)]


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind is None:
        return any(key in schema for key in _OBJECT_KEYWORDS)
    return kind == "object" or (isinstance(kind, list) and "object" in kind)


def _declared_keys(schema: dict[str, Any]) -> list[str]:
    """The keys `schema` and the branches applied with it name (`properties`, `required`)."""
    names = list(schema["properties"]) if isinstance(schema.get("properties"), dict) else []
    names += [name for name in schema.get("required") or [] if isinstance(name, str)]
    for branch in _branches(schema, _CONJUNCT_LISTS + _ALTERNATIVE_LISTS, _CONJUNCT_ONES):
        names += _declared_keys(branch)
    return list(dict.fromkeys(names))


def _call_schema(specs: list[ToolSpec]) -> dict[str, Any]:
    """One call: `{"name": <an allowed tool>, "arguments": <that tool's parameters>}`, the arguments
    closed to the keys the tool declares (closed_schema)."""
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": spec.name}, "arguments": closed_schema(spec.parameters)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for spec in specs
        ],
        "x-guidance": _JSON_OPTIONS,  # compact: a `%json` inside a Lark grammar takes its options from here
    }


def _calls_schema(specs: list[ToolSpec], parallel: bool) -> dict[str, Any]:
    calls: dict[str, Any] = {"type": "array", "items": _call_schema(specs), "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    return {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
        "x-guidance": _JSON_OPTIONS,
    }


def tool_call_grammar(specs: list[ToolSpec], mode: str, parallel: bool) -> str | None:
    """rayfit's JSON format: the call object (required), or prose or the call object (auto)."""
    if mode == "none" or not specs:
        return None
    calls = f"%json {json.dumps(_calls_schema(specs, parallel))}"
    return _tool_grammar(calls, mode, prose=r"/[^{\s](.|\n)*/")


def tagged_tool_call_grammar(specs: list[ToolSpec], mode: str, parallel: bool) -> str | None:
    """The Hermes-style format: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` blocks,
    one per line when `parallel`; under auto the answer may be prose instead (not opening with "<")."""
    if mode == "none" or not specs:
        return None
    call = f'"{TOOL_CALL_TAG}\\n" %json {json.dumps(_call_schema(specs))} "\\n</tool_call>"'
    rules = f"call: {call}\ncalls: call" + (' ("\\n" call)*' if parallel else "")
    return _tool_grammar("calls", mode, prose=r"/[^<\s](.|\n)*/", rules=rules)


def _tool_grammar(calls: str, mode: str, *, prose: str, rules: str = "") -> str:
    start = f"start: {calls}" if mode == "required" else f"start: TEXT | {calls}\nTEXT: {prose}"
    grammar = llguidance.LLMatcher.grammar_from_lark(f"{start}\n{rules}")
    error = grammar_error(grammar)
    if error:
        raise BadRequestError(f"tools cannot be enforced: {error}", param="tools")
    return grammar


def tools_prompt(specs: list[ToolSpec], mode: str, parallel: bool) -> str:
    """The system-prompt text that tells the model its tools and the call format."""
    lines = ["You can call these tools (JSON schema of each tool's arguments):"]
    for spec in specs:
        lines.append(f"- {spec.name}: {spec.description} Arguments: {json.dumps(spec.parameters)}")
    many = "one or more calls" if parallel else "exactly one call"
    lines.append(
        f"To call tools, answer with only this JSON ({many}): "
        '{"tool_calls": [{"name": "<tool>", "arguments": {...}}]}'
    )
    if mode == "required":
        lines.append("You must call a tool now.")
    else:
        lines.append("If no tool is needed, answer the user in plain text.")
    return "\n".join(lines)


def parse_tool_calls(text: str, specs: list[ToolSpec]) -> list[ToolCall] | None:
    """The tool calls in an answer, or None when it is prose (or holds no valid call).

    Reads both formats (deployments.engine.tool_formats): rayfit's `{"tool_calls": [...]}`
    object and `<tool_call>{...}</tool_call>` blocks. An answer cut off by
    max_tokens in the middle of a later call keeps the calls it completed (a
    small model tends to repeat calls until the limit)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        calls = _json_calls(stripped)
    elif stripped.startswith(TOOL_CALL_TAG):
        calls = _tagged_calls(stripped)
    else:
        return None
    if not calls:
        return None
    by_name = {spec.name: spec for spec in specs}
    parsed = []
    for call in calls:
        spec = by_name.get(call.get("name")) if isinstance(call, dict) else None
        arguments = call.get("arguments") if spec is not None else None
        if spec is None or not isinstance(arguments, dict):
            return None
        try:
            jsonschema.validate(arguments, spec.parameters)
        except jsonschema.ValidationError:
            return None
        parsed.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=spec.name, arguments=json.dumps(arguments)))
    return parsed


def _json_calls(text: str) -> list[Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return _complete_calls(text)
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    return calls if isinstance(calls, list) else None


def _tagged_calls(text: str) -> list[Any] | None:
    """The complete `<tool_call>…</tool_call>` blocks of an answer (a cut last block is dropped)."""
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S):
        try:
            calls.append(json.loads(body))
        except json.JSONDecodeError:
            return None
    return calls


class ToolCallHoldBack:
    """A streamed answer with tools: text that opens like a call (`{` or `<tool_call>`) is held
    back until the answer ends and then read as tool calls; prose is released as soon as it shows."""

    def __init__(self, specs: list[ToolSpec]):
        self.specs = specs
        self._held: str | None = "" if specs else None  # None: nothing (more) to hold

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCall] | None]:
        """(text to send now, the tool calls once the answer ended as a call object)."""
        if self._held is None:
            return text, None
        self._held += text
        opening = self._held.lstrip()
        if opening and not _may_open_call(opening):
            text, self._held = self._held, None  # prose: send what was held, stream the rest
            return text, None
        if not finished:
            return "", None
        held, self._held = self._held, None
        calls = parse_tool_calls(held, self.specs)
        return ("" if calls else held), calls


def _may_open_call(text: str) -> bool:
    return text.startswith(("{", TOOL_CALL_TAG)) or TOOL_CALL_TAG.startswith(text)


def _complete_calls(text: str) -> list[Any] | None:
    """The whole call objects at the start of a truncated `{"tool_calls": [...` answer."""
    opening = re.match(r'\{\s*"tool_calls"\s*:\s*\[\s*', text)
    if opening is None:
        return None
    decoder, position, calls = json.JSONDecoder(), opening.end(), []
    while True:
        try:
            call, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return calls
        calls.append(call)
        separator = re.match(r"\s*,\s*", text[position:])
        if separator is None:
            return calls
        position += separator.end()


def history_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool turns of a chat history as plain text turns any chat template can render:
    an assistant's `tool_calls` as the call object it wrote, a `tool` result as a user turn."""
    out = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": call["function"]["name"], "arguments": _arguments(call["function"].get("arguments"))}
                for call in message["tool_calls"]
            ]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif role == "tool":
            call_id = message.get("tool_call_id") or "?"
            out.append({"role": "user", "content": f"Tool result ({call_id}): {_text(message.get('content'))}"})
        else:
            out.append(message)
    return out


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)
