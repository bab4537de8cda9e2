"""Our own cluster: 3 coordinator nodes (``python -m cluster.cli node run``) on 127.0.0.1, started and
stopped by ``cluster.local.LocalCluster`` with data dirs in a temporary directory on the local disk.

(b)  durable single-task submission: ``SubmitTask`` with a fresh idempotency key per call, from a
     ``grpc.aio`` client in its own process, calls spread round-robin over the 3 nodes (so 2 of 3
     are forwarded follower -> leader inside pysyncobj); 1 and 64 calls in flight. With one client
     also "leader only" and "followers only", because the two paths differ by tens of ms.
DAG  ``SubmitDag`` of 1000-task DAGs (every 4th task depends on the two tasks before it) from a few
     concurrent clients, spread over the nodes: DAGs/s x 1000 = tasks/s.
(c)  leader failover: SIGKILL the leader; every ~10 ms a fresh ``SubmitTask`` probe (own key,
     3 s timeout) goes to a survivor, alternating; time SIGKILL -> first acknowledged probe. The
     killed node is restarted and the cluster waited on (converged: same applied index and state
     hash everywhere) between runs.
(d)  restart: load 100k tasks via SubmitDag (a fresh cluster), SIGTERM one follower, start it again:
     process start -> (i) ClusterStatus answers, (ii) applied index >= the leader's. Then the same
     after the follower has written a snapshot (restarted once with ``--log-compaction-min-entries``
     low, so it compacts its log into ``snapshot.bin``).
mem  VmRSS of every node before and after loading those 100k tasks, per task.

    python -m benchmarks.bench_cluster                       # everything (~2.5 min)
    python -m benchmarks.bench_cluster --only submit dag     # parts: submit dag failover restart
    python -m benchmarks.bench_cluster --profile /tmp/prof   # py-spy the leader under c=64 and DAG load

Security is on, as in production (mTLS, a JWT on every call, RBAC, rate limits, audit): the
cluster's data dir holds its CA and key ring, and every client here, in this process or in a
client subprocess (given ``data_dir``), calls with the cluster's admin credentials.
``OurCluster(insecure_dev=True)`` starts the same cluster with ``--insecure-dev`` (plaintext, no
tokens); ``bench_security`` compares the two.

Every process is killed by PID in ``finally`` (``LocalCluster.down()``); every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_etcd import FailoverResult as EtcdFailoverResult
from benchmarks.loadgen import REPO_ROOT, Result, machine_note, markdown_table, run_closed_loop, run_in_subprocess

SERVICE = "/agentcoordinator.v1.Coordinator/"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 32 << 20), ("grpc.max_send_message_length", 32 << 20)]
DAG_TASKS_DEFAULT = 1000


# --------------------------------------------------------------------------- request bytes
# The client sends pre-serialized requests and only appends the idempotency key (field 2, a
# string; protobuf keeps the last value of a repeated scalar field), so the Python client spends
# its CPU on gRPC, as the echo client does, not on building messages.


def _key_field(key: str) -> bytes:
    raw = key.encode()
    assert len(raw) < 128
    return b"\x12" + bytes((len(raw),)) + raw


def submit_task_request_bytes() -> bytes:
    from proto import coordinator_pb2 as pb

    spec = pb.TaskSpec(type="bench", name="t", input_json='{"n":1}')
    return pb.SubmitTaskRequest(task=spec).SerializeToString()


def dag_request_bytes(n_tasks: int = DAG_TASKS_DEFAULT) -> bytes:
    """A DAG of ``n_tasks``: every 4th task depends on the two tasks before it (~n/2 edges)."""
    from proto import coordinator_pb2 as pb

    specs = []
    for i in range(n_tasks):
        deps = [f"n{i - 1}", f"n{i - 2}"] if i % 4 == 3 else []
        specs.append(pb.TaskSpec(type="bench", name=f"n{i}", input_json='{"n":1}', depends_on=deps))
    return pb.SubmitDagRequest(tasks=specs).SerializeToString()


# --------------------------------------------------------------------------- clients (own process)


def client_credentials(data_dir: str):
    """The admin credentials of the local cluster in ``data_dir`` (plaintext and no token if it was
    started with --insecure-dev), for a client running in its own process."""
    from cluster.credentials import resolve_credentials

    return resolve_credentials(data_dir, subject="bench-admin")


async def _closed_loop_client(
    endpoints: list[str], method: str, base: bytes, key_prefix: str, check, concurrency: int,
    duration_s: float | None, warmup_s: float, count: int | None, name: str, op_timeout_s: float,
    max_seconds: float, data_dir: str,
) -> tuple[Result, int]:
    """Closed-loop workers sending the pre-serialized request `base` (plus a fresh idempotency
    key) to ``endpoints[n % len(endpoints)]``, with the cluster's credentials (the token in each
    call's metadata, as ``CoordinatorClient`` sends it); `check(reply_bytes)` validates each reply.
    Returns the result and how many requests were started."""
    creds = client_credentials(data_dir)
    channels = [creds.aio_channel(e, GRPC_OPTIONS) for e in endpoints]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)
        calls = [ch.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
                 for ch in channels]
        counter = [0]

        async def op() -> None:
            n = counter[0]
            counter[0] += 1
            check(await calls[n % len(calls)](base + _key_field(key_prefix + str(n)), timeout=op_timeout_s,
                                              metadata=creds.metadata()))

        t_start = time.time()
        r = await run_closed_loop(op, concurrency, duration_s=duration_s, count=count, warmup_s=warmup_s,
                                  op_timeout_s=op_timeout_s, max_seconds=max_seconds, name=name)
        r.extra["window_unix"] = [t_start + warmup_s, t_start + warmup_s + r.seconds]
        return r, counter[0]
    finally:
        for ch in channels:
            await ch.close()


async def submit_client(
    endpoints: list[str], concurrency: int, duration_s: float = 5.0, warmup_s: float = 1.0,
    name: str = "SubmitTask", op_timeout_s: float = 5.0, *, data_dir: str,
) -> Result:
    """``concurrency`` closed-loop workers; call n goes to ``endpoints[n % len(endpoints)]``;
    ``data_dir``: the local cluster's directory (its credentials)."""
    from proto import coordinator_pb2 as pb

    def check(reply: bytes) -> None:
        if not pb.SubmitTaskResponse.FromString(reply).task_id:
            raise RuntimeError("no task id")

    prefix = f"b{os.getpid()}-{time.monotonic_ns() % 10**9}-"
    r, _ = await _closed_loop_client(endpoints, "SubmitTask", submit_task_request_bytes(), prefix, check,
                                     concurrency, duration_s, warmup_s, None, name, op_timeout_s,
                                     warmup_s + duration_s + 30, data_dir)
    return r


