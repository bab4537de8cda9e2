"""Keeping API keys out of logs, errors and results.

`Secret` holds a key and never shows it (repr/str are masked); `mask_secrets` replaces every
known secret and anything that looks like a bearer token in a message. Error messages built
from a library's exception pass through `mask_secrets` in `client.mapped_errors`, and the
adapter scrubs every TaskError it raises once more at its boundary (`scrub_error`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
SECRET_CHARS_MIN = 4             # shorter strings are not masked: they would mask ordinary words

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?!bearer\s)[^\s\"',;]+")


class Secret:
    """A secret value: `reveal()` gives it; printing, repr and f-strings show only a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or value == "":
            raise ValueError("Secret: a non-empty str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def mask_secrets(text: str, secrets: Iterable[str | Secret] = ()) -> str:
    """`text` with every secret (and any bearer token or authorization header value) masked."""
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if isinstance(value, str) and len(value) >= SECRET_CHARS_MIN:
            text = text.replace(value, MASK)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)


def scrub_error(exc: BaseException, secrets: Iterable[str | Secret]) -> BaseException:
    """Mask secrets in an exception's message in place (args and `.message`); returns it."""
    secrets = list(secrets)
    exc.args = tuple(mask_secrets(a, secrets) if isinstance(a, str) else a for a in exc.args)
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        exc.message = mask_secrets(message, secrets)  # type: ignore[attr-defined]
    return exc
