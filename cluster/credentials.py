"""What a process presents when it calls a node, and what a node presents to callers (issue 6).

    caller (coordctl, executor agent, bridge, node relay)          node
    ────────────────────────────────────────────────────          ──────────────────────────────
    ClientCredentials                                              ServerTls
      TLS: ca.pem + <identity>.pem/.key  ── mTLS handshake ──►      ca.pem + <node>.pem/.key, client
      JWT: "authorization: Bearer …" metadata on every call         certificate required; files re-read
                                                                    when they change (rotation)

The token goes into each call's metadata explicitly rather than through a gRPC call-credentials
plugin: measured here, a plugin adds ~110 µs per call (a thread hop); metadata adds nothing.

A local cluster's directory (`coordctl cluster up`) holds everything: DATA_DIR/certs/ (the CA,
leaf certificates, the JWT key ring, the nodes' audit keys) and `insecure_dev` in cluster.json.
An operator who can read that directory mints short-lived tokens for itself (TokenMinter); other
callers bring a token (COORD_TOKEN, --token-file) and refresh it before it expires.

`insecure_dev` (only with an explicit --insecure-dev) means plaintext gRPC and no token.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

log = logging.getLogger("coordinator.credentials")

TOKEN_ENV = "COORD_TOKEN"
TOKEN_FILE_ENV = "COORD_TOKEN_FILE"
JWT_KEYS_FILE = "jwt-keys.json"
KEK_FILE = "secrets.kek"    # the secrets' key-encryption keys, active first (or COORD_SECRETS_KEK)
# A minted token is replaced once less than this share of its lifetime is left.
TOKEN_REFRESH_FRACTION = 1 / 3
MINTED_TOKEN_TTL_S = 900


class CredentialsError(Exception):
    """Missing or unreadable certificates, keys or tokens; the message says which file or variable."""


class TokenSource(Protocol):
    def token(self) -> str: ...


@dataclass
class StaticToken:
    value: str

    def token(self) -> str:
        return self.value


class FileToken:
    """A token kept in a file by someone else (a sidecar, an operator's script): re-read when the
    file changes, so a refreshed token is used without a restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._value = ""

    def token(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
            if stamp != self._stamp:
                with open(self.path) as f:
                    self._value = f.read().strip()
                self._stamp = stamp
        except OSError as exc:
            raise CredentialsError(f"token file {self.path!r}: {exc.strerror}") from None
        return self._value


class TokenMinter:
    """Signs its own short-lived tokens with the cluster's JWT key ring (an operator or a local
    executor that can read the key directory), renewing each when a third of its life is left."""

    def __init__(self, keys_path: str, subject: str, roles: Sequence[str], ttl_s: int = MINTED_TOKEN_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        from security.tokens import KeyRing, TokenIssuer

        self.keys_path = keys_path
        self.subject = subject
        self.roles = tuple(roles)
        self.ttl_s = ttl_s
        self._clock = clock
        try:
            self._issuer = TokenIssuer(KeyRing.load(keys_path), clock=clock)
        except Exception as exc:  # noqa: BLE001 — any unreadable key ring is one clear error
            raise CredentialsError(f"JWT key ring {keys_path!r}: {exc}") from None
        self._lock = threading.Lock()
        self._value = ""
        self._renew_at = 0.0

    def token(self) -> str:
        now = self._clock()
        if now >= self._renew_at:
            with self._lock:
                if now >= self._renew_at:
                    self._value = self._issuer.issue(self.subject, self.roles, self.ttl_s)
                    self._renew_at = now + self.ttl_s * (1 - TOKEN_REFRESH_FRACTION)
        return self._value


class RefreshingToken:
    """A token handed to a process that cannot sign its own (an executor on another machine):
    renewed through the cluster's RefreshToken call once a third of its life is left. The
    renewal is a synchronous call from whichever caller needs the token next; it costs one round
    trip every ~10 minutes with the default 15-minute tokens."""

    def __init__(self, token: str, refresh: Callable[[str], tuple[str, int]], clock: Callable[[], float] = time.time,
                 ) -> None:
        self._value = token
        self._refresh = refresh         # (current token) -> (new token, expires_unix_s)
        self._clock = clock
        self._renew_at = self._renew_time(token)
        self._lock = threading.Lock()
        self.refreshes_total = 0

    def _renew_time(self, token: str) -> float:
        import jwt

        try:
            claims = jwt.decode(token, options={"verify_signature": False})
            issued, expires = float(claims["iat"]), float(claims["exp"])
        except Exception:  # noqa: BLE001 — not a JWT we can read: the node will say why
            return float("inf")
        return expires - (expires - issued) * TOKEN_REFRESH_FRACTION

    def token(self) -> str:
        if self._clock() >= self._renew_at:
            with self._lock:
                if self._clock() >= self._renew_at:
                    try:
                        self._value, _expires = self._refresh(self._value)
                        self.refreshes_total += 1
                        self._renew_at = self._renew_time(self._value)
                    except Exception as exc:  # noqa: BLE001 — keep the current token until it expires
                        log.warning("token refresh failed (%s); retrying in 10 s", exc)
                        self._renew_at = self._clock() + 10
        return self._value


def refresher(certs_dir: str, cert_name: str, endpoints: Sequence[str], timeout_s: float = 10.0
              ) -> Callable[[str], tuple[str, int]]:
    """RefreshToken against the endpoints in turn, over mTLS, presenting the current token."""
    from proto import coordinator_pb2 as pb
    from proto import coordinator_pb2_grpc as pb_grpc

    def refresh(current: str) -> tuple[str, int]:
        credentials = ClientCredentials(certs_dir=certs_dir, cert_name=cert_name, tokens=StaticToken(current))
        last: Exception | None = None
        for endpoint in endpoints:
            try:
                with credentials.channel(endpoint) as channel:
                    reply = pb_grpc.CoordinatorStub(channel).RefreshToken(
                        pb.RefreshTokenRequest(), metadata=credentials.metadata(), timeout=timeout_s)
                return reply.token, reply.expires_unix_s
            except grpc.RpcError as exc:
                last = exc
        raise CredentialsError(f"RefreshToken: no node renewed the token ({last})")

    return refresh


CHANNEL_OPTIONS_DEFAULT: tuple[tuple[str, Any], ...] = ()


@dataclass
class ClientCredentials:
    """TLS material and a token source; `insecure_dev` for a cluster started with --insecure-dev."""

    certs_dir: str = ""
    cert_name: str = "cli"
    tokens: TokenSource | None = None
    insecure_dev: bool = False
    # The name the nodes' certificates are checked against. Node certificates carry localhost
    # and 127.0.0.1 (plus --host names), so the endpoint's host works unless it is a bare IP
    # that is not in them.
    server_name_override: str = ""
    _tls: grpc.ChannelCredentials | None = field(default=None, repr=False)

    @classmethod
    def insecure(cls) -> ClientCredentials:
        return cls(insecure_dev=True)

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        if self._tls is None:
            certs = Path(self.certs_dir)
            try:
                self._tls = grpc.ssl_channel_credentials(
                    root_certificates=(certs / "ca.pem").read_bytes(),
                    private_key=(certs / f"{self.cert_name}.key").read_bytes(),
                    certificate_chain=(certs / f"{self.cert_name}.pem").read_bytes())
            except OSError as exc:
                raise CredentialsError(f"TLS files for {self.cert_name!r} in {certs}: {exc.strerror} "
                                       f"({exc.filename}); `coordctl certs issue` creates them") from None
        return self._tls

    def reload(self) -> None:
        """Read the certificate files again on the next channel (after a rotation)."""
        self._tls = None

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        out = list(options)
        if self.server_name_override and not self.insecure_dev:
            out.append(("grpc.ssl_target_name_override", self.server_name_override))
        return out

    def channel(self, endpoint: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        if self.insecure_dev:
            return grpc.insecure_channel(endpoint, options=list(options))
        return grpc.secure_channel(endpoint, self._channel_credentials(), options=self._options(options))

    def aio_channel(self, endpoint: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        if self.insecure_dev:
            return grpc.aio.insecure_channel(endpoint, options=list(options))
        return grpc.aio.secure_channel(endpoint, self._channel_credentials(), options=self._options(options))

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Per-call metadata: the bearer token (None when there is no token source)."""
        if self.tokens is None:
            return None
        return (("authorization", "Bearer " + self.tokens.token()),)


def cluster_settings(data_dir: str) -> dict[str, Any]:
    """The local cluster's cluster.json (or {} when there is none)."""
    path = os.path.join(data_dir, "cluster.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"{path}: unreadable ({exc})") from None


def resolve_credentials(data_dir: str, *, cert_name: str = "cli", subject: str = "", roles: Sequence[str] = ("admin",),
                        token: str = "", token_file: str = "", certs_dir: str = "",
                        insecure_dev: bool | None = None, refresh_endpoints: Sequence[str] = ()) -> ClientCredentials:
    """The credentials a command-line process uses: an explicit token (argument, then COORD_TOKEN,
    then a token file), else a token minted from the local cluster's key ring (an operator on the
    cluster's own machine), over mTLS with DATA_DIR/certs/<cert_name>.pem. A cluster started with
    --insecure-dev (or `insecure_dev=True`) gets plaintext and no token."""
    settings = cluster_settings(data_dir)
    if insecure_dev is None:
        insecure_dev = bool(settings.get("insecure_dev", False))
    if insecure_dev:
        return ClientCredentials.insecure()
    certs_dir = certs_dir or settings.get("certs_dir") or os.path.join(data_dir, "certs")
    token = token or os.environ.get(TOKEN_ENV, "")
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV, "")
    tokens: TokenSource
    if token and refresh_endpoints:   # a long-running process: renew before it expires
        tokens = RefreshingToken(token, refresher(certs_dir, cert_name, refresh_endpoints))
    elif token:
        tokens = StaticToken(token)
    elif token_file:
        tokens = FileToken(token_file)
    else:
        keys_path = os.path.join(certs_dir, JWT_KEYS_FILE)
        if not os.path.exists(keys_path):
            raise CredentialsError(
                f"no token: pass --token / --token-file, set {TOKEN_ENV} or {TOKEN_FILE_ENV}, or run where the "
                f"cluster's key ring is readable ({keys_path} does not exist)")
        tokens = TokenMinter(keys_path, subject or f"{cert_name}@{os.environ.get('USER', 'local')}", roles)
    return ClientCredentials(certs_dir=certs_dir, cert_name=cert_name, tokens=tokens)