async def dag_client(
    endpoints: list[str], concurrency: int, duration_s: float | None = 5.0, warmup_s: float = 1.0,
    count: int | None = None, dag_tasks: int = DAG_TASKS_DEFAULT, name: str = "SubmitDag",
    op_timeout_s: float = 15.0, max_seconds: float = 120.0, *, data_dir: str,
) -> Result:
    """``concurrency`` closed-loop workers each submitting ``dag_tasks``-task DAGs."""
    from proto import coordinator_pb2 as pb

    def check(reply: bytes) -> None:
        if len(pb.SubmitDagResponse.FromString(reply).ordered_ids) != dag_tasks:
            raise RuntimeError("wrong number of ids")

    prefix = f"d{os.getpid()}-{time.monotonic_ns() % 10**9}-"
    r, sent = await _closed_loop_client(endpoints, "SubmitDag", dag_request_bytes(dag_tasks), prefix, check,
                                        concurrency, duration_s, warmup_s, count, name, op_timeout_s, max_seconds,
                                        data_dir)
    r.extra["dag_tasks"] = dag_tasks
    r.extra["tasks_per_s"] = round(r.ops_per_s * dag_tasks, 1)
    r.extra["dags_sent"] = sent
    return r


# --------------------------------------------------------------------------- the cluster


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples utime+stime of some PIDs every ``period_s`` on a thread (bounded by ``max_s``), so the
    CPU used inside a client's measurement window can be computed afterwards."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.1, max_s: float = 300.0) -> None:
        import threading

        self.pids = pids
        self.period_s = period_s
        self.max_s = max_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                self.samples.append((time.time(), {k: cpu_seconds(p) for k, p in self.pids.items()}))
            except OSError:
                pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def pct(self, t0: float, t1: float) -> dict[str, float]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (a, ca), (b, cb) = inside[0], inside[-1]
        return {k: round(100 * (cb[k] - ca[k]) / (b - a), 1) for k in ca if k in cb}


