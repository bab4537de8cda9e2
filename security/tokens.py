"""JWT identities (issue 6): short-lived bearer tokens signed with Ed25519 (EdDSA), carrying a
subject and roles and nothing else. Any node can issue them with the cluster's signing keys and
every node verifies them on every RPC (the gRPC interceptors in cluster/ call `verify`).

    ring = KeyRing.create(path)                      # once per cluster; JSON, 0600
    token = TokenIssuer(ring).issue("alice", ["user"], ttl_s=900)
    principal = TokenVerifier(path).verify(token)    # Principal("alice", ("user",), "token", exp)
    ring.rotate(path); ...; ring.retire(path, old)   # old tokens verify until their key is retired

Errors (one tree per concern; the interceptors map TokenError to gRPC UNAUTHENTICATED):

    Exception
     ├── TokenError       a token that does not authenticate: missing, malformed, oversize, wrong
     │                    algorithm, unknown key id, bad signature, expired, not yet valid, wrong
     │                    issuer/audience, bad subject or roles. `code` = "UNAUTHENTICATED",
     │                    `message` says exactly why.
     ├── KeyRingError     a key file that is missing, corrupt or misused (names the file and field);
     │                    a configuration error, raised at startup or by an operator's command
     └── ValueError       a bad argument to `issue` (names the field and the limit): a programmer's
                          or operator's error, not a client's

Verification, in order (every refusal is a TokenError):
  1. a non-empty str of at most TOKEN_CHARS_MAX chars, three base64url segments (before parsing);
  2. header: `alg` must be exactly "EdDSA" — "none", HS256 (the classic confusion: an HMAC keyed
     with our public key) and everything else are refused before any key is touched, and pyjwt is
     only ever offered Ed25519 public keys and the EdDSA algorithm; `kid` must name a key in the ring;
  3. the Ed25519 signature;
  4. claims: iss == ISSUER, aud == AUDIENCE, sub matches SUBJECT_RE, roles a list of at most
     ROLES_MAX strings matching ROLE_RE, iat/nbf/exp integers with iat <= exp, nbf <= exp and a
     lifetime (exp - iat) of at most TOKEN_TTL_S_MAX, and a str jti. Other claims are ignored and
     never reach the Principal: a token grants its subject and roles, nothing more;
  5. time, against the injected clock with LEEWAY_S of skew: refused on or after exp + LEEWAY_S,
     before nbf - LEEWAY_S, or if iat is more than LEEWAY_S in the future.

The verification cache. Ed25519 verification costs ~140 µs here and every RPC verifies, so steps
1-4 are cached: a bounded LRU (cache_entries_max) maps the exact token string to its decoded
claims. Only tokens that passed steps 1-4 are cached. An entry is valid only while the keyring is
the same object at the same version: a reload of the key file or an in-memory rotate/retire empties
the cache, so a retired key's tokens stop verifying at the next reload check. Step 5 (time) runs on
every call, cache hit or not, so the cache never extends a token's life. Since the key is the
whole token, a hit means the bytes are identical to bytes whose signature verified.

Key rotation needs no restart: a TokenVerifier built from a path stats the file at most every
reload_check_s and reloads it when its inode, size, mtime or ctime changed (KeyRing writes are
atomic: a temp file then rename). A reload that fails (a corrupt file) is logged and the previous
keys stay in use until the file changes again.

There is no revocation list: a token lives until exp (at most TOKEN_TTL_S_MAX, 900 s by default);
retiring its signing key revokes every token signed by it.

Not built here: distributing the key file to every node (each node reads its own copy).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

TOKEN_TTL_S_DEFAULT = 900
TOKEN_TTL_S_MAX = 86400
LEEWAY_S = 30                           # clock skew allowed on exp, nbf and iat
ISSUER = "agent-coordinator"
AUDIENCE = "agent-coordinator"
ALGORITHM = "EdDSA"                     # the only one accepted
SUBJECT_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
ROLE_RE = r"^[a-z][a-z0-9_-]*(:[A-Za-z0-9_*-]+)*$"
ROLE_CHARS_MAX = 128                    # so that a token of ROLES_MAX roles fits in TOKEN_CHARS_MAX
ROLES_MAX = 16
TOKEN_CHARS_MAX = 4096                  # longer tokens are refused before parsing
JTI_CHARS_MAX = 128
KEYS_MAX = 16                           # keys in a ring; retire old ones to rotate further
KEYRING_BYTES_MAX = 1024 * 1024
KEYRING_FORMAT = "agent-coordinator-jwt-keys-v1"
KID_RE = r"^[A-Za-z0-9_-]{1,64}$"
UNIX_S_MAX = 253402300799               # 9999-12-31T23:59:59Z; later times are refused as malformed
CACHE_ENTRIES_MAX = 1_000_000           # the most a TokenVerifier's cache_entries_max may be
RELOAD_CHECK_S_MAX = 3600.0

_SUBJECT = re.compile(SUBJECT_RE)
_ROLE = re.compile(ROLE_RE)
_KID = re.compile(KID_RE)
# Compact JWS: three base64url segments (the signature may be empty, so that alg "none" is refused
# by name rather than as malformed).
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

Clock = Callable[[], float]


class TokenError(Exception):
    """A token that does not authenticate; `message` says exactly why (safe to return to the caller)."""

    code: str = "UNAUTHENTICATED"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyRingError(Exception):
    """A key file that is missing, corrupt or misused; the message names the file and the field."""


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: tuple[str, ...]
    kind: str = "token"         # "token" | "node" (a node authenticated by its certificate)
    expires_unix_s: int = 0     # 0: does not expire by itself (a node: its certificate does)


# ---------------------------------------------------------------------------------- validation
def _iso(unix_s: int) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(value: Any, chars_max: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= chars_max else text[: chars_max - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_subject(subject: Any, field: str = "subject") -> str:
    """`subject` if it matches SUBJECT_RE (1..128 chars), else ValueError naming `field`."""
    if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
        raise ValueError(f"{field}: 1..128 chars of [A-Za-z0-9_.:@-] starting with a letter or digit "
                         f"(SUBJECT_RE), got {_short(subject)}")
    return subject


def check_roles(roles: Any, field: str = "roles") -> tuple[str, ...]:
    """`roles` as a tuple if it is a sequence of at most ROLES_MAX distinct role names, else ValueError."""
    if isinstance(roles, (str, bytes)) or not isinstance(roles, Sequence):
        raise ValueError(f"{field}: a list of role names, got {type(roles).__name__}")
    if len(roles) > ROLES_MAX:
        raise ValueError(f"{field}: at most {ROLES_MAX} (ROLES_MAX), got {len(roles)}")
    for i, role in enumerate(roles):
        if not isinstance(role, str) or len(role) > ROLE_CHARS_MAX or not _ROLE.fullmatch(role):
            raise ValueError(f"{field}[{i}]: a role name matching {ROLE_RE} of at most {ROLE_CHARS_MAX} chars "
                             f"(ROLE_CHARS_MAX), got {_short(role)}")
    if len(set(roles)) != len(roles):
        raise ValueError(f"{field}: each role once, got {list(roles)!r}")
    return tuple(roles)


def check_ttl_s(ttl_s: Any) -> int:
    if not _is_int(ttl_s) or not 1 <= ttl_s <= TOKEN_TTL_S_MAX:
        raise ValueError(f"ttl_s: an int in 1..{TOKEN_TTL_S_MAX} (TOKEN_TTL_S_MAX), got {_short(ttl_s)}")
    return ttl_s


# ---------------------------------------------------------------------------------- key ring
@dataclass(frozen=True)
class _Key:
    kid: str
    created_unix_s: int
    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None
    public_pem: str
    private_pem: str | None


def _new_key(now_s: int, taken: set[str]) -> _Key:
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # Derived from the public key (so the same key always has the same id), 12 hex chars.
    kid = hashlib.sha256(b"jwt-kid:" + raw).hexdigest()[:12]
    if kid in taken:                                        # a 48-bit collision: never in practice
        kid = secrets.token_hex(6)
    return _Key(kid=kid, created_unix_s=now_s, public=public, private=private,
                public_pem=public.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
                private_pem=private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())


def _write_atomically(path: Path, text: str, *, overwrite: bool) -> None:
    """Write `text` to `path` (0600): a temp file, fsync, then rename (or link, if not `overwrite`,
    which fails if `path` appeared meanwhile), then fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyRingError(f"{path}: already exists; not overwriting a key file") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class KeyRing:
    """The cluster's JWT signing keys: one active (signs new tokens), older ones kept to verify
    tokens they signed until retired. The file is JSON, 0600, written atomically:

        {"format": "agent-coordinator-jwt-keys-v1", "active": kid,
         "keys": [{"kid", "created_unix_s", "private_pem" (PKCS8, or null), "public_pem"}]}

    A key without a private_pem only verifies (a verify-only copy of the file). `version` counts
    this object's changes (rotate, retire); caches keyed on the ring compare it.

    rotate/retire write this object's keys to `path`: load the file first if another process may
    have changed it since.
    """

    def __init__(self, keys: Sequence[_Key], active_kid: str, *, source: str = "<memory>") -> None:
        self._keys: dict[str, _Key] = {k.kid: k for k in keys}
        self._active = active_kid
        self._public: dict[str, Ed25519PublicKey] = {k.kid: k.public for k in keys}
        self.source = source
        self.version = 0

    def __repr__(self) -> str:
        return f"KeyRing({self.source}, active={self._active}, kids={list(self._keys)})"

    # ------------------------------------------------------------------------------ reading
    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return dict(self._public)

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        return self._public.get(kid)

    def private_key(self, kid: str) -> Ed25519PrivateKey | None:
        key = self._keys.get(kid)
        return None if key is None else key.private

    # ------------------------------------------------------------------------------ the file
    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> KeyRing:
        """A new file at `path` holding one active Ed25519 key; refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise KeyRingError(f"{path}: already exists; not overwriting a key file")
        key = _new_key(int(time.time()), set())
        ring = cls([key], key.kid, source=str(path))
        _write_atomically(path, ring._document(), overwrite=False)
        return ring

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(KEYRING_BYTES_MAX + 1)
        except OSError as exc:
            raise KeyRingError(f"{path}: cannot read ({exc.strerror})") from None
        if len(data) > KEYRING_BYTES_MAX:
            raise KeyRingError(f"{path}: larger than {KEYRING_BYTES_MAX} bytes (KEYRING_BYTES_MAX)")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise KeyRingError(f"{path}: not JSON") from None
        return cls._parse(document, path)

    @classmethod
    def _parse(cls, document: Any, path: Path) -> KeyRing:
        def bad(field: str, what: str) -> KeyRingError:
            return KeyRingError(f"{path}: {field}: {what}")

        if not isinstance(document, dict):
            raise bad("(top level)", "a JSON object expected")
        unknown = set(document) - {"format", "active", "keys"}
        if unknown:
            raise bad(sorted(unknown)[0], "unknown field (allowed: active, format, keys)")
        if document.get("format") != KEYRING_FORMAT:
            raise bad("format", f"{KEYRING_FORMAT!r} expected, got {_short(document.get('format'))}")
        entries = document.get("keys")
        if not isinstance(entries, list) or not entries:
            raise bad("keys", "a non-empty list expected")
        if len(entries) > KEYS_MAX:
            raise bad("keys", f"at most {KEYS_MAX} (KEYS_MAX), got {len(entries)}")
        keys: list[_Key] = []
        for i, entry in enumerate(entries):
            where = f"keys[{i}]"
            if not isinstance(entry, dict):
                raise bad(where, "a JSON object expected")
            unknown = set(entry) - {"kid", "created_unix_s", "private_pem", "public_pem"}
            if unknown:
                raise bad(f"{where}.{sorted(unknown)[0]}",
                          "unknown field (allowed: created_unix_s, kid, private_pem, public_pem)")
            kid = entry.get("kid")
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise bad(f"{where}.kid", f"1..64 chars of [A-Za-z0-9_-] expected, got {_short(kid)}")
            if any(k.kid == kid for k in keys):
                raise bad(f"{where}.kid", f"{kid!r} appears twice")
            created = entry.get("created_unix_s")
            if not _is_int(created) or not 0 <= created <= UNIX_S_MAX:
                raise bad(f"{where}.created_unix_s", f"an int in 0..{UNIX_S_MAX} expected, got {_short(created)}")
            public_pem = entry.get("public_pem")
            try:
                public = serialization.load_pem_public_key(public_pem.encode())
            except (AttributeError, ValueError, TypeError):
                public = None
            if not isinstance(public, Ed25519PublicKey):
                raise bad(f"{where}.public_pem", "an Ed25519 public key in PEM (SubjectPublicKeyInfo) expected")
            private_pem = entry.get("private_pem")
            private = None
            if private_pem is not None:
                try:
                    private = serialization.load_pem_private_key(private_pem.encode(), password=None)
                except (AttributeError, ValueError, TypeError):
                    private = None
                if not isinstance(private, Ed25519PrivateKey):
                    raise bad(f"{where}.private_pem",
                              "an unencrypted Ed25519 private key in PEM (PKCS8) or null expected")
                raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
                if private.public_key().public_bytes(*raw) != public.public_bytes(*raw):
                    raise bad(f"{where}.public_pem", "does not match private_pem")
            keys.append(_Key(kid, created, public, private, public_pem, private_pem))
        active = document.get("active")
        if not isinstance(active, str) or all(k.kid != active for k in keys):
            raise bad("active", f"the kid of one of the keys expected, got {_short(active)}")
        return cls(keys, active, source=str(path))

    def _document(self) -> str:
        return json.dumps({
            "format": KEYRING_FORMAT,
            "active": self._active,
            "keys": [{"kid": k.kid, "created_unix_s": k.created_unix_s, "private_pem": k.private_pem,
                      "public_pem": k.public_pem} for k in self._keys.values()],
        }, indent=1) + "\n"

    # ------------------------------------------------------------------------------ changing
    def rotate(self, path: str | os.PathLike[str]) -> str:
        """Add a new key, make it active, keep the old ones for verification; write `path`; the new kid."""
        if len(self._keys) >= KEYS_MAX:
            raise KeyRingError(f"{path}: keys: at most {KEYS_MAX} (KEYS_MAX); retire an old key first")
        key = _new_key(int(time.time()), set(self._keys))
        keys = {**self._keys, key.kid: key}
        _write_atomically(Path(path), KeyRing(list(keys.values()), key.kid)._document(), overwrite=True)
        self._keys, self._active = keys, key.kid
        self._public = {k.kid: k.public for k in keys.values()}
        self.version += 1
        return key.kid

    def retire(self, path: str | os.PathLike[str], kid: str) -> None:
        """Remove a non-active key; tokens it signed stop verifying (at each verifier's next reload)."""
        if kid not in self._keys:
            raise KeyRingError(f"{path}: kid {_short(kid)}: not in the ring (kids: {list(self._keys)})")
        if kid == self._active:
            raise KeyRingError(f"{path}: kid {kid!r}: is the active key; rotate first, then retire it")
        keys = {k: v for k, v in self._keys.items() if k != kid}
        _write_atomically(Path(path), KeyRing(list(keys.values()), self._active)._document(), overwrite=True)
        self._keys = keys
        self._public = {k.kid: k.public for k in keys.values()}
        self.version += 1


# ---------------------------------------------------------------------------------- issuing
class TokenIssuer:
    def __init__(self, keyring: KeyRing, *, clock: Clock = time.time) -> None:
        self._keyring = keyring
        self._clock = clock

    def issue(self, subject: str, roles: Sequence[str], ttl_s: int = TOKEN_TTL_S_DEFAULT) -> str:
        """A token for `subject` with `roles`, valid from now for `ttl_s` seconds, signed by the active key."""
        check_subject(subject)
        roles = check_roles(roles)
        check_ttl_s(ttl_s)
        kid = self._keyring.active_kid
        key = self._keyring.private_key(kid)
        if key is None:
            raise KeyRingError(f"{self._keyring.source}: active key {kid!r} has no private key; cannot issue")
        now = int(self._clock())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "roles": list(roles),
                  "iat": now, "nbf": now, "exp": now + ttl_s, "jti": secrets.token_urlsafe(12)}
        token = jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})
        if len(token) > TOKEN_CHARS_MAX:        # cannot happen within SUBJECT_RE, ROLES_MAX and ROLE_CHARS_MAX
            raise ValueError(f"token: {len(token)} chars, more than {TOKEN_CHARS_MAX} (TOKEN_CHARS_MAX)")
        return token

    def refresh(self, principal: Principal, ttl_s: int = TOKEN_TTL_S_DEFAULT) -> str:
        """A new token for a verified token principal: same subject and roles, a new expiry."""
        if principal.kind != "token":
            raise ValueError(f"principal.kind: only a 'token' principal is refreshed, got {principal.kind!r}")
        return self.issue(principal.subject, principal.roles, ttl_s)


