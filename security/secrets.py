"""Envelope-encrypted secrets (issue 6): each secret is encrypted with its own random data key
(AES-256-GCM), and the data key is wrapped by a key-encryption key (KEK, AES-256-GCM too) that
lives outside the store — in a file or an environment variable. Rotating the KEK re-wraps the
data keys; the secrets' ciphertexts stay as they are.

    store = SecretStore(path, kek=load_kek(env=os.environ, kek_file=...))
    store.put("cloudru_api_key", value)        # value never written in plaintext
    store.get("cloudru_api_key")               # -> str
    store.rotate(new_kek)                      # re-wraps every data key under the new KEK

The file (JSON, written atomically, 0600) holds per secret: the KEK id that wrapped its data key,
the wrapped data key and its nonce, the ciphertext and its nonce, and the secret's name bound in
as associated data (a ciphertext moved to another name does not decrypt). Nothing in it, in an
error or in a repr is plaintext. `mask` is the log filter's rule: anything that looks like a token
or key is replaced.

The same envelope (`seal` / `unseal` / `rewrap`) is what the cluster keeps in replicated state
(PUT_SECRET: the proposing node seals with the KEK, every replica stores only the envelope);
`KekRing` holds the active KEK plus older ones while a rotation re-wraps (`coordctl secret
rotate-kek`). An executor fetches a key by name when it starts (`executor run --secret-env`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEK_ENV = "COORD_SECRETS_KEK"           # base64 of 32 bytes
KEK_BYTES = 32
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
SECRET_BYTES_MAX = 64 * 1024
SECRETS_MAX = 1024
STORE_FORMAT = "agent-coordinator-secrets-v1"


class SecretError(Exception):
    """A bad name or value, a missing or wrong KEK, or a store that does not decrypt."""


@dataclass(frozen=True)
class Kek:
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != KEK_BYTES:
            raise SecretError(f"KEK: {KEK_BYTES} bytes, got {len(self.key)}")

    @property
    def kek_id(self) -> str:
        """Names the KEK without revealing it (a hash of it)."""
        return hashlib.sha256(b"kek-id:" + self.key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Kek(id={self.kek_id})"

    @classmethod
    def generate(cls) -> Kek:
        return cls(AESGCM.generate_key(bit_length=256))

    def encoded(self) -> str:
        return base64.b64encode(self.key).decode()


def load_kek(*, env: Mapping[str, str] | None = None, kek_file: str | Path | None = None) -> Kek:
    """The KEK from `kek_file` (base64, one line) or else the environment variable COORD_SECRETS_KEK."""
    env = os.environ if env is None else env
    if kek_file is not None:
        try:
            text = Path(kek_file).read_text().strip()
        except OSError as exc:
            raise SecretError(f"kek_file: cannot read {kek_file} ({exc.strerror})") from None
        where = f"kek_file {kek_file}"
    elif env.get(KEK_ENV):
        text, where = env[KEK_ENV].strip(), KEK_ENV
    else:
        raise SecretError(f"no key-encryption key: set {KEK_ENV} or give a KEK file")
    try:
        return Kek(base64.b64decode(text, validate=True))
    except (ValueError, SecretError):
        raise SecretError(f"{where}: base64 of {KEK_BYTES} bytes expected") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def check_secret(name: Any, value: Any) -> bytes:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SecretError("name: 1..128 chars of [A-Za-z0-9_.-]")
    if not isinstance(value, str) or not value:
        raise SecretError(f"secret {name!r}: a non-empty string")
    raw = value.encode()
    if len(raw) > SECRET_BYTES_MAX:
        raise SecretError(f"secret {name!r}: at most {SECRET_BYTES_MAX} bytes (SECRET_BYTES_MAX), got {len(raw)}")
    return raw


def seal(name: str, value: str, kek: Kek) -> dict[str, str]:
    """The envelope of one secret: a fresh data key encrypts the value, the KEK wraps the data
    key; the name is associated data of both (an envelope moved to another name fails)."""
    raw = check_secret(name, value)
    data_key = AESGCM.generate_key(bit_length=256)
    nonce, key_nonce = os.urandom(12), os.urandom(12)
    return {
        "kek_id": kek.kek_id,
        "key_nonce": _b64(key_nonce),
        "wrapped_key": _b64(AESGCM(kek.key).encrypt(key_nonce, data_key, name.encode())),
        "nonce": _b64(nonce),
        "ciphertext": _b64(AESGCM(data_key).encrypt(nonce, raw, name.encode())),
    }


def _data_key(name: str, entry: Mapping[str, str], kek: Kek) -> bytes:
    if entry.get("kek_id") != kek.kek_id:
        raise SecretError(f"secret {name!r}: wrapped by KEK {entry.get('kek_id')}, not by {kek.kek_id}")
    try:
        return AESGCM(kek.key).decrypt(_unb64(entry["key_nonce"]), _unb64(entry["wrapped_key"]), name.encode())
    except (InvalidTag, ValueError, KeyError):
        raise SecretError(f"secret {name!r}: its data key does not unwrap (tampered, or moved from another "
                          "name)") from None


def unseal(name: str, entry: Mapping[str, str], kek: Kek) -> str:
    data_key = _data_key(name, entry, kek)
    try:
        return AESGCM(data_key).decrypt(_unb64(entry["nonce"]), _unb64(entry["ciphertext"]), name.encode()).decode()
    except (InvalidTag, ValueError, KeyError):
        raise SecretError(f"secret {name!r}: does not decrypt (tampered, or moved from another name)") from None


def rewrap(name: str, entry: Mapping[str, str], old: Kek, new: Kek) -> dict[str, str]:
    """The same envelope with its data key wrapped by `new` (the ciphertext is unchanged)."""
    data_key = _data_key(name, entry, old)
    key_nonce = os.urandom(12)
    return {**entry, "kek_id": new.kek_id, "key_nonce": _b64(key_nonce),
            "wrapped_key": _b64(AESGCM(new.key).encrypt(key_nonce, data_key, name.encode()))}


class KekRing:
    """The active KEK (first line of the KEK file, or COORD_SECRETS_KEK) and older ones (the
    following lines) that still unwrap envelopes a rotation has not re-wrapped yet. Re-read when
    the file changes."""

    def __init__(self, path: str | Path | None, env: Mapping[str, str] | None = None) -> None:
        self.path = Path(path) if path else None
        self._env = os.environ if env is None else env
        self._stamp: tuple[int, int] | None = None
        self._keks: list[Kek] = []

    def _load(self) -> list[Kek]:
        if self.path is not None and self.path.exists():
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                keks = []
                for number, line in enumerate(self.path.read_text().split(), 1):
                    try:
                        keks.append(Kek(base64.b64decode(line, validate=True)))
                    except (ValueError, SecretError):
                        raise SecretError(f"{self.path}: line {number} is not base64 of {KEK_BYTES} bytes") from None
                if not keks:
                    raise SecretError(f"{self.path}: holds no KEK")
                self._keks, self._stamp = keks, stamp
            return self._keks
        return [load_kek(env=self._env)]

    @property
    def active(self) -> Kek:
        return self._load()[0]

    def by_id(self, kek_id: str) -> Kek:
        for kek in self._load():
            if kek.kek_id == kek_id:
                return kek
        raise SecretError(f"KEK {kek_id}: not in the KEK ring (the file or {KEK_ENV})")


def write_kek_file(path: str | Path, keks: list[Kek]) -> None:
    """One base64 KEK per line, the active one first; 0600, atomic."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(k.encoded() + "\n" for k in keks))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SecretStore:
    def __init__(self, path: str | Path, *, kek: Kek) -> None:
        self.path = Path(path)
        self.kek = kek
        self._entries: dict[str, dict[str, str]] = self._load()

    def __repr__(self) -> str:
        return f"SecretStore({self.path}, {len(self._entries)} secrets, kek={self.kek.kek_id})"

    # ------------------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> str:
        entry = self._entries.get(name)
        if entry is None:
            raise SecretError(f"secret {name!r}: not in the store")
        return unseal(name, entry, self.kek)

    # ------------------------------------------------------------------------------ writing
    def put(self, name: str, value: str) -> None:
        check_secret(name, value)
        if name not in self._entries and len(self._entries) >= SECRETS_MAX:
            raise SecretError(f"store: at most {SECRETS_MAX} secrets (SECRETS_MAX)")
        self._entries[name] = seal(name, value, self.kek)
        self._save()

    def delete(self, name: str) -> bool:
        existed = self._entries.pop(name, None) is not None
        if existed:
            self._save()
        return existed

    def rotate(self, new_kek: Kek) -> int:
        """Re-wrap every data key under `new_kek` (all or nothing); returns how many."""
        rewrapped = {name: rewrap(name, entry, self.kek, new_kek) for name, entry in self._entries.items()}
        self._entries, self.kek = rewrapped, new_kek
        self._save()
        return len(rewrapped)

    # ------------------------------------------------------------------------------ the file
    def _load(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise SecretError(f"{self.path}: not a secrets file ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != STORE_FORMAT:
            raise SecretError(f"{self.path}: not a {STORE_FORMAT} file")
        return dict(document.get("secrets", {}))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": STORE_FORMAT, "secrets": self._entries}, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# Bearer tokens, JWTs, "sk-…" style API keys, long hex or base64 runs after key=/token=/secret=.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)((?:api[_-]?key|token|secret|password|kek)\s*[=:]\s*)[^\s,;\"']{6,}"),
]


def mask(text: str) -> str:
    """`text` with anything that looks like a token or key replaced by ***."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


class MaskingFilter(logging.Filter):
    """A logging filter that masks secrets in every record's message (add it to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
