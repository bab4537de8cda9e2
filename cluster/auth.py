"""The security edge of a node (issue 6): mTLS server credentials that follow certificate
rotation, and one gRPC interceptor that authenticates, rate-limits, authorizes and records the
decision for every call.

    call ─► TLS: a client certificate from the cluster CA (else no connection at all)
         ─► who: the JWT in "authorization: Bearer …" (signature, kid, exp, nbf, aud, iss);
                 a node's relay call may instead present a `node` certificate alone
         ─► the certificate's role bounds the token's roles (executor / bridge → agent:* only)
         ─► per-principal token bucket  → RESOURCE_EXHAUSTED + retry-after-ms
         ─► RBAC: the method's permission, or its "_own" twin (then `Access.own_only`: the
                 handler and `apply` check ownership against replicated state)
         ─► the decision (allowed / denied + why) goes to the audit log (DecisionLog)
         ─► handler runs with `current_access` set; the proposer stamps it into commands

Ownership is not decided here: a follower's view may lag, so writes carry `own` into the log
and `apply` decides against the replicated state (coordinator/fsm.py). Reads check the local
state, which is what they return anyway.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cluster.interceptors import WrappingInterceptor
from coordinator.commands import CommandType, audit_decisions, audit_head, encode_command
from coordinator.fsm import audit_resource
from security.audit import AuditSigner
from security.ratelimit import RateLimiter
from security.rbac import PERMISSIONS, Policy, RateLimit
from security.tokens import Principal, TokenError, TokenVerifier

log = logging.getLogger("coordinator.auth")

SERVICE = "agentcoordinator.v1.Coordinator"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
NODE_ONLY = "node-only"
TLS_ONLY = "tls-only"
RETRY_AFTER_METADATA = "retry-after-ms"
DECISIONS_PENDING_MAX = 4096        # distinct (who, action, resource, outcome) per flush window
# Requests that fail authentication, per client certificate: buckets are per subject, and a
# caller without a valid token has none, so its failures are limited by the certificate it used.
UNAUTHENTICATED_LIMIT = RateLimit(requests_per_s=50.0, burst=100)
PEER_CACHE_ENTRIES_MAX = 1024

# Each method: (permission that grants it for every resource, permission that grants it for the
# caller's own resources only). A method absent here is refused (fail closed).
METHOD_RULES: dict[str, tuple[str | None, str | None] | str] = {
    "SubmitTask": ("task.submit", None),
    "SubmitDag": ("task.submit", None),
    "GetTask": ("task.read", "task.read_own"),
    "ListTasks": ("task.read", "task.read_own"),
    "WaitTasks": ("task.read", "task.read_own"),
    "CancelTask": ("task.cancel", None),
    "CancelDag": ("task.cancel", None),
    "RequeueTask": ("task.requeue", None),
    "RegisterExecutor": (None, "executor.register"),
    "UnregisterExecutor": ("executor.unregister", "executor.register"),
    "ListExecutors": ("executor.read", None),
    "ClusterStatus": ("cluster.read", None),
    "Watch": ("events.watch", None),
    "ExecutorStream": (None, "executor.connect"),
    "Delegate": (None, "task.delegate_own"),
    "SaveCheckpoint": (None, "checkpoint.write_own"),
    "RestoreCheckpoint": (None, "checkpoint.read_own"),
    "ListCheckpoints": ("checkpoint.read", "checkpoint.read_own"),
    "GetCheckpoint": ("checkpoint.read", "checkpoint.read_own"),
    "RefreshToken": ("token.refresh", None),
    "ListAudit": ("audit.read", None),
    "PutSecret": ("secret.write", None),
    "DeleteSecret": ("secret.write", None),
    "ListSecrets": ("secret.read", None),
    "GetSecret": ("secret.read", None),
    "RewrapSecrets": ("secret.write", None),
    "RelayHeartbeats": NODE_ONLY,
}
# Certificate roles that may carry only agent roles in their tokens.
AGENT_CERT_ROLES = frozenset({"executor", "bridge"})


@dataclass(frozen=True)
class Access:
    """Who is calling and how far the call's permission reaches."""

    principal: Principal
    method: str
    own_only: bool           # the permission covers the caller's own resources only
    peer: str                # the client certificate's name (CN)

    @property
    def subject(self) -> str:
        return self.principal.subject


