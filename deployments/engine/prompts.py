"""Requests into model inputs: chat templating, images, tokenizing, the context check.

Chat `messages` go through the processor's (image+text) or the tokenizer's
chat template; a tokenizer without one gets `FALLBACK_TEMPLATE` ("role:
content" lines, then "assistant:"). A raw `prompt` is tokenized as is (with
the tokenizer's BOS). Also here: the special tokens generation needs (the pad
token for left padding, the ids that end a turn).

Histories as agents send them, on templates that demand alternation (Gemma 3's
raises "Conversation roles must alternate" on two turns of one role in a row):
`developer` is rendered as `system` (OpenAI's newer name) unless the template
knows the role; where the template refuses two user turns in a row (probed once
per template), consecutive turns of one role are merged into one (texts joined
by a blank line, image parts kept in order), e.g. the two `tool` results after
parallel calls, which the json tool format renders as user turns. A final
assistant message marked `prefix` (the API's `continue_final_message`) is
continued rather than answered. What a template still refuses is a 400 with the
template's own words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
from PIL import Image

from deployments.engine.errors import InvalidRequest
from deployments.engine.generation import GenerationInput
from deployments.engine.images import decode_image_url
from deployments.engine.loading import LoadedModel
from deployments.engine.tool_formats import ToolFormat, detect_tool_format

# For tokenizers without a chat template (e.g. a base model's GGUF): plain
# "role: content" lines, then "assistant:" for the model to continue.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Special tokens that end an assistant turn in common chat templates; a model's
# generation_config often lists only <eos>, so these are added when present.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
# Turns that carry tool calls or answer one keep their own message (a template that renders them
# needs each); only plain turns are merged.
_UNMERGEABLE_KEYS = ("tool_calls", "tool_call_id")
# A final assistant message with this key set is continued (a prefilled answer), not answered.
PREFIX_KEY = "prefix"


@dataclass(frozen=True)
class PreparedPrompt:
    """One request turned into model inputs."""

    input_ids: list[int]
    # Processor outputs besides input_ids/attention_mask (pixel_values, ...), image requests only.
    extra_inputs: dict[str, torch.Tensor] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def pad_token_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    configured = getattr(loaded.model.generation_config, "pad_token_id", None)
    for candidate in (tok.pad_token_id, tok.eos_token_id, configured):
        if isinstance(candidate, int):
            return candidate
    return 0


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """The model's EOS ids plus the end-of-turn tokens its vocabulary has."""
    ids: list[int] = []
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    for value in (configured, loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(value)
    vocab = loaded.tokenizer.get_vocab()
    ids.extend(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(set(ids))


def _content_parts(content: Any) -> list[dict]:
    """OpenAI content (str or list of parts) as a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise InvalidRequest(f"message content must be a string or a list of parts, got {type(content).__name__}")


class Prompter:
    """Renders and tokenizes requests for one loaded model."""

    def __init__(self, loaded: LoadedModel, context_length: int, tool_format: ToolFormat | None = None):
        """`context_length`: the replica plan's (prompt + max_tokens never exceed it)."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.context_length = context_length
        self.tool_format = tool_format or ToolFormat(detect_tool_format(self.chat_template))
        # Chat template text → whether it refuses two user turns in a row (probed once per template).
        self._refuses_repeats: dict[str, bool] = {}

    @property
    def chat_template(self) -> str | None:
        """The template chat requests are rendered with (None: FALLBACK_TEMPLATE)."""
        owner = self.processor if self.processor is not None else self.tokenizer
        return getattr(owner, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def prepare(self, inp: GenerationInput) -> PreparedPrompt:
        """Render and tokenize one request; check it fits the context."""
        if sum(x is not None for x in (inp.messages, inp.prompt, inp.prompt_ids)) != 1:
            raise InvalidRequest("give exactly one of `messages`, `prompt` or `prompt_ids`")
        if inp.params.max_tokens < (0 if inp.echo else 1):  # echo may score the prompt alone
            raise InvalidRequest(f"max_tokens must be at least 1, got {inp.params.max_tokens}")
        images: list[Image.Image] = []
        if inp.messages is not None:
            # The tool format decides how tools and tool turns reach the template.
            messages, template_args = self.tool_format.chat(inp)
            messages, images = self._normalize_messages(messages)
            text = self._render_chat(messages, template_args)
            # The template already wrote BOS where the model wants it.
            add_special = False
        else:
            text = inp.prompt or ""
            add_special = True
        if images:
            assert self.processor is not None  # images only pass _normalize_messages on multimodal models
            batch = self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=add_special)
            ids = batch["input_ids"][0].tolist()
            extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            prepared = PreparedPrompt(input_ids=ids, extra_inputs=extra)
        elif inp.prompt_ids is not None:
            prepared = PreparedPrompt(input_ids=self._checked_ids(inp.prompt_ids))
        else:
            ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
            prepared = PreparedPrompt(input_ids=list(ids))
        total = prepared.prompt_tokens + inp.params.max_tokens
        if total > self.context_length:
            raise InvalidRequest(
                f"prompt has {prepared.prompt_tokens} tokens and max_tokens is {inp.params.max_tokens}: "
                f"{total} exceeds the model's context length of {self.context_length} tokens"
            )
        return prepared

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        """A token-id prompt, fed as it is: every id must be one of the model's."""
        vocab = int(self.loaded.model.config.get_text_config().vocab_size)
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None or not ids:
            found = f"got {bad}" if bad is not None else "got none"
            raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}, at least one; {found}")
        return list(ids)

    def count_tokens(self, text: str) -> int:
        """Tokens in plain text (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render_chat(self, messages: Sequence[dict], template_args: dict[str, Any]) -> str:
        prefill = _prefilled(messages)
        messages = [{k: v for k, v in m.items() if k != PREFIX_KEY} for m in messages]
        messages, merged = self._fit_template(messages)
        try:
            return self._apply_template(messages, template_args, prefill=prefill)
        except Exception as exc:  # jinja raises its own errors for malformed conversations
            hint = " (consecutive turns of one role were already merged into one)" if merged else ""
            raise InvalidRequest(f"messages cannot be rendered with this model's chat template: {exc}{hint}") from exc

    def _apply_template(self, messages: list[dict], template_args: dict[str, Any], *, prefill: bool = False) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": not prefill, **template_args}
        if prefill:
            kwargs["continue_final_message"] = True
        if not self.chat_template:
            kwargs["chat_template"] = FALLBACK_TEMPLATE
            owner = self.tokenizer
        return owner.apply_chat_template(messages, **kwargs)

    def _fit_template(self, messages: list[dict]) -> tuple[list[dict], bool]:
        """The history as this model's template takes it, and whether turns were merged."""
        template = self.chat_template or ""
        if "developer" not in template:  # a template that knows the role renders it itself
            messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
        if not self.refuses_repeated_roles():
            return messages, False
        fitted = merge_repeated_roles(messages)
        return fitted, len(fitted) < len(messages)

    def refuses_repeated_roles(self) -> bool:
        """Whether the chat template refuses two user turns in a row (Gemma 3's demands alternation):
        rendered once per template with such a probe; a template that renders no probe at all is
        taken as it is (nothing merged)."""
        template = self.chat_template
        if not template:
            return False
        known = self._refuses_repeats.get(template)
        if known is None:
            one = [self._probe_turn("a")]
            two = [*one, self._probe_turn("b")]
            known = self._template_error(one) is None and self._template_error(two) is True
            self._refuses_repeats[template] = known
        return known

    def _probe_turn(self, text: str) -> dict[str, Any]:
        content: Any = [{"type": "text", "text": text}] if self.loaded.is_multimodal else text
        return {"role": "user", "content": content}

    def _template_error(self, messages: list[dict]) -> bool | None:
        """True: the template raised on `messages`; None: it rendered them; False: it failed otherwise."""
        try:
            self._apply_template(messages, {})
        except jinja2.TemplateError:  # raise_exception(...) in a template, or a template syntax error
            return True
        except Exception:
            return False
        return None

    def _normalize_messages(self, messages: Sequence[dict]) -> tuple[list[dict], list[Image.Image]]:
        """Messages for the template, and the images they carry (in order).

        Text-only models get each content as one string (many templates expect
        a string); image+text models get parts with {"type": "image"} markers.
        """
        images: list[Image.Image] = []
        normalized: list[dict] = []
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise InvalidRequest("each message needs a `role` and `content`")
            parts: list[dict] = []
            for part in _content_parts(message.get("content")):
                kind = part.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    if not self.loaded.is_multimodal:
                        raise InvalidRequest(
                            f"model {self.loaded.source!r} is text-only; it cannot take image_url content"
                        )
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if not isinstance(url, str):
                        raise InvalidRequest("image_url part needs image_url.url")
                    images.append(decode_image_url(url))
                    parts.append({"type": "image"})
                else:
                    raise InvalidRequest(f"unsupported content part type {kind!r} (use 'text' or 'image_url')")
            if self.loaded.is_multimodal:
                normalized.append({**message, "content": parts})
            else:
                text = "\n".join(p["text"] for p in parts)
                normalized.append({**message, "content": text})
        return normalized, images


def _prefilled(messages: Sequence[dict]) -> bool:
    """Whether the final message is a prefilled answer to continue; `prefix` elsewhere is a 400."""
    for index, message in enumerate(messages):
        if not message.get(PREFIX_KEY):
            continue
        if index != len(messages) - 1 or message.get("role") != "assistant":
            raise InvalidRequest("`prefix` (continue_final_message) applies to the final message, an assistant one")
    return bool(messages) and bool(messages[-1].get(PREFIX_KEY))


def merge_repeated_roles(messages: Sequence[dict]) -> list[dict]:
    """Consecutive turns of one role as one turn: texts joined by a blank line, content parts
    (images) kept in order. Turns with tool calls or answering one are left as they are."""
    merged: list[dict] = []
    for message in messages:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.get("role") == message.get("role")
            and not any(key in m for m in (last, message) for key in _UNMERGEABLE_KEYS)
        ):
            merged[-1] = {**last, **message, "content": _joined(last.get("content"), message.get("content"))}
        else:
            merged.append(message)
    return merged


def _joined(first: Any, second: Any) -> Any:
    """Two turns' content as one: strings joined by a blank line; part lists concatenated, the text
    at the seam joined into one part (templates trim each part, so a separate "\n\n" part vanishes)."""
    if isinstance(first, str) and isinstance(second, str):
        return "\n\n".join(text for text in (first, second) if text)
    first, second = _content_parts(first), _content_parts(second)
    if first and second and first[-1].get("type") == "text" and second[0].get("type") == "text":
        seam = {"type": "text", "text": "\n\n".join(p["text"] for p in (first[-1], second[0]) if p["text"])}
        return [*first[:-1], seam, *second[1:]]
    return [*first, *second]