class OurCluster:
    """3 nodes in a temp dir, secure by default (``insecure_dev=True``: --insecure-dev);
    ``LocalCluster.down()`` (SIGTERM, then SIGKILL, by PID) and the temp dir removed on exit,
    whatever happened."""

    def __init__(self, extra_args: list[str] | None = None, base_dir: str | None = None, size: int = 3,
                 insecure_dev: bool = False) -> None:
        self.extra_args = extra_args or []
        self.base_dir = base_dir
        self.size = size
        self.insecure_dev = insecure_dev
        self.tmp: str | None = None
        self.lc = None

    def __enter__(self) -> OurCluster:
        from cluster.local import LocalCluster

        self.tmp = tempfile.mkdtemp(prefix="bench-coord-", dir=self.base_dir)
        try:
            self.lc = LocalCluster(self.tmp, env={"PYTHONPATH": str(REPO_ROOT)}, extra_args=list(self.extra_args),
                                   insecure_dev=self.insecure_dev)
            self.lc.up(self.size, wait_leader_s=60)
            self.wait_caught_up(30)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.lc is not None:
                self.lc.down()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    @property
    def endpoints(self) -> list[str]:
        return self.lc.endpoints

    @property
    def data_dir(self) -> str:
        """The cluster's directory: client subprocesses and ``coordctl --data-dir`` find its
        credentials there."""
        return self.lc.data_dir

    @property
    def admin(self):
        """Admin ``ClientCredentials`` (insecure ones for an --insecure-dev cluster)."""
        return self.lc.admin

    def credentials(self, **kwargs):
        return self.lc.credentials(**kwargs)

    def client(self, endpoints: list[str] | None = None, **kwargs):
        return self.lc.client(endpoints, **kwargs)

    def node(self, node_id: str):
        return self.lc.node(node_id)

    def leader(self, timeout_s: float = 30.0) -> str:
        return self.lc.wait_leader(timeout_s)

    def status(self, node_id: str, timeout_s: float = 1.0):
        return self.lc.statuses(timeout_s).get(node_id)

    def pids(self) -> dict[str, int]:
        return {n.id: n.pid for n in self.lc.nodes}

    def wait_caught_up(self, timeout_s: float = 30.0) -> tuple[str, int]:
        """Wait until every node has applied what the leader had applied when the wait began;
        return (leader, that index). Not ``LocalCluster.wait_converged`` (equal applied index and
        state hash on all nodes at one poll): on a secure cluster each node turns the access
        decisions of the last second — these status polls included — into an audit command, so
        the applied index keeps moving by ~3 a second and an equal snapshot is luck under load."""
        deadline = time.monotonic() + timeout_s
        leader = self.leader(timeout_s)
        st = self.status(leader, 2.0)
        while st is None and time.monotonic() < deadline:
            time.sleep(0.05)
            leader = self.leader(max(1.0, deadline - time.monotonic()))
            st = self.status(leader, 2.0)
        if st is None:
            raise TimeoutError(f"leader {leader} did not answer within {timeout_s} s")
        # The applied index, not commit_index: Raft's own entries (a new leader's no-op) advance the
        # commit index but never reach apply, so an idle cluster's applied index can stay below it.
        target = st.applied_index
        last: dict[str, int | None] = {}
        while time.monotonic() < deadline:
            statuses = self.lc.statuses(2.0)
            last = {k: (v.applied_index if v is not None else None) for k, v in statuses.items()}
            if all(v is not None and v >= target for v in last.values()):
                return leader, target
            time.sleep(0.05)
        raise TimeoutError(f"nodes did not catch up to index {target} within {timeout_s} s: {last}")


# --------------------------------------------------------------------------- profiling (optional)