current_access: contextvars.ContextVar[Access | None] = contextvars.ContextVar("current_access", default=None)


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


# ------------------------------------------------------------------------------ TLS (server)
class ServerTls:
    """The node's server credentials: client certificates required and checked against the
    cluster CA; the key pair and CA are re-read when their files change, so a rotated
    certificate (`coordctl certs issue --name n1 --role node`) takes effect for new connections
    without a restart (gRPC asks on every handshake)."""

    def __init__(self, certs_dir: str, node_id: str) -> None:
        self.certs = Path(certs_dir)
        self.node_id = node_id
        self._stamp = self._file_stamp()
        self.reloads_total = 0

    def _files(self) -> tuple[Path, Path, Path]:
        return self.certs / f"{self.node_id}.key", self.certs / f"{self.node_id}.pem", self.certs / "ca.pem"

    def _file_stamp(self) -> tuple:
        return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in self._files())

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key, cert, ca = (p.read_bytes() for p in self._files())
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        try:
            initial = self._configuration()
        except OSError as exc:
            raise SystemExit(f"TLS: cannot read {exc.filename} ({exc.strerror}); `coordctl certs init` creates the "
                             f"cluster CA and node certificates, or start with --insecure-dev") from None
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except OSError:
            return None        # a rotation in progress: keep serving the old pair
        self._stamp = stamp
        self.reloads_total += 1
        log.info("TLS: reloaded %s's certificate", self.node_id)
        return configuration


# ------------------------------------------------------------------------------ audit decisions
@dataclass
class Decision:
    who: str
    roles: tuple[str, ...]
    action: str
    resource: str
    outcome: str
    first_ms: int
    count: int = 1


class DecisionLog:
    """Access decisions waiting to become audit records. Identical decisions inside one flush
    window are one record with a count, so a client polling ClusterStatus writes one record a
    second, not fifty. Bounded: beyond DECISIONS_PENDING_MAX distinct decisions per window the
    rest are counted as dropped, and the drop itself becomes a record."""

    def __init__(self, clock_ms: Callable[[], int], pending_max: int = DECISIONS_PENDING_MAX) -> None:
        self._clock_ms = clock_ms
        self._pending: OrderedDict[tuple, Decision] = OrderedDict()
        self._pending_max = pending_max
        self.dropped = 0
        self.dropped_total = 0

    def record(self, who: str, roles: tuple[str, ...], action: str, resource: str, outcome: str) -> None:
        key = (who, roles, action, resource, outcome)
        decision = self._pending.get(key)
        if decision is not None:
            decision.count += 1
        elif len(self._pending) < self._pending_max:
            self._pending[key] = Decision(who, roles, action, resource, outcome, self._clock_ms())
        else:
            self.dropped += 1
            self.dropped_total += 1

    def drain(self) -> list[Decision]:
        out = list(self._pending.values())
        self._pending.clear()
        if self.dropped:
            out.append(Decision("node", (), "audit:decisions-dropped", "", f"dropped:{self.dropped}",
                                self._clock_ms()))
            self.dropped = 0
        return out

    def put_back(self, decisions: list[Decision]) -> None:
        """Decisions whose proposal failed (no leader yet, overload): kept for the next flush,
        within the same bound. After an unknown outcome a decision may so be recorded twice —
        counted too often rather than lost."""
        for d in decisions:
            key = (d.who, d.roles, d.action, d.resource, d.outcome)
            held = self._pending.get(key)
            if held is not None:
                held.count += d.count
            elif len(self._pending) < self._pending_max:
                self._pending[key] = d
            else:
                self.dropped += d.count
                self.dropped_total += d.count

    def __len__(self) -> int:
        return len(self._pending)


