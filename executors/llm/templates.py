"""Prompt templates, versioned per task type: a template turns a task's input into chat
messages, and the (template id, version) that did it is recorded on every result, so an
output can be traced to the exact prompt wording that produced it.

    registry = default_registry()
    prompt = registry.render("structured", task.input)          # the newest version
    prompt = registry.render("structured", task.input, version=1)
    prompt.messages, prompt.template_id, prompt.template_version

Changing a template's wording means registering a new version, never editing an old one
(like the FSM's commands, STYLE §2). Bad input raises InvalidTaskInput naming the field and
the limit; all sizes are bounded by `TemplateLimits`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from executors.base import InvalidTaskInput

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TemplateLimits:
    messages_max: int = 256                  # messages of one request
    message_chars_max: int = 200_000         # characters of one message
    prompt_chars_max: int = 400_000          # characters of all messages of one request
    schema_bytes_max: int = 64 * 1024        # a structured task's JSON Schema, as JSON
    data_bytes_max: int = 256 * 1024         # a structured task's input data, as JSON
    repair_output_chars_max: int = 16_000    # the invalid output quoted back in a repair prompt
    templates_max: int = 256                 # templates in one registry

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TemplateLimits.{name}: an int >= 1, got {value!r}")


Message = dict[str, str]


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[Message]
    template_id: str
    template_version: int

    @property
    def template_ref(self) -> dict[str, Any]:
        return {"id": self.template_id, "version": self.template_version}


@dataclass(frozen=True)
class PromptTemplate:
    template_id: str
    version: int
    task_type: str
    build: Callable[[Any, TemplateLimits], list[Message]]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.template_id or not isinstance(self.version, int) or self.version < 1:
            raise ValueError("PromptTemplate: a non-empty template_id and a version >= 1")


class TemplateRegistry:
    def __init__(self, limits: TemplateLimits | None = None) -> None:
        self.limits = limits or TemplateLimits()
        self._templates: dict[tuple[str, int], PromptTemplate] = {}

    def register(self, template: PromptTemplate) -> None:
        key = (template.task_type, template.version)
        if key in self._templates:
            raise ValueError(f"template for {template.task_type!r} version {template.version} is already registered; "
                             "register a new version instead of changing an old one")
        if len(self._templates) >= self.limits.templates_max:
            raise ValueError(f"templates: at most {self.limits.templates_max} (templates_max)")
        self._templates[key] = template

    def task_types(self) -> list[str]:
        return sorted({t for t, _ in self._templates})

    def versions(self, task_type: str) -> list[int]:
        return sorted(v for t, v in self._templates if t == task_type)

    def get(self, task_type: str, version: int | None = None) -> PromptTemplate:
        versions = self.versions(task_type)
        if not versions:
            raise KeyError(f"no template for task type {task_type!r}")
        if version is None:
            version = versions[-1]
        template = self._templates.get((task_type, version))
        if template is None:
            raise InvalidTaskInput("metadata.template_version",
                                   f"{task_type!r} has template versions {versions}, not {version}")
        return template

    def render(self, task_type: str, task_input: Any, *, version: int | None = None) -> RenderedPrompt:
        template = self.get(task_type, version)
        messages = template.build(task_input, self.limits)
        check_messages(messages, self.limits, "input.messages")
        return RenderedPrompt(messages, template.template_id, template.version)


# ------------------------------------------------------------------------------------- validation


def check_messages(messages: Any, limits: TemplateLimits, field: str) -> list[Message]:
    if not isinstance(messages, list) or not 1 <= len(messages) <= limits.messages_max:
        raise InvalidTaskInput(field, f"a list of 1..{limits.messages_max} messages (messages_max)")
    total = 0
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping) or set(message) - {"role", "content", "name"}:
            raise InvalidTaskInput(where, 'an object {"role": "system"|"user"|"assistant", "content": str}')
        if message.get("role") not in ROLES:
            raise InvalidTaskInput(f"{where}.role", f"one of {list(ROLES)}, got {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidTaskInput(f"{where}.content", "a string")
        if len(content) > limits.message_chars_max:
            raise InvalidTaskInput(f"{where}.content",
                                   f"at most {limits.message_chars_max} chars (message_chars_max), got {len(content)}")
        total += len(content)
    if total > limits.prompt_chars_max:
        raise InvalidTaskInput(field, f"at most {limits.prompt_chars_max} chars in all (prompt_chars_max), got {total}")
    return [{k: str(v) for k, v in m.items()} for m in messages]


def _text(value: Any, field: str, limits: TemplateLimits) -> str:
    if not isinstance(value, str) or value == "":
        raise InvalidTaskInput(field, "a non-empty string")
    if len(value) > limits.message_chars_max:
        raise InvalidTaskInput(field, f"at most {limits.message_chars_max} chars (message_chars_max), got {len(value)}")
    return value


def _json_bounded(value: Any, field: str, bytes_max: int, bound_name: str) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskInput(field, f"JSON-serializable: {exc}") from None
    if len(text.encode("utf-8")) > bytes_max:
        raise InvalidTaskInput(field, f"at most {bytes_max} bytes as JSON ({bound_name})")
    return text


# -------------------------------------------------------------------------------- the templates


def _chat_v1(task_input: Any, limits: TemplateLimits) -> list[Message]:
    """{"prompt": str} or {"messages": [...]}, with an optional "system" message first."""
    if not isinstance(task_input, Mapping):
        raise InvalidTaskInput("input", 'an object {"prompt": str} or {"messages": [...]}')
    has_prompt, has_messages = "prompt" in task_input, "messages" in task_input
    if has_prompt == has_messages:
        raise InvalidTaskInput("input", 'exactly one of "prompt" (a string) or "messages" (a list)')
    if has_prompt:
        messages = [{"role": "user", "content": _text(task_input["prompt"], "input.prompt", limits)}]
    else:
        messages = check_messages(task_input["messages"], limits, "input.messages")
    if "system" in task_input:
        messages = [{"role": "system", "content": _text(task_input["system"], "input.system", limits)}] + messages
    return messages


STRUCTURED_SYSTEM_V1 = (
    "You produce data, not prose. Reply with exactly one JSON value that conforms to the JSON Schema "
    "you are given: no explanations, no Markdown, no code fences."
)


def _structured_v1(task_input: Any, limits: TemplateLimits) -> list[Message]:
    """{"instruction": str, "schema": {...}, "data"?: any, "system"?: str}."""
    if not isinstance(task_input, Mapping):
        raise InvalidTaskInput("input", 'an object {"instruction": str, "schema": {...}, "data"?: any}')
    instruction = _text(task_input.get("instruction"), "input.instruction", limits)
    if not isinstance(task_input.get("schema"), Mapping):
        raise InvalidTaskInput("input.schema", "a JSON Schema object")
    schema = _json_bounded(task_input["schema"], "input.schema", limits.schema_bytes_max, "schema_bytes_max")
    system = STRUCTURED_SYSTEM_V1
    if "system" in task_input:
        system += "\n\n" + _text(task_input["system"], "input.system", limits)
    user = f"Instruction:\n{instruction}\n\nJSON Schema of the reply:\n{schema}"
    if "data" in task_input:
        data = _json_bounded(task_input["data"], "input.data", limits.data_bytes_max, "data_bytes_max")
        user += f"\n\nInput data (JSON):\n{data}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


REPAIR_TEMPLATE_ID = "repair"
REPAIR_TEMPLATE_VERSION = 1


def repair_messages(messages: list[Message], invalid_output: str, problem: str, limits: TemplateLimits) -> list[Message]:
    """The conversation so far, the invalid reply, and a request to fix it (repair v1)."""
    quoted = invalid_output
    if len(quoted) > limits.repair_output_chars_max:
        quoted = quoted[: limits.repair_output_chars_max] + "…"
    return messages + [
        {"role": "assistant", "content": quoted},
        {"role": "user", "content": (
            f"Your reply is not valid: {problem}\n"
            "Reply again with only the corrected JSON value that conforms to the JSON Schema above: "
            "no explanations, no Markdown, no code fences.")},
    ]


def default_registry(limits: TemplateLimits | None = None) -> TemplateRegistry:
    registry = TemplateRegistry(limits)
    registry.register(PromptTemplate("chat", 1, "chat", _chat_v1, "the task's messages, or its prompt as a user message"))
    registry.register(PromptTemplate("structured", 1, "structured", _structured_v1,
                                     "fill a JSON Schema: JSON-only system prompt, instruction, schema, data"))
    return registry
