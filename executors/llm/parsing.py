"""Model output → a JSON value validated against a JSON Schema, with bounded repair.

    outcome = await parse_with_repair(text, schema, messages=prompt.messages, ask=call_model,
                                      repair_attempts_max=2, limits=template_limits)

`extract_json` accepts a bare JSON value, one wrapped in a ```json fence, or the first JSON
object/array inside surrounding prose. `validate` reports the most relevant schema error with
its JSON path ("$.items[0].name"). When the output is invalid, the conversation is sent again
with the invalid reply and the error (templates.repair_messages), at most repair_attempts_max
times; then OutputInvalid (permanent) names the path and the last error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from executors.base import InvalidTaskInput
from executors.llm.errors import OutputInvalid
from executors.llm.templates import Message, TemplateLimits, repair_messages

REPAIR_ATTEMPTS_MAX_LIMIT = 10          # repair_attempts_max may not exceed this
ERROR_CHARS_MAX = 500                   # a validation message quoted in errors and repair prompts
OUTPUT_CHARS_MAX = 1_000_000            # model output parsed at most

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _clip(text: str, chars_max: int = ERROR_CHARS_MAX) -> str:
    return text if len(text) <= chars_max else text[:chars_max] + "…"


def extract_json(text: str) -> Any:
    """The JSON value in a model's reply; OutputInvalid at "$" when there is none."""
    if not isinstance(text, str):
        raise OutputInvalid("$", f"expected text, got {type(text).__name__}")
    if len(text) > OUTPUT_CHARS_MAX:
        raise OutputInvalid("$", f"at most {OUTPUT_CHARS_MAX} chars are parsed (OUTPUT_CHARS_MAX), got {len(text)}")
    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)] + [text.strip()]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
                return value
            except ValueError:
                continue
    raise OutputInvalid("$", f"not JSON: {_clip(text.strip(), 120)!r}")


def check_schema(schema: Any, field: str = "input.schema") -> type:
    """The validator class for `schema`; InvalidTaskInput when the schema itself is invalid."""
    if not isinstance(schema, Mapping):
        raise InvalidTaskInput(field, "a JSON Schema object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidTaskInput(f"{field}{json_path(exc.absolute_path)[1:]}",
                               f"not a valid JSON Schema: {_clip(exc.message)}") from None
    return cls


def validate(value: Any, schema: Mapping[str, Any]) -> None:
    """OutputInvalid(path, message) for the most relevant error of `value` against `schema`."""
    cls = check_schema(schema)
    error = best_match(cls(schema).iter_errors(value))
    if error is not None:
        raise OutputInvalid(json_path(error.absolute_path), _clip(error.message))


@dataclass
class ParseOutcome:
    value: Any
    repairs: int                                     # repair prompts sent
    errors: list[str] = field(default_factory=list)  # the validation errors met on the way


Ask = Callable[[list[Message]], Awaitable[str]]


async def parse_with_repair(text: str, schema: Mapping[str, Any], *, messages: list[Message], ask: Ask,
                            repair_attempts_max: int, limits: TemplateLimits | None = None) -> ParseOutcome:
    if not isinstance(repair_attempts_max, int) or not 0 <= repair_attempts_max <= REPAIR_ATTEMPTS_MAX_LIMIT:
        raise ValueError(f"repair_attempts_max: an int in 0..{REPAIR_ATTEMPTS_MAX_LIMIT}, got {repair_attempts_max!r}")
    check_schema(schema)
    limits = limits or TemplateLimits()
    errors: list[str] = []
    conversation = list(messages)
    for repair in range(repair_attempts_max + 1):
        try:
            value = extract_json(text)
            validate(value, schema)
            return ParseOutcome(value, repair, errors)
        except OutputInvalid as exc:
            errors.append(exc.message)
            if repair == repair_attempts_max:
                raise OutputInvalid(exc.path, f"{exc.problem} (still invalid after {repair} repair attempts, "
                                              f"repair_attempts_max={repair_attempts_max})") from None
            conversation = repair_messages(conversation, text, exc.message, limits)
            text = await ask(conversation)
    raise AssertionError("unreachable")  # pragma: no cover