# ------------------------------------------------------------------------------ interceptor
def _subject_roles(auth: dict[str, list[bytes]]) -> tuple[str, str]:
    """(CN, OU) of the verified client certificate."""
    cn = ou = ""
    for value in auth.get("x509_subject", []):
        for part in value.decode(errors="replace").split(","):
            name, _, text = part.strip().partition("=")
            if name == "CN":
                cn = text
            elif name == "OU":
                ou = text
    return cn, ou


class AuthInterceptor(WrappingInterceptor):
    def __init__(self, *, policy: Policy, verifier: TokenVerifier, limiter: RateLimiter, decisions: DecisionLog,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.policy = policy
        self.verifier = verifier
        self.limiter = limiter
        self.decisions = decisions
        self._clock = clock
        self._all_permissions = frozenset(PERMISSIONS)
        self.denied_total = 0
        for rule in METHOD_RULES.values():
            if isinstance(rule, tuple):
                for permission in rule:
                    if permission is not None and permission not in PERMISSIONS:
                        raise ValueError(f"METHOD_RULES: unknown permission {permission!r}")

    # -- decision ------------------------------------------------------------------------
    def authorize(self, full_method: str, context: grpc.aio.ServicerContext) -> Access:
        """Raises Denied; records every decision."""
        service, _, name = full_method.lstrip("/").rpartition("/")
        peer_cn, peer_ou = _subject_roles(context.auth_context())
        who, roles = f"cert:{peer_cn or '?'}", ()
        try:
            if service == HEALTH_SERVICE:
                # Liveness probes: the TLS handshake (a cluster certificate) is enough.
                return Access(Principal(who, (), kind="cert"), name, False, peer_cn)
            if service == SERVICE and METHOD_RULES.get(name) == NODE_ONLY:
                if peer_ou != "node":
                    raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                                 f"{name}: only cluster nodes (a 'node' certificate) may call it; caller "
                                 f"certificate {peer_cn!r} has role {peer_ou!r}")
                principal = Principal(f"node:{peer_cn}", ("system:node",), kind="node")
                return Access(principal, name, False, peer_cn)
            principal = self._authenticate(context)
            who, roles = principal.subject, principal.roles
            if peer_ou in AGENT_CERT_ROLES and not all(r.startswith("agent:") for r in roles):
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             f"token roles {list(roles)}: a {peer_ou!r} certificate ({peer_cn!r}) may carry only "
                             "agent:* roles")
            retry_after_s = self.limiter.acquire(who, self.policy.rate_limit_for(roles))
            if retry_after_s > 0:
                limit = self.policy.rate_limit_for(roles)
                raise Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"rate limit: {who!r} is over {limit.requests_per_s:g} requests/s (burst {limit.burst}); "
                             f"retry after {retry_after_s:.3f} s", retry_after_s)
            if service == REFLECTION_SERVICE:
                rule: Any = ("cluster.read", None)
            else:
                rule = METHOD_RULES.get(name) if service == SERVICE else None
            if not isinstance(rule, tuple):
                raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{full_method}: not an allowed method")
            granted = self.policy.permissions_of(roles)
            any_permission, own_permission = rule
            if (any_permission is not None and any_permission in granted) or granted >= self._all_permissions:
                access = Access(principal, name, False, peer_cn)
            elif own_permission is not None and own_permission in granted:
                access = Access(principal, name, True, peer_cn)
            else:
                wanted = " or ".join(p for p in rule if p)
                raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                             f"{name}: {who!r} with roles {list(roles)} lacks permission {wanted}")
        except Denied as first:
            denied = self._limit_failures(peer_cn, first)
            self.denied_total += 1
            self.decisions.record(who, tuple(roles), f"access:{name}", "", f"denied:{denied.code.name}")
            raise denied from None
        self.decisions.record(who, tuple(roles), f"access:{name}", "", "allowed")
        return access

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if not header:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "token: missing (send 'authorization: Bearer <JWT>'; "
                                                          "`coordctl token issue` makes one)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <JWT>'")
        try:
            return self.verifier.verify(token.strip())
        except TokenError as exc:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    def _limit_failures(self, peer_cn: str, denied: Denied) -> Denied:
        if denied.code != grpc.StatusCode.UNAUTHENTICATED:
            return denied
        retry_after_s = self.limiter.acquire(f"unauthenticated:{peer_cn}", UNAUTHENTICATED_LIMIT)
        if retry_after_s <= 0:
            return denied
        return Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"rate limit: certificate {peer_cn!r} sent over {UNAUTHENTICATED_LIMIT.requests_per_s:g} "
                      f"unauthenticated requests/s; retry after {retry_after_s:.3f} s ({denied.message})", retry_after_s)

    # -- wrapping ----------------------------------------------------------------------
    async def _deny(self, context: grpc.aio.ServicerContext, denied: Denied) -> None:
        if denied.retry_after_s:
            context.set_trailing_metadata(((RETRY_AFTER_METADATA, str(max(1, int(denied.retry_after_s * 1000)))),))
        await context.abort(denied.code, denied.message)

    def _expired(self, access: Access) -> bool:
        expires = access.principal.expires_unix_s
        return bool(expires) and self._clock() >= expires

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        authorize = self.authorize
        deny = self._deny
        expired = self._expired

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    access = authorize(method, context)
                except Denied as denied:
                    await deny(context, denied)
                current_access.set(access)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)

        async def _stream(source, context, access):
            # A stream outlives a short token: it ends when the token does, and the caller
            # reconnects with a fresh one.
            async for message in source:
                if expired(access):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        "token: expired during the stream; reconnect with a fresh token")
                yield message

        if handler.unary_stream is not None:
            behavior = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    access = authorize(method, context)
                except Denied as denied:
                    await deny(context, denied)
                current_access.set(access)
                async for message in _stream(behavior(request, context), context, access):
                    yield message

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_stream is not None:
            behavior = handler.stream_stream

            async def stream_stream(request_iterator, context):
                try:
                    access = authorize(method, context)
                except Denied as denied:
                    await deny(context, denied)
                current_access.set(access)
                async for message in _stream(behavior(request_iterator, context), context, access):
                    yield message

            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        behavior = handler.stream_unary

        async def stream_unary(request_iterator, context):
            try:
                access = authorize(method, context)
            except Denied as denied:
                await deny(context, denied)
            current_access.set(access)
            return await behavior(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                    handler.response_serializer)