# ---------------------------------------------------------------------------------- verifying
@dataclass(frozen=True)
class _Verified:
    """A token that passed every check except time (cached)."""

    principal: Principal
    iat: int
    nbf: int
    exp: int


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


class TokenVerifier:
    """Verifies tokens against a key ring (a file it reloads on change, or an in-memory KeyRing).

    Used from one asyncio loop, but a lock guards the cache and the reload, so that threads (a
    sync gRPC server, a CLI) may share one verifier too; the signature check runs outside it."""

    def __init__(self, keys_path: str | os.PathLike[str] | None = None, *, keyring: KeyRing | None = None,
                 clock: Clock = time.time, cache_entries_max: int = 4096, reload_check_s: float = 1.0) -> None:
        if keys_path is None and keyring is None:
            raise ValueError("TokenVerifier: keys_path or keyring required")
        if not _is_int(cache_entries_max) or not 0 <= cache_entries_max <= CACHE_ENTRIES_MAX:
            raise ValueError(f"cache_entries_max: an int in 0..{CACHE_ENTRIES_MAX} (CACHE_ENTRIES_MAX), "
                             f"got {_short(cache_entries_max)}")
        if (not isinstance(reload_check_s, (int, float)) or isinstance(reload_check_s, bool)
                or not 0 <= reload_check_s <= RELOAD_CHECK_S_MAX):
            raise ValueError(f"reload_check_s: a number in 0..{RELOAD_CHECK_S_MAX} (RELOAD_CHECK_S_MAX), "
                             f"got {_short(reload_check_s)}")
        self._path = None if keys_path is None else Path(keys_path)
        self._clock = clock
        self._cache_entries_max = cache_entries_max
        self._reload_check_s = float(reload_check_s)
        self._lock = threading.Lock()
        self._file_signature: tuple[int, ...] | None = None
        if keyring is None:
            assert self._path is not None
            self._file_signature = self._stat()
            keyring = KeyRing.load(self._path)
        elif self._path is not None:
            self._file_signature = self._stat()
        self._keyring = keyring
        self._last_check = clock()
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_ring: KeyRing = keyring
        self._cache_version = keyring.version
        self._jws = jwt.PyJWS(algorithms=[ALGORITHM])      # no other algorithm is even registered
        self.cache_hits = 0
        self.cache_misses = 0
        self.reloads = 0

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    def verify(self, token: str) -> Principal:
        """The token's Principal, or TokenError saying why not."""
        if not isinstance(token, str):
            raise TokenError(f"token: malformed (a str expected, got {type(token).__name__})")
        if not token:
            raise TokenError("token: missing")
        if len(token) > TOKEN_CHARS_MAX:
            raise TokenError(f"token: longer than {TOKEN_CHARS_MAX} chars")
        now = self._clock()
        with self._lock:
            self._maybe_reload(now)
            ring = self._keyring
            if ring is not self._cache_ring or ring.version != self._cache_version:
                self._cache.clear()
                self._cache_ring, self._cache_version = ring, ring.version
            verified = self._cache.get(token)
            if verified is not None:
                self._cache.move_to_end(token)
                self.cache_hits += 1
        if verified is None:
            self.cache_misses += 1
            version = ring.version
            verified = self._decode(token, ring)
            if self._cache_entries_max:
                with self._lock:
                    if ring is self._cache_ring and version == self._cache_version:
                        self._cache[token] = verified
                        while len(self._cache) > self._cache_entries_max:
                            self._cache.popitem(last=False)
        self._check_time(token, verified, now)
        return verified.principal

    # ------------------------------------------------------------------------------ steps
    def _check_time(self, token: str, v: _Verified, now: float) -> None:
        if now >= v.exp + LEEWAY_S:
            with self._lock:
                self._cache.pop(token, None)
            raise TokenError(f"token: expired at {_iso(v.exp)}")
        if now + LEEWAY_S < v.nbf:
            raise TokenError(f"token: not valid before {_iso(v.nbf)}")
        if now + LEEWAY_S < v.iat:
            raise TokenError(f"token: issued in the future (iat {_iso(v.iat)})")

    def _decode(self, token: str, ring: KeyRing) -> _Verified:
        if not _COMPACT.fullmatch(token):
            raise TokenError("token: malformed")
        # Header first, so the algorithm and key id are refused by name before any key is used.
        try:
            header = _b64json(token.split(".", 1)[0])
        except (ValueError, TypeError, binascii.Error, RecursionError):
            raise TokenError("token: malformed") from None
        if not isinstance(header, dict):
            raise TokenError("token: malformed")
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise TokenError(f"token: algorithm {_short(alg)} not allowed (only {ALGORITHM})")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenError("token: no key id (kid) in the header")
        public = ring.public_key(kid)
        if public is None:
            raise TokenError(f"token: unknown key id {_short(kid)}")
        try:
            decoded = self._jws.decode_complete(token, key=public, algorithms=[ALGORITHM])
        except jwt.InvalidSignatureError:
            raise TokenError("token: signature does not verify") from None
        except (jwt.PyJWTError, ValueError, TypeError, binascii.Error, RecursionError):
            raise TokenError("token: malformed") from None
        try:
            claims = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            raise TokenError("token: malformed (payload is not JSON)") from None
        return self._check_claims(claims)

    @staticmethod
    def _check_claims(claims: Any) -> _Verified:
        if not isinstance(claims, dict):
            raise TokenError("token: malformed (payload is not a JSON object)")
        for name in ("iss", "aud", "sub", "roles", "iat", "nbf", "exp", "jti"):
            if name not in claims:
                raise TokenError(f"token: claim {name!r} missing")
        if claims["iss"] != ISSUER:
            raise TokenError("token: wrong issuer")
        if claims["aud"] != AUDIENCE:
            raise TokenError("token: wrong audience")
        sub = claims["sub"]
        if not isinstance(sub, str) or not _SUBJECT.fullmatch(sub):
            raise TokenError("token: claim 'sub' is not a valid subject (SUBJECT_RE)")
        roles = claims["roles"]
        if not isinstance(roles, list) or len(roles) > ROLES_MAX:
            raise TokenError(f"token: claim 'roles' is not a list of at most {ROLES_MAX} role names")
        for role in roles:
            if not isinstance(role, str) or len(role) > ROLE_CHARS_MAX or not _ROLE.fullmatch(role):
                raise TokenError(f"token: claim 'roles' holds {_short(role)}, not a role name (ROLE_RE)")
        times = {}
        for name in ("iat", "nbf", "exp"):
            value = claims[name]
            if not _is_int(value) or not 0 <= value <= UNIX_S_MAX:
                raise TokenError(f"token: claim {name!r} is not an integer time")
            times[name] = value
        iat, nbf, exp = times["iat"], times["nbf"], times["exp"]
        if iat > exp or nbf > exp:
            raise TokenError("token: malformed (iat or nbf after exp)")
        if exp - iat > TOKEN_TTL_S_MAX:
            raise TokenError(f"token: lifetime {exp - iat} s longer than {TOKEN_TTL_S_MAX} s (TOKEN_TTL_S_MAX)")
        jti = claims["jti"]
        if not isinstance(jti, str) or not 1 <= len(jti) <= JTI_CHARS_MAX:
            raise TokenError("token: claim 'jti' is not a string id")
        return _Verified(Principal(sub, tuple(roles), "token", exp), iat, nbf, exp)

    # ------------------------------------------------------------------------------ reloading
    def _stat(self) -> tuple[int, ...] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _maybe_reload(self, now: float) -> None:
        """Reload the key file if it changed; checked at most every reload_check_s (a clock that went
        backwards counts as due). Called with the lock held."""
        if self._path is None:
            return
        if self._last_check <= now < self._last_check + self._reload_check_s:
            return
        self._last_check = now
        signature = self._stat()
        if signature == self._file_signature:
            return
        self._file_signature = signature
        if signature is None:
            log.warning("JWT key file %s: cannot stat it; still verifying with the keys loaded before", self._path)
            return
        try:
            ring = KeyRing.load(self._path)
        except KeyRingError as exc:
            log.warning("JWT key file changed but does not load (%s); still verifying with the keys loaded before", exc)
            return
        self._keyring = ring
        self.reloads += 1
        log.info("JWT key file %s reloaded: active %s, kids %s", self._path, ring.active_kid, ring.kids)
