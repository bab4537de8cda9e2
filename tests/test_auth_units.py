"""The node's security edge without a cluster: the interceptor's decisions for each kind of
caller, the decision log's bounds, and commands stamped by a node verifying after apply."""

from __future__ import annotations

import json

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cluster.audit_files import verify_with_decisions
from cluster.auth import (
    UNAUTHENTICATED_LIMIT,
    Access,
    AuditStamper,
    AuthInterceptor,
    DecisionLog,
    Denied,
    current_access,
)
from coordinator import commands as cmd
from coordinator.commands import decode_entry, join_entry
from coordinator.fsm import CoordinatorFSM
from security.audit import AuditSigner
from security.ratelimit import RateLimiter
from security.rbac import Policy
from security.tokens import KeyRing, Principal, TokenIssuer, TokenVerifier

SERVICE = "/agentcoordinator.v1.Coordinator/"


class FakeContext:
    def __init__(self, token: str | None, cn: str = "cli", ou: str = "cli") -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self._auth = {"x509_subject": [f"OU={ou},CN={cn}".encode()]}

    def auth_context(self):
        return self._auth

    def invocation_metadata(self):
        return self._metadata


@pytest.fixture
def setup(tmp_path):
    ring = KeyRing.create(tmp_path / "keys.json")
    clock = [1_800_000_000.0]
    issuer = TokenIssuer(ring, clock=lambda: clock[0])
    decisions = DecisionLog(lambda: 1)
    interceptor = AuthInterceptor(policy=Policy.default(), verifier=TokenVerifier(keyring=ring, clock=lambda: clock[0]),
                                  limiter=RateLimiter(clock=lambda: clock[0]), decisions=decisions,
                                  clock=lambda: clock[0])
    return interceptor, issuer, decisions, clock