# ------------------------------------------------------------------------------ audit stamping
SYSTEM_ROLES = ("system:scheduler",)
UNSTAMPED = frozenset({CommandType.NOOP, CommandType.AUDIT_DECISIONS, CommandType.AUDIT_HEAD})


def decision_digest(who: str, roles: Sequence[str], action: str, resource: str, outcome: str, time_ms: int) -> str:
    """What an access-decision record's signature covers beyond the record body: the outcome
    (with " xN" when it repeated). `coordctl audit verify` recomputes it from the record."""
    body = json.dumps([who, list(roles), action, resource, outcome, time_ms], separators=(",", ":"),
                      ensure_ascii=False)
    return "decision:" + hashlib.sha256(body.encode()).hexdigest()


class AuditStamper:
    """Stamps each command before it is proposed: who (from `current_access`, or this node for
    its own scheduler and lease tracker), its roles, "own" when the caller's permission covers
    only its own resources, and the audit stamp — the sha256 of the command and this node's
    Ed25519 signature over the record body. The encoded command is extended, not re-encoded."""

    def __init__(self, node_id: str, signer: AuditSigner) -> None:
        self.node_id = node_id
        self.signer = signer
        self.system_subject = f"node:{node_id}"
        self.stamped_total = 0

    def __call__(self, command: dict[str, Any]) -> bytes:
        kind = command.get("t")
        if kind in UNSTAMPED:
            return encode_command(command)
        access = current_access.get()
        if access is None:
            who, roles = self.system_subject, SYSTEM_ROLES
        else:
            who, roles = access.subject, access.principal.roles
            if access.own_only:
                command["own"] = who
        command["p"] = who
        command["r"] = list(roles)
        encoded = encode_command(command)
        digest = hashlib.sha256(encoded).hexdigest()
        signature = self.signer.sign_record(who=who, roles=roles, action=CommandType(kind).name,
                                            resource=audit_resource(kind, command), time_ms=command.get("now", 0),
                                            digest=digest)
        stamp = {"n": self.node_id, "d": digest, "s": signature}
        command["a"] = stamp
        self.stamped_total += 1
        return encoded[:-1] + b',"a":' + encode_command(stamp) + b"}"

    def sign_decisions(self, decisions: list[Decision]) -> list[dict[str, Any]]:
        items = []
        for d in decisions:
            outcome = d.outcome if d.count == 1 else f"{d.outcome} x{d.count}"
            digest = decision_digest(d.who, d.roles, d.action, d.resource, outcome, d.first_ms)
            signature = self.signer.sign_record(who=d.who, roles=d.roles, action=d.action, resource=d.resource,
                                                time_ms=d.first_ms, digest=digest)
            items.append({"p": d.who, "r": list(d.roles), "act": d.action, "res": d.resource, "o": outcome,
                          "now": d.first_ms, "d": digest, "s": signature})
        return items


