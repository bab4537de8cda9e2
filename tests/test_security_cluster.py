"""Issue 6 on a real 3-node cluster with security on (the default): every RPC refuses callers
without a token, with an expired one, with one signed by a foreign key and with a role that lacks
the permission; an agent cannot touch another agent's task; each refusal leaves the domain
state as it was and is an audit record; a certificate from another CA cannot connect."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cluster.credentials import ClientCredentials, StaticToken
from cluster.local import LocalCluster
from coordinator.checkpoints import canonical_json, state_checksum
from proto import coordinator_pb2 as pb
from proto import coordinator_pb2_grpc as pb_grpc
from security.certs import init_cluster
from security.tokens import KeyRing, TokenIssuer
from tests.executor_pool import Executors, wait_online

pytestmark = [pytest.mark.cluster]

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
AUDIT_WAIT_S = 30.0


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> Iterator[tuple[LocalCluster, Any]]:
    data = tmp_path_factory.mktemp("secure")
    # Small compaction thresholds, so nodes write snapshots (the stored data the tamper test edits).
    cluster = LocalCluster(str(data / "cluster"), extra_args=["--log-compaction-min-entries", "40",
                                                              "--log-compaction-min-time-s", "1"])
    pool = Executors(cluster)
    try:
        cluster.up(3, wait_leader_s=30)
        yield cluster, pool
    finally:
        pool.stop_all()
        cluster.down()


def requests(task_id: str, executor_id: str) -> dict[str, Any]:
    """One well-formed request per RPC (what an authorized caller could send)."""
    return {
        "SubmitTask": pb.SubmitTaskRequest(task=pb.TaskSpec(type="echo"), idempotency_key="sec-1"),
        "SubmitDag": pb.SubmitDagRequest(tasks=[pb.TaskSpec(type="echo", name="a")], idempotency_key="sec-2"),
        "GetTask": pb.GetTaskRequest(task_id=task_id),
        "ListTasks": pb.ListTasksRequest(),
        "CancelTask": pb.CancelTaskRequest(task_id=task_id, reason="sec"),
        "CancelDag": pb.CancelDagRequest(dag_id="d-none"),
        "WaitTasks": pb.WaitTasksRequest(task_ids=[task_id], timeout_s=0.5),
        "RequeueTask": pb.RequeueTaskRequest(task_id=task_id),
        "RegisterExecutor": pb.RegisterExecutorRequest(executor=pb.ExecutorSpec(
            id="x-intruder", name="x", type="algorithmic", supported_task_types=["echo"], capacity=1)),
        "UnregisterExecutor": pb.UnregisterExecutorRequest(executor_id=executor_id),
        "ListExecutors": pb.ListExecutorsRequest(),
        "ClusterStatus": pb.ClusterStatusRequest(),
        "RelayHeartbeats": pb.RelayHeartbeatsRequest(executor_ids=[executor_id], from_node_id="n1"),
        "Delegate": pb.DelegateRequest(parent_task_id=task_id, parent_attempt=1, executor_id=executor_id,
                                       request_id="r1", tasks=[pb.TaskSpec(type="echo")]),
        "SaveCheckpoint": pb.SaveCheckpointRequest(task_id=task_id, attempt=1, executor_id=executor_id,
                                                   sequence_number=1, kind="full", payload_json="{}"),
        "RestoreCheckpoint": pb.RestoreCheckpointRequest(task_id=task_id, attempt=1, executor_id=executor_id),
        "ListCheckpoints": pb.ListCheckpointsRequest(task_id=task_id),
        "GetCheckpoint": pb.GetCheckpointRequest(task_id=task_id),
        "RefreshToken": pb.RefreshTokenRequest(),
        "ListAudit": pb.ListAuditRequest(),
        "Watch": pb.WatchRequest(from_index=1),
        "ExecutorStream": pb.ExecutorMessage(hello=pb.ExecutorHello(executor=pb.ExecutorSpec(
            id=executor_id, name="x", type="algorithmic", supported_task_types=["echo"], capacity=1))),
    }


def invoke(credentials: ClientCredentials, endpoint: str, method: str, request: Any) -> grpc.StatusCode:
    """The status one call ends with (OK included), streams read to their first message."""
    with credentials.channel(endpoint) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        metadata = credentials.metadata()
        try:
            if method == "Watch":
                next(iter(stub.Watch(request, timeout=5, metadata=metadata)))
            elif method == "ExecutorStream":
                next(iter(stub.ExecutorStream(iter([request]), timeout=5, metadata=metadata)))
            else:
                getattr(stub, method)(request, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def fingerprint(cluster: LocalCluster) -> tuple:
    """The domain state a client sees: every task and executor (not the audit chain, which
    records the refusals by design)."""
    with cluster.client() as client:
        tasks = client.call("ListTasks", pb.ListTasksRequest(limit=1000, consistency=pb.CONSISTENCY_LINEARIZABLE))
        executors = client.call("ListExecutors", pb.ListExecutorsRequest(consistency=pb.CONSISTENCY_LINEARIZABLE))
    return (sorted((t.id, t.status, t.attempt, t.assigned_executor, t.checkpoint_sequence, t.priority)
                   for t in tasks.tasks),
            sorted((e.id, e.capacity, e.type) for e in executors.executors))  # status: the lease tracker may
    # declare an executor without a stream lost meanwhile, which no refused call causes


def audit_records(cluster: LocalCluster) -> list[pb.AuditRecord]:
    with cluster.client() as client:
        return list(client.call("ListAudit", pb.ListAuditRequest(limit=5000)).records)


def wait_audit(cluster: LocalCluster, wanted: set[tuple[str, str, str]], key) -> set[tuple[str, str, str]]:
    """Poll until every wanted (who, action, outcome-prefix) has a record; return what is missing."""
    missing = set(wanted)
    deadline = time.monotonic() + AUDIT_WAIT_S
    while missing and time.monotonic() < deadline:
        seen = {key(r) for r in audit_records(cluster)}
        missing = {w for w in wanted if not any(s[0] == w[0] and s[1] == w[1] and s[2].startswith(w[2]) for s in seen)}
        if missing:
            time.sleep(0.5)
    return missing


def test_every_rpc_refuses_bad_credentials_changes_nothing_and_is_audited(secure, tmp_path) -> None:
    cluster, _pool = secure
    with cluster.client() as client:
        task_id = client.submit_task(pb.TaskSpec(type="echo", metadata={"k": "v"})).task_id
        client.call("RegisterExecutor", pb.RegisterExecutorRequest(executor=pb.ExecutorSpec(
            id="x-victim", name="victim", type="algorithmic", supported_task_types=["nothing"], capacity=1)))
    keys = f"{cluster.certs_dir}/jwt-keys.json"
    expired = TokenIssuer(KeyRing.load(keys), clock=lambda: time.time() - 7200).issue("alice", ["admin"], 60)
    foreign = TokenIssuer(KeyRing.create(tmp_path / "foreign-keys.json")).issue("alice", ["admin"], 600)
    callers = {
        "no token": (ClientCredentials(certs_dir=cluster.certs_dir, cert_name="cli"), UNAUTH),
        "expired token": (ClientCredentials(certs_dir=cluster.certs_dir, tokens=StaticToken(expired)), UNAUTH),
        "foreign key": (ClientCredentials(certs_dir=cluster.certs_dir, tokens=StaticToken(foreign)), UNAUTH),
        "wrong role": (cluster.credentials(subject="mallory", roles=("nobody",)), DENIED),
    }
    before = fingerprint(cluster)
    endpoint = cluster.endpoints[1]
    outcomes: dict[tuple[str, str], grpc.StatusCode] = {}
    for method, request in requests(task_id, "x-victim").items():
        for name, (credentials, _expected) in callers.items():
            outcomes[(method, name)] = invoke(credentials, endpoint, method, request)
    wrong = {k: (v.name, callers[k[1]][1].name) for k, v in outcomes.items()
             if v != (DENIED if k[0] == "RelayHeartbeats" else callers[k[1]][1])}
    assert not wrong, f"(method, caller): (got, expected) {wrong}"
    assert fingerprint(cluster) == before
    # Each refusal is an audit record (identical ones within a second are one record with a count).
    wanted = set()
    for method in requests(task_id, "x-victim"):
        if method == "RelayHeartbeats":
            wanted.add(("cert:cli", f"access:{method}", "denied:PERMISSION_DENIED"))
            continue
        wanted.add(("cert:cli", f"access:{method}", "denied:UNAUTHENTICATED"))
        wanted.add(("mallory", f"access:{method}", "denied:PERMISSION_DENIED"))
    missing = wait_audit(cluster, wanted, key=lambda r: (r.who, r.action, r.outcome))
    assert not missing, f"no denial record for {sorted(missing)[:5]}"


def test_an_agent_cannot_touch_another_agents_task(secure) -> None:
    cluster, pool = secure
    pool.start("wb", capacity=1)          # agent B: subject executor:wb
    with cluster.client() as client:
        wait_online(client, 1)
        task_id = client.submit_task(pb.TaskSpec(type="sleep", input_json=json.dumps({"ms": 60_000}))).task_id
        deadline = time.monotonic() + 30
        while client.get_task(task_id).status != "executing" and time.monotonic() < deadline:
            time.sleep(0.1)
        task = client.get_task(task_id)
    assert task.status == "executing" and task.assigned_executor == "wb"
    agent_a = cluster.credentials(cert_name="executor", subject="executor:wa", roles=("agent:executor",))
    endpoint = cluster.endpoints[0]
    own = pb.RegisterExecutorRequest(executor=pb.ExecutorSpec(id="wa", name="wa", type="algorithmic",
                                                              supported_task_types=["nothing"], capacity=1))
    assert invoke(agent_a, endpoint, "RegisterExecutor", own) == grpc.StatusCode.OK
    before = fingerprint(cluster)
    attempt = task.attempt
    document = {"state_snapshot": {"stolen": True}, "executed_actions": [], "remaining_plan": []}
    touches = {
        "GetTask": pb.GetTaskRequest(task_id=task_id),
        "WaitTasks": pb.WaitTasksRequest(task_ids=[task_id], timeout_s=0.5),
        "ListCheckpoints": pb.ListCheckpointsRequest(task_id=task_id),
        "GetCheckpoint": pb.GetCheckpointRequest(task_id=task_id),
        "RestoreCheckpoint": pb.RestoreCheckpointRequest(task_id=task_id, attempt=attempt, executor_id="wb"),
        "SaveCheckpoint": pb.SaveCheckpointRequest(
            task_id=task_id, attempt=attempt, executor_id="wb", sequence_number=1, kind="full",
            payload_json=canonical_json(document), checksum=state_checksum(document)),
        "Delegate": pb.DelegateRequest(parent_task_id=task_id, parent_attempt=attempt, executor_id="wb",
                                       request_id="steal", tasks=[pb.TaskSpec(type="echo")]),
        "UnregisterExecutor": pb.UnregisterExecutorRequest(executor_id="wb"),
        "RegisterExecutor": pb.RegisterExecutorRequest(executor=pb.ExecutorSpec(
            id="wb", name="wb", type="algorithmic", supported_task_types=["sleep"], capacity=1)),
        "ExecutorStream": pb.ExecutorMessage(hello=pb.ExecutorHello(executor=pb.ExecutorSpec(
            id="wb", name="wb", type="algorithmic", supported_task_types=["sleep"], capacity=1))),
        "CancelTask": pb.CancelTaskRequest(task_id=task_id, reason="not mine"),
    }
    outcomes = {method: invoke(agent_a, endpoint, method, request) for method, request in touches.items()}
    assert {m: c for m, c in outcomes.items() if c != DENIED} == {}
    with agent_a.channel(endpoint) as channel:
        listed = pb_grpc.CoordinatorStub(channel).ListTasks(pb.ListTasksRequest(), metadata=agent_a.metadata(),
                                                            timeout=10)
    assert task_id not in {t.id for t in listed.tasks}   # an agent lists only its own tasks
    assert fingerprint(cluster) == before
    # Reads are refused at the node (decision records naming the task), writes in apply (the
    # command's own record, outcome PERMISSION_DENIED), the rest by RBAC.
    wanted = {("executor:wa", f"access:{m}", "denied:PERMISSION_DENIED")
              for m in ("GetTask", "WaitTasks", "ListCheckpoints", "GetCheckpoint", "RestoreCheckpoint", "CancelTask")}
    wanted |= {("executor:wa", a, "PERMISSION_DENIED")
               for a in ("SAVE_CHECKPOINT", "SUBMIT_TASKS", "UNREGISTER_EXECUTOR", "REGISTER_EXECUTOR")}
    missing = wait_audit(cluster, wanted, key=lambda r: (r.who, r.action, r.outcome))
    assert not missing, f"no denial record for {sorted(missing)}"


def test_a_certificate_from_another_ca_cannot_connect(secure, tmp_path) -> None:
    cluster, _pool = secure
    init_cluster(tmp_path / "other-ca", ["n1"])
    keys = f"{cluster.certs_dir}/jwt-keys.json"
    token = TokenIssuer(KeyRing.load(keys)).issue("alice", ["admin"], 600)   # a valid token does not help
    other = ClientCredentials(certs_dir=str(tmp_path / "other-ca"), cert_name="cli", tokens=StaticToken(token))
    assert invoke(other, cluster.endpoints[0], "ClusterStatus", pb.ClusterStatusRequest()) == grpc.StatusCode.UNAVAILABLE
    plaintext = ClientCredentials.insecure()
    assert invoke(plaintext, cluster.endpoints[0], "ClusterStatus", pb.ClusterStatusRequest()) == grpc.StatusCode.UNAVAILABLE
    ours = ClientCredentials(certs_dir=cluster.certs_dir, cert_name="cli", tokens=StaticToken(token))
    assert invoke(ours, cluster.endpoints[0], "ClusterStatus", pb.ClusterStatusRequest()) == grpc.StatusCode.OK


def test_the_audit_chain_verifies_and_the_cli_reports_a_tampered_export(secure, tmp_path) -> None:
    import subprocess
    import sys

    from tests.executor_pool import ROOT

    cluster, _pool = secure

    def coordctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", cluster.data_dir],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    verified = coordctl("audit", "verify", "--output", "json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    export = tmp_path / "audit.jsonl"
    assert coordctl("audit", "export", "--out", str(export)).returncode == 0
    lines = export.read_text().splitlines()
    assert len(lines) > 5
    record = json.loads(lines[3])
    record["who"] = "someone-else"
    lines[3] = json.dumps(record)
    export.write_text("\n".join(lines) + "\n")
    tampered = coordctl("audit", "verify", "--file", str(export), "--output", "json")
    assert tampered.returncode == 2
    report = json.loads(tampered.stdout)
    assert report["ok"] is False and report["first_bad_seq"] == record["seq"], report


def test_secrets_round_trip_rotate_and_never_appear_in_plaintext(secure) -> None:
    import os
    import subprocess
    import sys

    from tests.executor_pool import ROOT

    cluster, _pool = secure
    plaintext = "sk-planted-" + os.urandom(12).hex()

    def coordctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", cluster.data_dir],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, input=stdin)

    stored = coordctl("secret", "put", "cloudru_api_key", stdin=plaintext + "\n")
    assert stored.returncode == 0, stored.stderr
    agent = cluster.credentials(cert_name="executor", subject="executor:reader", roles=("agent:executor",))
    get = pb.GetSecretRequest(name="cloudru_api_key")
    with agent.channel(cluster.endpoints[2]) as channel:       # any node unseals it
        assert pb_grpc.CoordinatorStub(channel).GetSecret(get, metadata=agent.metadata(), timeout=10).value == plaintext
    user = cluster.credentials(subject="bob", roles=("user",))
    assert invoke(user, cluster.endpoints[0], "GetSecret", get) == DENIED
    before = json.loads(coordctl("secret", "list", "--output", "json").stdout)["secrets"]
    rotated = coordctl("secret", "rotate-kek", "--output", "json")
    assert rotated.returncode == 0, rotated.stderr
    report = json.loads(rotated.stdout)
    assert report["rewrapped"] == 1 and report["kek_id"] != report["old_kek_id"] == before[0]["kek_id"]
    with cluster.admin.channel(cluster.endpoints[1]) as channel:
        value = pb_grpc.CoordinatorStub(channel).GetSecret(get, metadata=cluster.admin.metadata(), timeout=10).value
    assert value == plaintext
    # The WAL, snapshots, node and executor logs, certs dir: none holds the plaintext or its base64.
    import base64

    needles = [plaintext.encode(), base64.b64encode(plaintext.encode())]
    offenders = []
    for root, _dirs, files in os.walk(cluster.data_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            offenders += [path for needle in needles if needle in data]
    assert offenders == []


def _edit_snapshot_audit(path: str, edit) -> list:
    """Rewrite a snapshot file with its audit rows changed by `edit(rows)`, recomputing the
    file's own checksum (an attacker with write access to the data dir can)."""
    from wal.snapshot import read_snapshot, write_snapshot

    header, chunks = read_snapshot(path)
    decoded = [json.loads(c) for c in chunks[2:]]
    rows, positions, section = [], [], None
    for i, item in enumerate(decoded):
        if isinstance(item, dict):
            section = item.get("section")
        elif section == "audit":
            positions.append(i)
            rows.extend(item)
    edited = edit(list(rows))
    for i in positions:
        decoded[i] = []
    decoded[positions[0]] = edited
    for i, item in enumerate(decoded):
        if isinstance(item, dict) and item.get("section") == "audit":
            item["count"] = len(edited)
    out = chunks[:2] + [json.dumps(x, separators=(",", ":"), ensure_ascii=False).encode() for x in decoded
                        if not (isinstance(x, list) and not x)]
    write_snapshot(path, header, out)
    return rows