def test_each_kind_of_caller_gets_its_decision_and_each_is_logged(setup) -> None:
    interceptor, issuer, decisions, _clock = setup
    admin = issuer.issue("alice", ["admin"])
    agent = issuer.issue("executor:w1", ["agent:executor"])
    user = issuer.issue("bob", ["user"])
    assert interceptor.authorize(SERVICE + "SubmitTask", FakeContext(admin)).own_only is False
    access = interceptor.authorize(SERVICE + "GetTask", FakeContext(agent, "executor", "executor"))
    assert access.own_only and access.subject == "executor:w1"
    cases = [
        (SERVICE + "SubmitTask", FakeContext(None), grpc.StatusCode.UNAUTHENTICATED),
        (SERVICE + "SubmitTask", FakeContext("garbage"), grpc.StatusCode.UNAUTHENTICATED),
        (SERVICE + "GetSecret", FakeContext(user), grpc.StatusCode.PERMISSION_DENIED),
        (SERVICE + "SubmitTask", FakeContext(admin, "executor", "executor"), grpc.StatusCode.PERMISSION_DENIED),
        (SERVICE + "RelayHeartbeats", FakeContext(admin), grpc.StatusCode.PERMISSION_DENIED),
        (SERVICE + "NoSuchMethod", FakeContext(admin), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for method, context, code in cases:
        with pytest.raises(Denied) as denied:
            interceptor.authorize(method, context)
        assert denied.value.code == code, (method, denied.value.message)
    node = interceptor.authorize(SERVICE + "RelayHeartbeats", FakeContext(None, "n2", "node"))
    assert node.principal.kind == "node" and node.subject == "node:n2"
    outcomes = {(d.who, d.action, d.outcome) for d in decisions.drain()}
    assert ("cert:cli", "access:SubmitTask", "denied:UNAUTHENTICATED") in outcomes
    assert ("bob", "access:GetSecret", "denied:PERMISSION_DENIED") in outcomes
    assert ("alice", "access:SubmitTask", "allowed") in outcomes


def test_expired_tokens_and_floods_of_bad_ones_are_refused(setup) -> None:
    interceptor, issuer, _decisions, clock = setup
    token = issuer.issue("alice", ["admin"], ttl_s=60)
    clock[0] += 61 + 30   # past exp and the verifier's leeway
    with pytest.raises(Denied) as denied:
        interceptor.authorize(SERVICE + "ListTasks", FakeContext(token))
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED and "expired" in denied.value.message
    codes = []
    for _ in range(UNAUTHENTICATED_LIMIT.burst + 5):
        try:
            interceptor.authorize(SERVICE + "ListTasks", FakeContext("garbage", cn="flooder"))
        except Denied as exc:
            codes.append(exc.code)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 5   # failures are limited per certificate


def test_the_decision_log_coalesces_is_bounded_and_takes_failed_flushes_back() -> None:
    log = DecisionLog(lambda: 7, pending_max=2)
    for _ in range(3):
        log.record("a", ("user",), "access:GetTask", "", "allowed")
    log.record("b", ("user",), "access:GetTask", "", "allowed")
    log.record("c", ("user",), "access:GetTask", "", "allowed")   # over the bound: counted as dropped
    drained = log.drain()
    assert [(d.who, d.count) for d in drained[:2]] == [("a", 3), ("b", 1)]
    assert drained[2].action == "audit:decisions-dropped" and drained[2].outcome == "dropped:1"
    log.put_back(drained[:2])
    assert [(d.who, d.count) for d in log.drain()] == [("a", 3), ("b", 1)]


def test_commands_stamped_by_a_node_verify_after_apply_and_an_edit_is_caught(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    stamper = AuditStamper("n1", AuditSigner("n1", key))
    keys = {"n1": [key.public_key()]}
    fsm = CoordinatorFSM()
    principal = Principal("executor:w1", ("agent:executor",), expires_unix_s=0)
    spec = {"id": "w1", "name": "w1", "type": "algorithmic", "task_types": ["echo"], "capacity": 1,
            "input_schema_json": "null", "output_schema_json": "null", "performance_profile_json": "null",
            "context_window_size": 0, "metadata": None}
    token = current_access.set(Access(principal, "RegisterExecutor", True, "executor"))
    try:
        entries = [stamper(cmd.register_executor(1000, spec))]
    finally:
        current_access.reset(token)
    entries.append(stamper(cmd.submit_tasks(1001, [["t1", "", "echo", "", "{}", 1, 0, [], 3, None]], "k1")))
    log = DecisionLog(lambda: 1002)
    log.record("bob", ("user",), "access:GetTask", "task:t1", "denied:PERMISSION_DENIED")
    for index, encoded in enumerate(entries, start=2):
        [command] = decode_entry(join_entry([encoded]))
        assert fsm.apply(index, command).ok
    assert fsm.apply(9, cmd.audit_decisions("n1", stamper.sign_decisions(log.drain()))).ok
    records = fsm.audit.records_from(0, 100)
    assert [r.who for r in records] == ["executor:w1", "node:n1", "bob"] and fsm.executors["w1"].owner == "executor:w1"
    assert verify_with_decisions(records, [], None, keys).ok
    edited = [records[0]._replace(who="mallory"), *records[1:]]
    report = verify_with_decisions(edited, [], None, keys)
    assert not report.ok and report.first_bad_seq == 1
    # A decision's outcome is covered by its signature (through its digest), even when the
    # chain's hashes are recomputed after the edit.
    from coordinator.audit import recompute_hash

    flipped = records[2]._replace(outcome="allowed")
    flipped = flipped._replace(hash=recompute_hash(flipped))
    report = verify_with_decisions([*records[:2], flipped], [], None, keys)
    assert not report.ok and report.first_bad_seq == 3
    # The executor's owner is enforced in apply: another principal cannot report for it.
    other = json.loads(json.dumps(cmd.start_task(1003, "t1", 1, "w1")))
    other.update({"p": "executor:w2", "r": ["agent:executor"], "own": "executor:w2"})
    assert fsm.apply(10, other).code == "PERMISSION_DENIED"