@dataclass(frozen=True)
class AuditSettings:
    decisions_flush_s: float = 1.0      # access decisions become records at most this late
    head_interval_s: float = 10.0       # the leader signs the chain head this often when it moved
    decisions_per_command_max: int = 512


async def audit_loop(*, stamper: AuditStamper, decisions: DecisionLog, propose: Callable[[dict[str, Any]], Any],
                     is_leader: Callable[[], bool], chain_head: Callable[[], tuple[int, str, int]],
                     clock_ms: Callable[[], int], stopping: Any, settings: AuditSettings = AuditSettings()) -> None:
    """Forever (until `stopping` is set): flush access decisions as AUDIT_DECISIONS commands;
    on the leader, sign the chain head when head_every_records records or head_interval_s passed
    since the last head, as AUDIT_HEAD (lets retention prune, and covers outcomes and indexes)."""
    import asyncio

    last_head_seq, last_head_s = 0, time.monotonic()
    while not stopping.is_set():
        await asyncio.sleep(settings.decisions_flush_s)
        try:
            pending = decisions.drain()
            for start in range(0, len(pending), settings.decisions_per_command_max):
                chunk = pending[start:start + settings.decisions_per_command_max]
                try:
                    await propose(audit_decisions(stamper.node_id, stamper.sign_decisions(chunk)))
                except Exception:
                    decisions.put_back(pending[start:])
                    raise
            if not is_leader():
                continue
            seq, head_hash, head_every = chain_head()
            now_s = time.monotonic()
            if seq > last_head_seq and (seq - last_head_seq >= head_every // 2
                                        or now_s - last_head_s >= settings.head_interval_s):
                head = stamper.signer.sign_head(seq, head_hash, clock_ms())
                result = await propose(audit_head(head.time_ms, stamper.node_id, head.seq, head.hash, head.sig))
                if getattr(result, "ok", False):
                    last_head_seq, last_head_s = seq, now_s
        except Exception as exc:  # noqa: BLE001 — the next round tries again; the node keeps serving
            log.warning("audit: flushing decisions / signing the head failed: %s", exc)