def test_tampering_with_a_nodes_stored_audit_records_is_pinpointed(secure, tmp_path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    from tests.executor_pool import ROOT

    cluster, _pool = secure
    with cluster.client() as client:              # enough commands for a snapshot with many records
        for n in range(60):
            client.submit_task(pb.TaskSpec(type="nothing-runs-this", metadata={"n": str(n)}))
    node = cluster.nodes[2]
    snapshot = os.path.join(node.data_dir, "snapshot.bin")
    deadline = time.monotonic() + 60
    while not os.path.exists(snapshot) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.exists(snapshot), "the node wrote no snapshot"
    cluster.stop_node(node.id)
    original = tmp_path / "snapshot.orig"
    shutil.copy(snapshot, original)

    def verify() -> dict:
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "audit", "verify", "--node-data-dir", node.data_dir,
                               "--data-dir", cluster.data_dir, "--output", "json"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode in (0, 2), done.stderr
        return json.loads(done.stdout)

    assert verify()["ok"] is True
    try:
        rows = _edit_snapshot_audit(snapshot, lambda rows: rows)
        assert len(rows) >= 6
        k = len(rows) // 2
        cases = {
            "edit": lambda r: r[:k] + [[*r[k][:4], "intruder", *r[k][5:]]] + r[k + 1:],
            "delete": lambda r: r[:k] + r[k + 1:],
            "reorder": lambda r: r[:k] + [r[k + 1], r[k]] + r[k + 2:],
        }
        for name, edit in cases.items():
            shutil.copy(original, snapshot)
            _edit_snapshot_audit(snapshot, edit)
            report = verify()
            assert report["ok"] is False, name
            assert report["first_bad_seq"] == rows[k][0], (name, report)
        # A node refuses to start from a snapshot whose audit chain does not reproduce itself.
        shutil.copy(original, snapshot)
        _edit_snapshot_audit(snapshot, cases["edit"])
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "node", "run", "--cluster-file", cluster.file,
                                 "--node-id", node.id, "--data-dir", node.data_dir, "--secret-file",
                                 cluster.secret_file, "--certs-dir", cluster.certs_dir],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 70 and "audit snapshot" in err, err[-2000:]
    finally:
        shutil.copy(original, snapshot)
        cluster.start_node(node.id)
        cluster.wait_leader()


