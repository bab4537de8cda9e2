"""A coordinator node: the composition root that wires the pure core to Raft, the WAL and gRPC.

    gRPC (grpc.aio, main thread)          raft tick thread (pysyncobj)
    ─────────────────────────────         ─────────────────────────────────────────
    CoordinatorService                    RaftLog.apply_entry ─► CoordinatorFSM
      └─ Proposer ── apply_entry() ────►  LmdbJournal (fsync before any ack/vote)
      ◄─ results (call_soon_threadsafe) ─ SnapshotSerializer (background writer)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster import tracing
from cluster.credentials import JWT_KEYS_FILE, KEK_FILE, ClientCredentials
from cluster.auth import AuditStamper, AuthInterceptor, DecisionLog, ServerTls, audit_loop
from cluster.dispatch import DispatchSettings, Dispatcher
from cluster.proposer import Proposer, ProposerLimits
from cluster.request_guard import RequestGuard
from cluster.raft import ROLE_NAMES, RaftLog
from cluster.raft_patches import CoordinatorTransport, recommended_conf_kwargs
from cluster.service import AppliedWaiters, CoordinatorService, now_ms
from coordinator.fsm import CoordinatorFSM
from coordinator.limits import Limits
from proto import coordinator_pb2 as pb
from security.audit import AuditError, AuditSigner
from security.ratelimit import RateLimiter
from security.secrets import KekRing
from security.rbac import Policy, PolicyError
from security.tokens import TokenIssuer, TokenVerifier
from proto import coordinator_pb2_grpc as pb_grpc
from wal.checkpoint_store import CheckpointStore
from wal.journal import LmdbJournal

log = logging.getLogger("coordinator.node")

GRPC_MESSAGE_BYTES_MAX = 32 << 20
SECRET_BYTES_MIN = 16
COMPONENT_HEALTH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class NodeAddress:
    id: str
    raft_address: str
    grpc_address: str


@dataclass
class NodeConfig:
    node_id: str
    nodes: list[NodeAddress]
    data_dir: str
    secret: str
    limits: Limits = field(default_factory=Limits)
    proposer: ProposerLimits = field(default_factory=ProposerLimits)
    log_compaction_min_entries: int = 5000
    log_compaction_min_time_s: float = 300.0
    journal_bytes_compact: int = 64 << 20
    raft_overrides: dict[str, Any] = field(default_factory=dict)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    # Security (issue 6): DATA_DIR/certs of the cluster (CA, this node's certificate, the JWT key
    # ring, the audit keys) and the RBAC policy file ("" = the shipped default). insecure_dev
    # turns all of it off (plaintext, no tokens, no RBAC, no audit): only with --insecure-dev.
    certs_dir: str = ""
    policy_file: str = ""
    insecure_dev: bool = False
    # Prometheus metrics at http://<metrics_address>/metrics ("" = not served).
    metrics_address: str = ""
    # Traces (cluster/tracing.py): OTLP/gRPC to otlp_endpoint if set, else JSON lines to
    # trace_file ("" = DATA_DIR/traces.jsonl); a ratio of 0 turns tracing off.
    trace_file: str = ""
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 0.1

    @property
    def me(self) -> NodeAddress:
        for node in self.nodes:
            if node.id == self.node_id:
                return node
        raise ValueError(f"node_id: {self.node_id!r} is not in the cluster file (nodes: {[n.id for n in self.nodes]})")


def load_cluster_file(path: str) -> list[NodeAddress]:
    with open(path) as f:
        data = json.load(f)
    return [NodeAddress(n["id"], n["raft_address"], n["grpc_address"]) for n in data["nodes"]]


def load_secret(secret_file: str | None) -> str:
    secret = os.environ.get("COORD_CLUSTER_SECRET", "")
    if secret_file:
        with open(secret_file) as f:
            secret = f.read().strip()
    if len(secret) < SECRET_BYTES_MIN:
        raise SystemExit(
            "cluster secret: required (--secret-file or COORD_CLUSTER_SECRET), at least "
            f"{SECRET_BYTES_MIN} characters; it encrypts and authenticates all Raft traffic"
        )
    return secret


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.fsm = CoordinatorFSM()
        self.fsm_lock = threading.RLock()
        self.raft: RaftLog | None = None
        self.journal: LmdbJournal | None = None
        self.proposer: Proposer | None = None
        self.dispatcher: Dispatcher | None = None
        self.server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._audit_task: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        self.stamper: AuditStamper | None = None
        self.decisions: DecisionLog | None = None
        self.token_issuer: Callable[[], TokenIssuer] | None = None
        self.interceptor: AuthInterceptor | None = None
        self.metrics_server: Any = None
        self.metrics_registry: Any = None
        self.metrics: Any = None  # cluster.metrics.NodeMetrics when a metrics address is set

    def _paths(self) -> tuple[str, str]:
        os.makedirs(self.config.data_dir, exist_ok=True)
        return os.path.join(self.config.data_dir, "wal"), os.path.join(self.config.data_dir, "snapshot.bin")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        me = config.me
        # Security configuration is checked before anything starts (a bad policy, a missing
        # certificate or key stops the node with a message, not a half-started process).
        interceptors: list[grpc.aio.ServerInterceptor] = []
        server_credentials = None
        if config.insecure_dev:
            log.warning("node %s: --insecure-dev: plaintext gRPC, no authentication, no RBAC, no audit", me.id)
            relay_credentials = ClientCredentials.insecure()
        else:
            interceptors.append(self._security_interceptor())
            server_credentials = self.tls.credentials()
            try:
                self.stamper = AuditStamper(me.id, AuditSigner.from_dir(config.certs_dir, me.id))
            except AuditError as exc:
                raise SystemExit(f"audit key: {exc} (`coordctl cluster up` creates it)") from None
            # Node to node (the heartbeat relay): the node's own certificate, no token.
            relay_credentials = ClientCredentials(certs_dir=config.certs_dir, cert_name=me.id)
        wal_path, snapshot_path = self._paths()
        if config.metrics_address:
            from cluster.metrics import NodeMetrics

            self.metrics = NodeMetrics(me.id, self.metrics_snapshot)
        metrics = self.metrics  # its hooks are one histogram observe each; None: no hooks at all
        self.journal = LmdbJournal(wal_path, on_fsync_seconds=metrics.observe_wal_fsync if metrics else None)
        if metrics is not None:
            metrics.skip_history(self.journal)  # counted before this start: not counted again
        waiters = AppliedWaiters(loop)
        conf_kwargs = recommended_conf_kwargs()
        conf_kwargs.update(
            password=config.secret,
            bindAddress=me.raft_address,
            logCompactionMinEntries=config.log_compaction_min_entries,
            logCompactionMinTime=config.log_compaction_min_time_s,
            commandsQueueSize=config.proposer.entries_in_flight_max * 64 + 1000,
        )
        conf_kwargs.update(config.raft_overrides)
        peers = [n.raft_address for n in config.nodes if n.id != me.id]
        self.raft = RaftLog(
            me.raft_address, peers, fsm=self.fsm, fsm_lock=self.fsm_lock, journal=self.journal,
            snapshot_path=snapshot_path, transport_class=CoordinatorTransport, conf_kwargs=conf_kwargs,
            on_applied=waiters.notify_threadsafe,
            on_snapshot_seconds=metrics.observe_snapshot if metrics else None,
        )
        if self.stamper is None:
            self.proposer = Proposer(self.raft, loop, config.proposer,
                                     on_batch_commands=metrics.observe_batch if metrics else None)
        else:
            self.proposer = Proposer(self.raft, loop, config.proposer, encode=self.stamper,
                                     on_batch_commands=metrics.observe_batch if metrics else None)
        grpc_by_raft = {n.raft_address: n.grpc_address for n in config.nodes}

        def leader_grpc_address() -> str | None:
            leader = self.raft.status_cache.get("leader") if self.raft else None
            return grpc_by_raft.get(getattr(leader, "address", ""))

        self.dispatcher = Dispatcher(
            node_id=me.id, fsm=self.fsm, fsm_lock=self.fsm_lock, proposer=self.proposer, waiters=waiters,
            is_leader=self.raft._isLeader, leader_grpc_address=leader_grpc_address, limits=config.limits,
            settings=config.dispatch, relay_credentials=relay_credentials,
        )
        # Outermost first: call metrics and the call's trace span (one interceptor when both are
        # on), authentication and RBAC, then the guard against undecodable bodies.
        traced = self._configure_tracing()
        if config.metrics_address:
            from cluster.metrics import GrpcMetricsInterceptor

            self.metrics_registry = self.metrics.registry
            interceptors.insert(0, GrpcMetricsInterceptor(self.metrics_registry, me.id, trace_calls=traced).as_grpc())
        elif traced:
            interceptors.insert(0, tracing.server_interceptor())
        self.server = grpc.aio.server(interceptors=[*interceptors, RequestGuard()], options=[
            ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
        ])
        checkpoints = CheckpointStore(self.proposer, self.fsm, now_ms, limits=self.fsm.limits.checkpoints)
        service = CoordinatorService(
            fsm=self.fsm, fsm_lock=self.fsm_lock, proposer=self.proposer, waiters=waiters, limits=config.limits,
            node_status=self.status, dispatcher=self.dispatcher, checkpoints=checkpoints,
            decisions=self.decisions, token_issuer=self.token_issuer,
            keks=None if config.insecure_dev else KekRing(os.path.join(config.certs_dir, KEK_FILE)),
        )
        pb_grpc.add_CoordinatorServicer_to_server(service, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Coordinator"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        if config.insecure_dev:
            port = self.server.add_insecure_port(me.grpc_address)
        else:
            port = self.server.add_secure_port(me.grpc_address, server_credentials)
        if port == 0:
            raise SystemExit(f"grpc_address: cannot bind {me.grpc_address}")
        await self.server.start()
        self.raft.start(journal_bytes_compact=config.journal_bytes_compact)
        await self.dispatcher.start()
        if self.stamper is not None:
            self._audit_task = asyncio.create_task(audit_loop(
                stamper=self.stamper, decisions=self.decisions, propose=self.proposer.propose,
                is_leader=self.raft._isLeader, chain_head=self._audit_head, clock_ms=now_ms, stopping=self._stopped))
        if config.metrics_address:
            self._start_metrics()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._health_task = asyncio.create_task(self._component_health_loop())
        log.info("node %s serving gRPC on %s, raft on %s", me.id, me.grpc_address, me.raft_address)

    def metrics_snapshot(self) -> dict[str, Any]:
        status = self.status()
        with self.fsm_lock:
            executor_statuses: dict[str, int] = {}
            executor_load: dict[str, list[int]] = {}  # type -> [leased attempts, capacity] of online executors
            executor_tasks = self.fsm.executor_tasks
            for record in self.fsm.executors.values():
                executor_statuses[record.status] = executor_statuses.get(record.status, 0) + 1
                load = executor_load.setdefault(record.type, [0, 0])
                if record.status == "online":
                    load[0] += len(executor_tasks.get(record.id, ()))
                    load[1] += record.capacity
            return {
                "leader": status.leader_raft_address,
                "role": status.role, "term": status.term, "commit_index": status.commit_index,
                "applied_index": status.applied_index, "task_statuses": dict(self.fsm.status_counts),
                "executor_statuses": executor_statuses, "executor_load": executor_load,
                "audit_records": len(self.fsm.audit),
                "secrets": len(self.fsm.secrets), "commands_in_flight": status.commands_in_flight,
                "denied_total": self.interceptor.denied_total if self.interceptor is not None else 0,
            }

    def _start_metrics(self) -> None:
        """HTTP /metrics, /healthz, /readyz and the thread that folds task events and polls the
        leader; `metrics_server.shutdown()` stops both."""
        raft = self.raft
        try:
            self.metrics_server = self.metrics.start(
                self.config.metrics_address, self.metrics_snapshot, self.config.data_dir,
                fsm=self.fsm, fsm_lock=self.fsm_lock, raft_status=lambda: raft.status_cache)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--metrics-address: cannot serve on {self.config.metrics_address!r} ({exc})") from None

    def _configure_tracing(self) -> bool:
        config = self.config
        settings = tracing.TraceSettings(
            "coordinator-node", config.node_id,
            file=config.trace_file or os.path.join(config.data_dir, "traces.jsonl"),
            otlp_endpoint=config.otlp_endpoint, sample_ratio=config.trace_sample_ratio)
        try:
            return tracing.configure(settings) is not None
        except tracing.TracingConfigError as exc:
            raise SystemExit(f"--trace-sample-ratio: {exc}") from None

    def _audit_head(self) -> tuple[int, str, int]:
        with self.fsm_lock:
            chain = self.fsm.audit
            return chain.last_seq, chain.last_hash, chain.limits.head_every_records

    def _security_interceptor(self) -> AuthInterceptor:
        config = self.config
        if not config.certs_dir:
            raise SystemExit("certs_dir: required (--certs-dir, created by `coordctl certs init`) unless --insecure-dev")
        try:
            policy = Policy.load(config.policy_file) if config.policy_file else Policy.default()
        except PolicyError as exc:
            raise SystemExit(f"--policy-file: {exc}") from None
        keys_path = os.path.join(config.certs_dir, JWT_KEYS_FILE)
        if not os.path.exists(keys_path):
            raise SystemExit(f"JWT key ring: {keys_path} does not exist (`coordctl cluster up` or "
                             "`coordctl token init-keys` creates it)")
        self.tls = ServerTls(config.certs_dir, config.node_id)
        self.decisions = DecisionLog(now_ms)
        verifier = TokenVerifier(keys_path)
        self.interceptor = AuthInterceptor(policy=policy, verifier=verifier, limiter=RateLimiter(),
                                           decisions=self.decisions)
        # Refreshes sign with the key ring the verifier holds: it re-reads the file when it changes,
        # so after `coordctl token rotate-key` refreshed tokens carry the new kid.
        self.token_issuer = lambda: TokenIssuer(verifier.keyring)
        return self.interceptor

    async def _component_health_loop(self) -> None:
        """The gRPC health service per component, from the /readyz checks: `coordinator.raft`
        (a leader is known), `coordinator.wal` (writable), `coordinator.disk` (room for the WAL)
        and `coordinator.apply` (applied close to committed); "" and the Coordinator service stay
        SERVING while the process answers (liveness)."""
        from cluster.metrics import readiness

        names = {"leader": "coordinator.raft", "wal": "coordinator.wal", "disk": "coordinator.disk",
                 "apply": "coordinator.apply"}
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while not self._stopped.is_set():
            _ok, checks = await asyncio.to_thread(readiness, self.metrics_snapshot(), self.config.data_dir)
            for check, service in names.items():
                result = self.health.set(service, serving if checks[check]["ok"] else not_serving)
                if asyncio.iscoroutine(result):
                    await result
            try:
                await asyncio.wait_for(self._stopped.wait(), COMPONENT_HEALTH_INTERVAL_S)
            except TimeoutError:
                pass

    async def _set_health(self, status: int) -> None:
        result = self.health.set("", status)
        if asyncio.iscoroutine(result):
            await result
        result = self.health.set("agentcoordinator.v1.Coordinator", status)
        if asyncio.iscoroutine(result):
            await result

    def status(self, include_state_hash: bool = False) -> pb.NodeStatus:
        me = self.config.me
        raft = self.raft
        status = raft.status_cache if raft is not None else {}
        leader = status.get("leader")
        peers = {}
        for node in self.config.nodes:
            if node.id != me.id:
                peers[node.id] = status.get("partner_node_status_server_" + node.raft_address, 0) == 2
        commit = int(status.get("commit_idx") or 0)
        applied = self.fsm.last_applied_index
        state_hash = domain_hash = ""
        if include_state_hash:
            with self.fsm_lock:
                state_hash, domain_hash = self.fsm.state_hash(), self.fsm.domain_hash()
        return pb.NodeStatus(
            state_hash=state_hash, domain_hash=domain_hash, node_id=me.id, raft_address=me.raft_address, grpc_address=me.grpc_address,
            role=ROLE_NAMES.get(status.get("state", 0), "follower"), term=int(status.get("raft_term") or 0),
            commit_index=commit, applied_index=applied,
            leader_raft_address=getattr(leader, "address", "") if leader is not None else "",
            pid=os.getpid(), healthy=leader is not None and commit - applied < 1000,
            log_entries=int(status.get("log_len") or 0),
            commands_in_flight=self.proposer.commands_in_flight if self.proposer else 0,
            tasks=len(self.fsm.tasks), data_dir=os.path.abspath(self.config.data_dir), peers_connected=peers,
        )

    async def stop(self) -> None:
        self._stopped.set()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self._audit_task is not None:
            self._audit_task.cancel()
        if self._health_task is not None:
            self._health_task.cancel()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(grace=1.0)
        if self.raft is not None:
            await asyncio.to_thread(self.raft.stop)
        tracing.shutdown()  # flushes spans still queued
        self._stopped.set()


async def run_node(config: NodeConfig) -> None:
    # The gRPC loop and the Raft tick thread share the GIL; at the default 5 ms switch interval
    # a commit waits up to 5 ms for the other thread to yield.
    sys.setswitchinterval(float(os.environ.get("COORD_SWITCH_INTERVAL_S", "0.0005")))
    node = Node(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node %s stopping", config.node_id)
    await node.stop()