class Profiler:
    """py-spy record of one PID for a bounded time, raw (collapsed stacks) output; no-op if py-spy
    is missing. Always stopped by PID."""

    def __init__(self, out_dir: str | None, extra_args: list[str] | None = None, rate_hz: int = 200) -> None:
        self.out_dir = out_dir
        self.extra_args = extra_args or []  # e.g. ["--nonblocking"]: sample without pausing the target
        self.rate_hz = rate_hz
        self.exe = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        self.proc: subprocess.Popen | None = None
        self.path: str | None = None

    def start(self, pid: int, label: str, seconds: float) -> None:
        if not self.out_dir or not self.exe:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, f"{label}.txt")
        self.proc = subprocess.Popen(
            [self.exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", str(self.rate_hz), "-f", "raw",
             "-t", *self.extra_args, "-o", self.path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> str | None:
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        return self.path


def summarize_profile(path: str, top: int = 10) -> str:
    """Per thread of a py-spy raw (collapsed) file: its share of the samples, then its top functions by
    self samples (file:line), as a share of that thread's samples."""
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            thread = frames[0].split(": ", 1)[-1].strip('"')
            leaf = frames[-1]
            if " (" in leaf:
                func, loc = leaf.split(" (", 1)
                leaf = f"{func} ({os.path.basename(loc.rstrip(')'))})"
            by_thread[thread][leaf] += int(n)
            totals[thread] += int(n)
    total = sum(totals.values())
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples"]
    for thread, n in totals.most_common(3):
        lines.append(f"  thread {thread}: {100 * n / total:.0f}% of samples; top self (share of this thread):")
        for fn, k in by_thread[thread].most_common(top):
            lines.append(f"    {100 * k / n:5.1f}%  {fn}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- (b) and DAG


def run_submit(cl: OurCluster, concurrency: int, duration_s: float, *, target: str = "spread",
               warmup_s: float = 1.0, profiler: Profiler | None = None) -> Result:
    """SubmitTask closed loop; ``target``: "spread" (all 3 nodes), "leader", "followers"."""
    leader = cl.leader()
    nodes = cl.lc.nodes
    if target == "leader":
        eps = [cl.node(leader).grpc_address]
    elif target == "followers":
        eps = [n.grpc_address for n in nodes if n.id != leader]
    else:
        eps = [n.grpc_address for n in nodes]
    where = {"spread": "round-robin over 3 nodes", "leader": "leader only", "followers": "followers only"}[target]
    pids = cl.pids()
    r_prof = None
    if profiler is not None:
        profiler.start(pids[leader], f"leader_submit_c{concurrency}", warmup_s + duration_s + 1)
    with CpuSampler(pids) as cpu:
        try:
            r = run_in_subprocess(
                "benchmarks.bench_cluster:submit_client",
                {"endpoints": eps, "concurrency": concurrency, "duration_s": duration_s, "warmup_s": warmup_s,
                 "name": f"ours: SubmitTask ({where})", "data_dir": cl.data_dir},
                timeout_s=warmup_s + duration_s + 60)
        finally:
            if profiler is not None:
                r_prof = profiler.stop()
    _add_cpu(r, cpu, leader)
    if r_prof:
        r.extra["profile"] = r_prof
    return r


def _add_cpu(r: Result, cpu: CpuSampler, leader: str) -> None:
    """Node CPU % (100 = one core) inside the client's measurement window."""
    w = r.extra.get("window_unix")
    pct = cpu.pct(*w) if w else {}
    if pct:
        r.extra["leader_cpu_pct"] = pct.get(leader)
        r.extra["followers_cpu_pct"] = [v for k, v in sorted(pct.items()) if k != leader]


def run_dag(cl: OurCluster, concurrency: int, duration_s: float | None, *, count: int | None = None,
            warmup_s: float = 1.0, dag_tasks: int = DAG_TASKS_DEFAULT, profiler: Profiler | None = None,
            max_seconds: float = 120.0) -> Result:
    leader = cl.leader()
    pids = cl.pids()
    if profiler is not None:
        profiler.start(pids[leader], "leader_dag", warmup_s + (duration_s or 5) + 1)
    r_prof = None
    with CpuSampler(pids) as cpu:
        try:
            r = run_in_subprocess(
                "benchmarks.bench_cluster:dag_client",
                {"endpoints": cl.endpoints, "concurrency": concurrency, "duration_s": duration_s, "warmup_s": warmup_s,
                 "count": count, "dag_tasks": dag_tasks, "max_seconds": max_seconds, "data_dir": cl.data_dir,
                 "name": f"ours: SubmitDag ({dag_tasks}-task DAGs, round-robin over 3 nodes)"},
                timeout_s=max_seconds + 60)
        finally:
            if profiler is not None:
                r_prof = profiler.stop()
    _add_cpu(r, cpu, leader)
    if r_prof:
        r.extra["profile"] = r_prof
    return r


# --------------------------------------------------------------------------- (c) failover


@dataclass
class FailoverResult(EtcdFailoverResult):
    """The etcd benchmark's failover result, plus how long the killed node took to serve again."""

    restart_serving_s: list[float] = field(default_factory=list)  # killed node: start -> ClusterStatus answers


async def _time_to_first_submit(cl: OurCluster, leader: str, survivors: list[str], probe_every_s: float,
                                probe_timeout_s: float, give_up_s: float) -> tuple[float, int]:
    from proto import coordinator_pb2 as pb

    base = submit_task_request_bytes()
    prefix = f"f{os.getpid()}-{time.monotonic_ns() % 10**9}-"
    creds = cl.admin
    channels = [creds.aio_channel(cl.node(s).grpc_address, GRPC_OPTIONS) for s in survivors]
    probes: list[asyncio.Task] = []
    try:
        calls = [ch.unary_unary(SERVICE + "SubmitTask", request_serializer=None, response_deserializer=None)
                 for ch in channels]
        for i, call in enumerate(calls):  # the survivors answer before the kill (channels connected)
            await asyncio.wait_for(channels[i].channel_ready(), 10)
            await call(base + _key_field(prefix + f"warm{i}"), timeout=5, metadata=creds.metadata())

        async def probe(n: int) -> float:
            reply = await calls[n % len(calls)](base + _key_field(prefix + str(n)), timeout=probe_timeout_s,
                                                metadata=creds.metadata())
            if not pb.SubmitTaskResponse.FromString(reply).task_id:
                raise RuntimeError("no task id")
            return time.perf_counter()

        t0 = time.perf_counter()
        cl.lc.signal_node(leader, signal.SIGKILL)
        for n in range(int(give_up_s / probe_every_s) + 1):
            ok = [t.result() for t in probes if t.done() and not t.cancelled() and t.exception() is None]
            if ok:
                return min(ok) - t0, len(probes)
            probes.append(asyncio.create_task(probe(n)))
            await asyncio.sleep(probe_every_s)
        raise TimeoutError(f"no submit succeeded within {give_up_s} s of killing the leader")
    finally:
        for t in probes:
            t.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for ch in channels:
            await ch.close()


def wait_serving(address: str, timeout_s: float, creds, poll_s: float = 0.01):
    """Poll ClusterStatus (with ``creds``: the cluster's ``ClientCredentials``) until it answers;
    returns (monotonic time of first answer, status)."""
    import grpc

    from proto import coordinator_pb2 as pb
    from proto import coordinator_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    with creds.channel(address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        while time.monotonic() < deadline:
            try:
                st = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=0.25, metadata=creds.metadata()).node
                return time.monotonic(), st
            except grpc.RpcError:
                time.sleep(poll_s)
    raise TimeoutError(f"{address} not serving within {timeout_s} s")


def run_failover(cl: OurCluster, runs: int = 5, *, probe_every_s: float = 0.01, settle_s: float = 1.0) -> FailoverResult:
    out, attempts, serving = [], [], []
    for _ in range(runs):
        cl.wait_caught_up(30)
        time.sleep(settle_s)
        leader = cl.leader()
        survivors = [n.id for n in cl.lc.nodes if n.id != leader]
        try:
            secs, n = asyncio.run(_time_to_first_submit(cl, leader, survivors, probe_every_s,
                                                         probe_timeout_s=3.0, give_up_s=30))
        finally:
            cl.lc.kill_node(leader)  # reap (it was SIGKILLed already, or is killed now)
        out.append(secs)
        attempts.append(n)
        t0 = time.monotonic()
        cl.lc.start_node(leader)
        t1, _ = wait_serving(cl.node(leader).grpc_address, 30, cl.admin)
        serving.append(t1 - t0)
        cl.lc.wait_leader(30)
        cl.wait_caught_up(30)
    return FailoverResult(out, attempts, serving)


# --------------------------------------------------------------------------- (d) restart + memory


@dataclass
class RestartResult:
    label: str
    tasks: int
    serving_s: float  # process start -> ClusterStatus answers
    caught_up_s: float  # process start -> applied index >= the leader's
    applied_target: int
    journal_entries: int  # log entries the restarted node reported once caught up
    snapshot_bytes: int
    rss_kib_after: int


def _quiet_leader_applied(cl: OurCluster) -> tuple[str, int]:
    """Wait until every node has applied what the leader had applied (no load running; a secure
    cluster still commits its audit trickle); return leader, that index."""
    return cl.wait_caught_up(60)


def measure_restart(cl: OurCluster, node_id: str, label: str, timeout_s: float = 60.0) -> RestartResult:
    leader, target = _quiet_leader_applied(cl)
    assert node_id != leader
    cl.lc.stop_node(node_id)  # SIGTERM; SIGKILL after 10 s
    address = cl.node(node_id).grpc_address
    t0 = time.monotonic()
    cl.lc.start_node(node_id)
    creds = cl.admin
    t_serving, st = wait_serving(address, timeout_s, creds)
    deadline = t0 + timeout_s
    import grpc

    from proto import coordinator_pb2 as pb
    from proto import coordinator_pb2_grpc as pb_grpc

    t_caught = None
    with creds.channel(address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        while time.monotonic() < deadline:
            if st is not None and st.applied_index >= target:
                t_caught = time.monotonic()
                break
            time.sleep(0.01)
            try:
                st = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=0.5, metadata=creds.metadata()).node
            except grpc.RpcError:
                st = None
    if t_caught is None:
        raise TimeoutError(f"{node_id} did not catch up to {target} within {timeout_s} s")
    snap = Path(cl.node(node_id).data_dir) / "snapshot.bin"
    return RestartResult(label, st.tasks, round(t_serving - t0, 3), round(t_caught - t0, 3), target,
                         st.log_entries, snap.stat().st_size if snap.exists() else 0, rss_kib(cl.node(node_id).pid))


@dataclass
class MemoryResult:
    tasks_before: int
    tasks_after: int
    rss_kib_before: dict[str, int]
    rss_kib_after: dict[str, int]
    leader: str
    load: Result | None = None

    def bytes_per_task(self, node_id: str) -> float:
        return 1024.0 * (self.rss_kib_after[node_id] - self.rss_kib_before[node_id]) / max(1, self.tasks_after - self.tasks_before)


def run_load_and_restart(tasks: int = 100_000, *, dag_tasks: int = DAG_TASKS_DEFAULT, concurrency: int = 4,
                         base_dir: str | None = None, snapshot_min_entries: int = 10) -> tuple[MemoryResult, list[RestartResult]]:
    restarts = []
    with OurCluster(base_dir=base_dir) as cl:
        leader, _ = _quiet_leader_applied(cl)
        pids = cl.pids()
        before = {k: rss_kib(p) for k, p in pids.items()}
        tasks0 = cl.status(leader).tasks
        load = run_dag(cl, concurrency, None, count=tasks // dag_tasks, warmup_s=0.0, dag_tasks=dag_tasks,
                       max_seconds=120)
        leader, _ = _quiet_leader_applied(cl)
        time.sleep(0.5)
        after = {k: rss_kib(p) for k, p in pids.items()}
        tasks1 = cl.status(leader).tasks
        mem = MemoryResult(tasks0, tasks1, before, after, leader, load)
        follower = next(n.id for n in cl.lc.nodes if n.id != leader)
        # (d-i) replay the whole log (no snapshot yet: the log has ~100 entries, under the default 5000)
        restarts.append(measure_restart(cl, follower, "log replay, no snapshot"))
        # (d-ii) make the follower write a snapshot: restart it with a low compaction threshold, wait for
        # snapshot.bin, then restart it again and measure.
        # Workaround for a bug (see RESULTS.md): the snapshot header carries the last two applied log
        # entries base64-encoded, so when they are 1000-task DAG entries (~80 KB each) the header
        # exceeds wal.snapshot's 64 KiB header_bytes_max and every snapshot attempt fails (retried every
        # tick). A few single-task entries on top make the last two entries small.
        from proto import coordinator_pb2 as pb

        with cl.client(cl.endpoints) as client:
            for i in range(3):
                client.submit_task(pb.TaskSpec(type="bench", name="tail"), idempotency_key=f"tail-{os.getpid()}-{i}")
        snap = Path(cl.node(follower).data_dir) / "snapshot.bin"
        cl.lc.extra_args = [*cl.extra_args, "--log-compaction-min-entries", str(snapshot_min_entries)]
        cl.lc.stop_node(follower)
        cl.lc.start_node(follower)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not snap.exists():
            time.sleep(0.05)
        if not snap.exists():
            raise TimeoutError("the follower wrote no snapshot within 60 s")
        time.sleep(1.0)  # let the compaction finish (journal prefix deleted)
        cl.lc.extra_args = list(cl.extra_args)  # the measured start runs with the defaults again
        restarts.append(measure_restart(cl, follower, "from snapshot"))
    return mem, restarts


# --------------------------------------------------------------------------- reporting


def failover_table(fo: FailoverResult, label: str = "ours") -> str:
    return (
        "| leader failover (SIGKILL -> first submit acked) | runs | min s | median s | max s |\n|---|---:|---:|---:|---:|\n"
        f"| {label} | {len(fo.runs_s)} | {fo.min_s:.3f} | {fo.median_s:.3f} | {fo.max_s:.3f} |\n"
    )


def restart_table(rs: list[RestartResult]) -> str:
    out = ("| restart of a follower (SIGTERM, start) | tasks | start -> serving s | start -> caught up s | "
           "snapshot MiB | RSS MiB after |\n|---|---:|---:|---:|---:|---:|\n")
    for r in rs:
        out += (f"| {r.label} | {r.tasks:,} | {r.serving_s:.2f} | {r.caught_up_s:.2f} | "
                f"{r.snapshot_bytes / 2**20:.1f} | {r.rss_kib_after / 1024:.0f} |\n")
    return out


def memory_table(m: MemoryResult) -> str:
    out = "| node | RSS MiB before | RSS MiB after | tasks added | bytes/task |\n|---|---:|---:|---:|---:|\n"
    for k in sorted(m.rss_kib_before):
        role = " (leader)" if k == m.leader else ""
        out += (f"| {k}{role} | {m.rss_kib_before[k] / 1024:.0f} | {m.rss_kib_after[k] / 1024:.0f} | "
                f"{m.tasks_after - m.tasks_before:,} | {m.bytes_per_task(k):,.0f} |\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=("submit", "dag", "failover", "restart"),
                    default=["submit", "dag", "failover", "restart"])
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--failovers", type=int, default=5)
    ap.add_argument("--dag-clients", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=100_000, help="tasks loaded for restart/memory")
    ap.add_argument("--profile", default=None, help="directory for py-spy profiles of the leader")
    ap.add_argument("--base-dir", default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prof = Profiler(args.profile) if args.profile else None
    rows: list[Result] = []
    fo = None
    if {"submit", "dag", "failover"} & set(args.only):
        with OurCluster(base_dir=args.base_dir) as cl:
            if "submit" in args.only:
                rows.append(run_submit(cl, 1, args.duration, target="spread"))
                rows.append(run_submit(cl, 1, args.duration, target="leader"))
                rows.append(run_submit(cl, 1, args.duration, target="followers"))
                rows.append(run_submit(cl, 64, args.duration, target="spread", profiler=prof))
            if "dag" in args.only:
                rows.append(run_dag(cl, args.dag_clients, args.duration, profiler=prof))
            if "failover" in args.only and args.failovers > 0:
                fo = run_failover(cl, args.failovers)
    if rows:
        print(markdown_table(rows))
        for r in rows:
            print(f"- {r.name} c={r.concurrency}: {r.extra}")
    if fo is not None:
        print()
        print(failover_table(fo))
        print(f"runs: {[round(x, 3) for x in fo.runs_s]}; probes per run: {fo.attempts}; "
              f"killed node start -> serving: {[round(x, 2) for x in fo.restart_serving_s]} s")
    if "restart" in args.only:
        mem, rs = run_load_and_restart(args.tasks, base_dir=args.base_dir)
        print()
        print(f"load: {mem.load.ops} DAGs in {mem.load.seconds:.1f} s = {mem.load.extra.get('tasks_per_s'):,.0f} tasks/s")
        print(memory_table(mem))
        print(restart_table(rs))
    if prof is not None:
        for r in rows:
            if r.extra.get("profile"):
                print(summarize_profile(r.extra["profile"]))
    print(machine_note())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