def _served_serial(cluster: LocalCluster, endpoint: str) -> int:
    """The serial number of the certificate a node serves now (a fresh TLS handshake)."""
    import socket
    import ssl

    from cryptography import x509

    context = ssl.create_default_context(cafile=f"{cluster.certs_dir}/ca.pem")
    context.load_cert_chain(f"{cluster.certs_dir}/cli.pem", f"{cluster.certs_dir}/cli.key")
    context.set_alpn_protocols(["h2"])
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_a_rotated_node_certificate_is_served_without_a_restart(secure) -> None:
    from cryptography import x509

    from security.certs import issue

    cluster, _pool = secure
    node = cluster.nodes[0]
    before = _served_serial(cluster, node.grpc_address)
    issued = issue(cluster.certs_dir, node.id, "node")
    new_serial = x509.load_pem_x509_certificate(issued.cert_path.read_bytes()).serial_number
    assert new_serial != before
    assert _served_serial(cluster, node.grpc_address) == new_serial
    with cluster.client([node.grpc_address]) as client:   # and the API works over it, same process
        assert client.status(node.grpc_address).pid == node.pid


def test_an_executor_with_a_short_token_refreshes_it_and_keeps_working(secure) -> None:
    cluster, pool = secure
    keys = f"{cluster.certs_dir}/jwt-keys.json"
    ttl_s = 6
    token = TokenIssuer(KeyRing.load(keys)).issue("executor:short", ["agent:executor"], ttl_s)
    pool.start("short", capacity=1, env={"COORD_TOKEN": token})
    with cluster.client() as client:
        # Runs across several lifetimes of the first token: the stream it opened ends when the
        # token does, and the agent comes back with a refreshed one.
        task_id = client.submit_task(pb.TaskSpec(type="sleep", input_json=json.dumps({"ms": 4 * ttl_s * 1000}),
                                                 metadata={"pin": "short"})).task_id
        final = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            final = client.get_task(task_id)
            if final.status in ("completed", "failed", "dead_letter", "cancelled"):
                break
            time.sleep(0.5)
    assert final is not None and final.status == "completed", final
    missing = wait_audit(cluster, {("executor:short", "access:RefreshToken", "allowed")},
                         key=lambda r: (r.who, r.action, r.outcome))
    assert not missing


