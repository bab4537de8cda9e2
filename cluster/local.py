"""A local cluster of real node processes on 127.0.0.1, for `coordctl cluster up`, the demo,
tests and benchmarks. Its state lives in DATA_DIR/cluster.json, so later commands find it."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from cluster.credentials import JWT_KEYS_FILE, KEK_FILE, ClientCredentials, TokenMinter
from proto import coordinator_pb2 as pb

if TYPE_CHECKING:
    from cluster.client import CoordinatorClient
from proto import coordinator_pb2_grpc as pb_grpc

NODES_MAX = 7
LEADER_WAIT_S_DEFAULT = 30.0
STOP_WAIT_S = 10.0


class ClusterError(Exception):
    pass


# Ports for local clusters come from below the kernel's ephemeral range: a port the kernel hands
# out for port 0 is free only until some outgoing connection takes the same number, and a node
# restarted later (chaos tests) then fails to bind it (seen in CI: "Failed to bind to address").
LISTEN_PORT_RANGE = (20_000, 32_000)
FREE_PORT_TRIES_MAX = 200


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32_768, 60_999


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now on 127.0.0.1, outside the ephemeral range (so no outgoing
    connection takes one later); kernel-chosen ones if the range has none left. All stay bound
    until all are found, so none is handed out twice."""
    low, high = LISTEN_PORT_RANGE
    ephemeral_low, ephemeral_high = _ephemeral_range()
    rng = random.Random()
    held: list[socket.socket] = []
    try:
        for _ in range(count * FREE_PORT_TRIES_MAX):
            if len(held) == count:
                break
            port = rng.randint(low, high)
            if ephemeral_low <= port <= ephemeral_high:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        while len(held) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def pid_alive(pid: int) -> bool:
    """True if `pid` runs one of our nodes (guards against a recycled PID)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"cluster.cli" in cmdline and b"node" in cmdline and state != "Z"


@dataclass
class LocalNode:
    id: str
    raft_address: str
    grpc_address: str
    data_dir: str
    pid: int = 0
    metrics_address: str = ""   # Prometheus /metrics ("" in cluster files written before it existed)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "raft_address": self.raft_address, "grpc_address": self.grpc_address,
                "data_dir": self.data_dir, "pid": self.pid, "metrics_address": self.metrics_address}


class LocalCluster:
    def __init__(self, data_dir: str, *, env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 insecure_dev: bool = False, trace_sample_ratio: float | None = None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        # None: the node's default (cluster/tracing.py SAMPLE_RATIO_DEFAULT); spans go to
        # DATA_DIR/nN/traces.jsonl.
        self.trace_sample_ratio = trace_sample_ratio
        self.file = os.path.join(self.data_dir, "cluster.json")
        self.secret_file = os.path.join(self.data_dir, "cluster.secret")
        self.certs_dir = os.path.join(self.data_dir, "certs")
        self.env = env or {}
        self.extra_args = extra_args or []
        self.insecure_dev = insecure_dev
        self.nodes: list[LocalNode] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._admin: ClientCredentials | None = None
        if os.path.exists(self.file):
            self._load()

    # -- state file ------------------------------------------------------------------------
    def _load(self) -> None:
        with open(self.file) as f:
            data = json.load(f)
        self.nodes = [LocalNode(**n) for n in data["nodes"]]
        self.insecure_dev = bool(data.get("insecure_dev", False))

    def _save(self) -> None:
        tmp = self.file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"nodes": [n.as_dict() for n in self.nodes], "secret_file": self.secret_file,
                       "insecure_dev": self.insecure_dev, "certs_dir": self.certs_dir}, f, indent=2)
        os.replace(tmp, self.file)

    # -- credentials -------------------------------------------------------------------------
    def _init_security(self, node_ids: list[str]) -> None:
        """The cluster CA and certificates (nodes, cli, executor, bridge), the JWT key ring and
        the nodes' audit signing keys, once per data dir."""
        from security.audit import generate_node_key
        from security.certs import init_cluster, issue
        from security.secrets import Kek, write_kek_file
        from security.tokens import KeyRing

        if not os.path.exists(os.path.join(self.certs_dir, "ca.key")):
            init_cluster(self.certs_dir, node_ids)
            issue(self.certs_dir, "executor", "executor")
        keys_path = os.path.join(self.certs_dir, JWT_KEYS_FILE)
        if not os.path.exists(keys_path):
            KeyRing.create(keys_path)
        for node_id in node_ids:
            generate_node_key(Path(self.certs_dir), node_id)
        kek_path = os.path.join(self.certs_dir, KEK_FILE)
        if not os.path.exists(kek_path):
            write_kek_file(kek_path, [Kek.generate()])

    def credentials(self, *, cert_name: str = "cli", subject: str = "local-admin",
                    roles: tuple[str, ...] = ("admin",), ttl_s: int = 900) -> ClientCredentials:
        """Credentials to call this cluster: mTLS with DATA_DIR/certs/<cert_name> and tokens minted
        from its key ring (plaintext and none for an --insecure-dev cluster)."""
        if self.insecure_dev:
            return ClientCredentials.insecure()
        minter = TokenMinter(os.path.join(self.certs_dir, JWT_KEYS_FILE), subject, roles, ttl_s)
        return ClientCredentials(certs_dir=self.certs_dir, cert_name=cert_name, tokens=minter)

    def client(self, endpoints: list[str] | None = None, **kwargs: Any) -> CoordinatorClient:
        """A client of this cluster as an admin (all nodes unless `endpoints`)."""
        from cluster.client import CoordinatorClient

        return CoordinatorClient(endpoints or self.endpoints, credentials=self.admin, **kwargs)

    @property
    def admin(self) -> ClientCredentials:
        if self._admin is None:
            self._admin = self.credentials()
        return self._admin

    def node(self, node_id: str) -> LocalNode:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise ClusterError(f"node_id: no node {node_id!r} in {self.file}")

    @property
    def endpoints(self) -> list[str]:
        return [n.grpc_address for n in self.nodes]

    # -- lifecycle ---------------------------------------------------------------------------
    def init(self, nodes: int) -> None:
        if not 1 <= nodes <= NODES_MAX:
            raise ClusterError(f"--nodes: between 1 and {NODES_MAX}, got {nodes}")
        os.makedirs(self.data_dir, exist_ok=True)
        if not os.path.exists(self.secret_file):
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        if not self.insecure_dev:
            self._init_security([n.id for n in self.nodes] or [f"n{i}" for i in range(1, nodes + 1)])
        if self.nodes:
            if len(self.nodes) != nodes:
                raise ClusterError(
                    f"--nodes: {self.file} already describes {len(self.nodes)} nodes; "
                    "use that count or a fresh --data-dir"
                )
            return
        ports = iter(free_ports(3 * nodes))
        self.nodes = [
            LocalNode(f"n{i}", f"127.0.0.1:{next(ports)}", f"127.0.0.1:{next(ports)}",
                      os.path.join(self.data_dir, f"n{i}"), metrics_address=f"127.0.0.1:{next(ports)}")
            for i in range(1, nodes + 1)
        ]
        self._save()

    def up(self, nodes: int = 3, wait_leader_s: float = LEADER_WAIT_S_DEFAULT) -> str:
        self.init(nodes)
        running = [n.id for n in self.nodes if pid_alive(n.pid)]
        for node in self.nodes:
            if node.id not in running:
                self.start_node(node.id)
        return self.wait_leader(wait_leader_s)

    def start_node(self, node_id: str, env: dict[str, str] | None = None) -> int:
        node = self.node(node_id)
        if pid_alive(node.pid):
            raise ClusterError(f"node {node_id} already runs as pid {node.pid}")
        os.makedirs(node.data_dir, exist_ok=True)
        log_file = open(os.path.join(node.data_dir, "node.log"), "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "cluster.cli", "node", "run", "--cluster-file", self.file, "--node-id", node.id,
               "--data-dir", node.data_dir, "--secret-file", self.secret_file,
               *(["--insecure-dev"] if self.insecure_dev else ["--certs-dir", self.certs_dir]),
               *(["--metrics-address", node.metrics_address] if node.metrics_address else []),
               *(["--trace-sample-ratio", str(self.trace_sample_ratio)] if self.trace_sample_ratio is not None else []),
               # node.log of a local cluster is read by people; `extra_args` may say --log-format json
               "--log-format", "text", *self.extra_args]
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **self.env, **(env or {})}, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        log_file.close()
        self._procs[node.id] = proc
        node.pid = proc.pid
        self._save()
        return proc.pid

    def signal_node(self, node_id: str, sig: int) -> None:
        node = self.node(node_id)
        if pid_alive(node.pid):
            os.kill(node.pid, sig)

    def kill_node(self, node_id: str, wait_s: float = 5.0) -> None:
        node = self.node(node_id)
        self.signal_node(node_id, signal.SIGKILL)
        self._reap(node, wait_s)

    def stop_node(self, node_id: str, wait_s: float = STOP_WAIT_S) -> None:
        node = self.node(node_id)
        if not pid_alive(node.pid):
            return
        os.kill(node.pid, signal.SIGTERM)
        if not self._reap(node, wait_s):
            os.kill(node.pid, signal.SIGKILL)
            self._reap(node, 5.0)

    def _reap(self, node: LocalNode, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        proc = self._procs.get(node.id)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return True
            if proc is None and not pid_alive(node.pid):
                return True
            time.sleep(0.02)
        return False

    def down(self) -> None:
        for node in self.nodes:
            if pid_alive(node.pid):
                try:
                    os.kill(node.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            if not self._reap(node, STOP_WAIT_S) and pid_alive(node.pid):
                os.kill(node.pid, signal.SIGKILL)
                self._reap(node, 5.0)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self._procs.clear()

    # -- queries -------------------------------------------------------------------------------
    def statuses(self, timeout_s: float = 1.0, state_hash: bool = False) -> dict[str, pb.NodeStatus | None]:
        out: dict[str, pb.NodeStatus | None] = {}
        request = pb.ClusterStatusRequest(include_state_hash=state_hash)
        credentials = self.admin
        for node in self.nodes:
            try:
                with credentials.channel(node.grpc_address) as channel:
                    response = pb_grpc.CoordinatorStub(channel).ClusterStatus(request, timeout=timeout_s,
                                                                              metadata=credentials.metadata())
                out[node.id] = response.node
            except grpc.RpcError:
                out[node.id] = None
        return out

    def leader_id(self) -> str | None:
        leaders = [node_id for node_id, s in self.statuses().items() if s is not None and s.role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def wait_converged(self, timeout_s: float = 30.0) -> str:
        """Wait until every node runs and holds the same domain state (tasks, executors,
        checkpoints, events, secrets); return its hash. The audit chain is left out of the
        comparison: on a secure cluster every node turns each second's access decisions — these
        status calls included — into a command, so the applied index rarely stands still. Any
        two nodes seen at the same applied index must hold the same full state hash, or this
        raises: that would be divergence."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            statuses = self.statuses(2.0, state_hash=True)
            last = {k: (v.applied_index, v.domain_hash[:12]) if v else None for k, v in statuses.items()}
            values = list(statuses.values())
            by_index: dict[int, set[str]] = {}
            for v in values:
                if v is not None:
                    by_index.setdefault(v.applied_index, set()).add(v.state_hash)
            diverged = {index: hashes for index, hashes in by_index.items() if len(hashes) > 1}
            if diverged:
                raise ClusterError(f"nodes at the same applied index hold different states: {diverged}")
            if all(values) and len({v.domain_hash for v in values}) == 1:
                return values[0].domain_hash
            time.sleep(0.1)
        raise ClusterError(f"nodes did not converge within {timeout_s:.0f} s: {last}")

    def wait_leader(self, timeout_s: float = LEADER_WAIT_S_DEFAULT, exclude: str | None = None) -> str:
        """Wait until one node leads and every running node knows a leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            statuses = {k: v for k, v in self.statuses(0.5).items() if k != exclude}
            live = [s for s in statuses.values() if s is not None]
            leaders = [s.node_id for s in live if s.role == "leader"]
            if len(leaders) == 1 and live and all(s.leader_raft_address for s in live):
                return leaders[0]
            for node in self.nodes:
                proc = self._procs.get(node.id)
                if proc is not None and proc.poll() is not None and node.id != exclude:
                    raise ClusterError(f"node {node.id} exited with {proc.returncode}; see {node.data_dir}/node.log")
            time.sleep(0.05)
        raise ClusterError(f"no leader within {timeout_s:.0f} s; see node.log files under {self.data_dir}")