def test_rate_limits_come_from_the_policy_file_and_a_bad_policy_stops_the_node(make_cluster, tmp_path) -> None:
    import subprocess
    import sys

    import yaml

    from tests.executor_pool import ROOT

    import security.rbac as rbac_module

    document = yaml.safe_load((pathlib.Path(rbac_module.__file__).with_name("policy.yaml")).read_text())
    document["rate_limits"]["roles"]["user"] = {"requests_per_s": 0.5, "burst": 3}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document))
    cluster = make_cluster(3, extra_args=["--policy-file", str(policy)], subdir="limited")
    user = cluster.credentials(subject="carol", roles=("user",))
    codes, trailers = [], []
    with user.channel(cluster.endpoints[0]) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for _ in range(5):
            try:
                stub.ClusterStatus(pb.ClusterStatusRequest(), metadata=user.metadata(), timeout=10)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                trailers.append(dict(exc.trailing_metadata() or ()))
    assert codes[:3] == ["OK"] * 3 and codes[3:] == ["RESOURCE_EXHAUSTED"] * 2, codes
    assert all(int(t["retry-after-ms"]) > 0 for t in trailers)
    with cluster.client() as client:                  # another principal is not held back
        assert client.status(cluster.endpoints[0]).node_id == "n1"
    bad = tmp_path / "bad.yaml"
    document["roles"]["user"]["permissions"] = ["task.raed"]
    bad.write_text(yaml.safe_dump(document))
    node = cluster.nodes[0]
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "node", "run", "--cluster-file", cluster.file,
                           "--node-id", node.id, "--data-dir", str(tmp_path / "other"), "--secret-file",
                           cluster.secret_file, "--certs-dir", cluster.certs_dir, "--policy-file", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0 and "task.raed" in done.stderr, done.stderr[-2000:]
