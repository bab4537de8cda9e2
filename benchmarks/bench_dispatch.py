"""Dispatch: ours (3 replicated nodes + 4 executor agents) against Celery + Redis, side by side.

Ours: 3 ``coordctl node run`` processes (``cluster.local.LocalCluster`` in a temp dir, as in
``bench_cluster``) and 4 executor agents ``python -m cluster.cli executor run --type algorithmic
--capacity 8 --prefetch 32 --log-level WARNING`` (prefetch defaults to 4 x capacity, as Celery's
prefetch multiplier of 4), agent k connecting first to node k mod 3 (so the executors are spread over
leader and followers, as they would be in a deployment). Security is on (the default: mTLS, a
JWT on every call, RBAC, audit): the agents get ``--data-dir`` (the cluster's certificates and key
ring) and the clients the cluster's admin credentials.

(i)  dispatch latency, idle executors: one ``echo`` task at a time (``SubmitTask``, round-robin over
     the 3 nodes), then ``WaitTasks`` on the same node. The client keeps a ``Watch`` stream on the leader
     (kinds TaskAssigned/TaskStarted/TaskCompleted). submit -> start = the TaskStarted event's
     ``time_unix_ms`` (the node's clock when the executor's ``started`` report reached it — for an echo,
     which ends before its ``started`` goes out, the completion that stands for it; same machine
     clock as the client; 1 ms resolution, truncated) minus the client's ``time.time()`` just before
     the SubmitTask call. Also: submit -> TaskAssigned stamp (the scheduler's round), submit acked,
     submit -> WaitTasks returned (completion as a client sees it), submit -> TaskStarted received
     on the Watch stream. ~200 samples after 10 warm-up ones, a short gap between samples.
(ii) throughput of no-op ``echo`` tasks: N tasks (default 5,000) submitted as fast as the client can,
     either as ``SubmitDag`` requests of 500 tasks without dependencies (2 submitters) or as single
     ``SubmitTask`` calls (64 in flight); throughput = N / (first submit -> last TaskCompleted seen on
     the Watch stream). Checked afterwards with ``ListTasks`` (completed count) and the agents' own
     counters (printed as JSON on SIGTERM).

Peer: Celery 5 + Redis 7 (no replication, no persistence: ``redis-server --save '' --appendonly no``),
2 workers ``celery worker --pool prefork --concurrency 1 --without-gossip --without-mingle
--without-heartbeat -l WARNING`` (defaults otherwise: prefetch multiplier 4, result backend redis),
a task ``echo(x)`` returning ``{"x": x, "started": time.time()}``; run once with ``task_acks_late``
off (Celery's default) and once on (at-least-once, like our leases).
(i)  latency: ``apply_async`` -> the task's own start timestamp; -> ``AsyncResult.get()`` returned.
(ii) throughput: N ``apply_async`` from one process, until every result is in the backend (the
     client PSUBSCRIBEs to ``celery-task-meta-*``: the backend PUBLISHes each result as it stores it;
     checked with MGET afterwards).

    python -m benchmarks.bench_dispatch                        # everything (~2 min)
    python -m benchmarks.bench_dispatch --only ours            # or: --only celery
    python -m benchmarks.bench_dispatch --profile /tmp/prof    # + py-spy of the leader and one executor
                                                               #   under a longer DAG throughput load

Clients run in their own processes (``loadgen.run_in_subprocess``). Every server and worker is a
child process on 127.0.0.1 free ports, killed by PID (process group for Celery's prefork pool) in
``finally``; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.loadgen import (
    REPO_ROOT,
    Result,
    _child_env,
    die_with_parent,
    free_ports,
    machine_note,
    percentile,
    run_in_subprocess,
)

TARGET_TPUT_VS_CELERY = 3.0
TARGET_DISPATCH_P50_MS = 10.0

REDIS_URL_ENV = "BENCH_DISPATCH_REDIS_URL"
ACKS_LATE_ENV = "BENCH_DISPATCH_ACKS_LATE"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 32 << 20), ("grpc.max_send_message_length", 32 << 20)]


def _stats(values_ms: list[float]) -> dict[str, float]:
    v = sorted(values_ms)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50": round(percentile(v, 50), 3), "p99": round(percentile(v, 99), 3),
            "mean": round(sum(v) / len(v), 3), "max": round(v[-1], 3)}


def _kill_pid(proc: subprocess.Popen, *, group: bool = False, term_wait_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after term_wait_s; by PID (or by the process group it leads)."""
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(term_wait_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also the prefork children, if any are left
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


# ============================================================================ ours: clients


async def _open_watch(stub, pb, kinds: list[str], sink, stop: asyncio.Event, metadata=None):
    """A Watch stream reader task: sink(event, recv_unix_s) for every event; ends with the stream."""
    call = stub.Watch(pb.WatchRequest(kinds=kinds), metadata=metadata)

    async def reader() -> None:
        try:
            async for ev in call:
                sink(ev, time.time())
                if stop.is_set():
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            pass

    return call, asyncio.create_task(reader())


async def our_latency_client(endpoints: list[str], watch_endpoint: str, leader_endpoint: str, samples: int = 200,
                             warmup: int = 10, gap_s: float = 0.02, max_seconds: float = 60.0, *,
                             data_dir: str) -> Result:
    """Sequential single-task dispatch latency (see the module docstring, (i)); ``data_dir``: the
    local cluster's directory, whose admin credentials every call carries."""
    from benchmarks.bench_cluster import client_credentials
    from proto import coordinator_pb2 as pb
    from proto import coordinator_pb2_grpc as pb_grpc

    creds = client_credentials(data_dir)
    channels = {e: creds.aio_channel(e, GRPC_OPTIONS) for e in {*endpoints, watch_endpoint}}
    stop = asyncio.Event()
    seen: dict[tuple[str, str], tuple[int, float]] = {}
    changed = asyncio.Event()

    def sink(ev, recv_s: float) -> None:
        seen[(ev.task_id, ev.kind)] = (ev.time_unix_ms, recv_s)
        changed.set()

    watch_call = watch_task = None
    try:
        for ch in channels.values():
            await asyncio.wait_for(ch.channel_ready(), 10)
        stubs = {e: pb_grpc.CoordinatorStub(ch) for e, ch in channels.items()}
        watch_call, watch_task = await _open_watch(stubs[watch_endpoint], pb, ["TaskAssigned", "TaskStarted",
                                                                               "TaskCompleted"], sink, stop,
                                                   creds.metadata())
        prefix = f"lat{os.getpid()}-{time.monotonic_ns() % 10**9}-"
        rows: list[dict[str, Any]] = []
        errors = 0
        hard_deadline = time.monotonic() + max_seconds
        for i in range(warmup + samples):
            if time.monotonic() > hard_deadline:
                break
            ep = endpoints[i % len(endpoints)]
            stub = stubs[ep]
            spec = pb.TaskSpec(type="echo", name="e", input_json=json.dumps({"i": i}))
            try:
                t0 = time.time()
                resp = await stub.SubmitTask(pb.SubmitTaskRequest(task=spec, idempotency_key=prefix + str(i)),
                                             timeout=10, metadata=creds.metadata())
                t_ack = time.time()
                w = await stub.WaitTasks(pb.WaitTasksRequest(task_ids=[resp.task_id], timeout_s=10), timeout=15,
                                         metadata=creds.metadata())
                t_done = time.time()
                if not w.all_final or w.tasks[0].status != "completed":
                    raise RuntimeError(f"task {resp.task_id}: {w.tasks[0].status}")
                # The leader's Watch stream may deliver TaskStarted a little after a follower answered.
                end = time.monotonic() + 5
                while (resp.task_id, "TaskStarted") not in seen and time.monotonic() < end:
                    changed.clear()
                    try:
                        await asyncio.wait_for(changed.wait(), 0.5)
                    except asyncio.TimeoutError:
                        pass
                started = seen.get((resp.task_id, "TaskStarted"))
                assigned = seen.get((resp.task_id, "TaskAssigned"))
                if started is None or assigned is None:
                    raise RuntimeError(f"task {resp.task_id}: no TaskStarted/TaskAssigned on the Watch stream")
            except Exception:
                if i >= warmup:
                    errors += 1
                await asyncio.sleep(0.05)
                continue
            if i >= warmup:
                rows.append({
                    "to_leader": ep == leader_endpoint,
                    "ack_ms": (t_ack - t0) * 1000,
                    "assigned_ms": assigned[0] - t0 * 1000,
                    "started_ms": started[0] - t0 * 1000,
                    "started_seen_ms": (started[1] - t0) * 1000,
                    "done_ms": (t_done - t0) * 1000,
                })
            await asyncio.sleep(gap_s)
        started_ms = sorted(r["started_ms"] for r in rows)
        extra = {k: _stats([r[k] for r in rows]) for k in ("ack_ms", "assigned_ms", "started_ms",
                                                            "started_seen_ms", "done_ms")}
        extra["started_ms_leader"] = _stats([r["started_ms"] for r in rows if r["to_leader"]])
        extra["started_ms_followers"] = _stats([r["started_ms"] for r in rows if not r["to_leader"]])
        extra["done_ms_leader"] = _stats([r["done_ms"] for r in rows if r["to_leader"]])
        extra["done_ms_followers"] = _stats([r["done_ms"] for r in rows if not r["to_leader"]])
        return Result(name="ours: dispatch latency (SubmitTask round-robin, idle executors)", concurrency=1,
                      ops=len(rows), seconds=0.0, ops_per_s=0.0, p50_ms=round(percentile(started_ms, 50), 3),
                      p99_ms=round(percentile(started_ms, 99), 3), errors=errors,
                      mean_ms=round(sum(started_ms) / max(1, len(started_ms)), 3),
                      max_ms=round(started_ms[-1], 3) if started_ms else float("nan"), extra=extra)
    finally:
        stop.set()
        if watch_call is not None:
            watch_call.cancel()
        if watch_task is not None:
            watch_task.cancel()
            await asyncio.gather(watch_task, return_exceptions=True)
        for ch in channels.values():
            await ch.close()


async def our_throughput_client(endpoints: list[str], watch_endpoint: str, n: int = 5000, mode: str = "dag",
                                batch: int = 500, submitters: int = 2, in_flight: int = 64,
                                max_seconds: float = 90.0, *, data_dir: str) -> Result:
    """N echo tasks, as DAGs of `batch` without dependencies (mode "dag") or single SubmitTask calls
    (mode "submit", `in_flight` at a time); until the last TaskCompleted arrives on the Watch stream.
    ``data_dir``: the local cluster's directory, whose admin credentials every call carries."""
    import grpc

    from benchmarks.bench_cluster import client_credentials
    from proto import coordinator_pb2 as pb
    from proto import coordinator_pb2_grpc as pb_grpc

    creds = client_credentials(data_dir)
    channels = {e: creds.aio_channel(e, GRPC_OPTIONS) for e in {*endpoints, watch_endpoint}}
    stop = asyncio.Event()
    completed: dict[str, float] = {}
    all_done = asyncio.Event()
    ours: set[str] = set()
    early: set[str] = set()  # completed before its submit was acked (possible with SubmitTask)
    stamps: dict[str, dict[str, int]] = {}  # task -> kind -> time_unix_ms (the phases under load)

    def sink(ev, recv_s: float) -> None:
        tid = ev.task_id
        stamps.setdefault(tid, {})[ev.kind] = ev.time_unix_ms
        if ev.kind == "TaskAssigned":
            stamps[tid]["executor"] = ev.executor_id
        if ev.kind != "TaskCompleted":
            return
        if tid in ours:
            if tid not in completed:
                completed[tid] = recv_s
                if len(completed) >= n:
                    all_done.set()
        else:
            early.add(tid)
            completed.setdefault(tid, recv_s)  # filtered against `ours` at the end

    watch_call = watch_task = None
    try:
        for ch in channels.values():
            await asyncio.wait_for(ch.channel_ready(), 10)
        stubs = [pb_grpc.CoordinatorStub(channels[e]) for e in endpoints]
        wstub = pb_grpc.CoordinatorStub(channels[watch_endpoint])
        watch_call, watch_task = await _open_watch(wstub, pb, ["TaskAssigned", "TaskStarted", "TaskCompleted"],
                                                   sink, stop, creds.metadata())
        prefix = f"tp{os.getpid()}-{time.monotonic_ns() % 10**9}-"
        # The Watch stream is live once a probe task's completion comes through it.
        probe = await stubs[0].SubmitTask(pb.SubmitTaskRequest(task=pb.TaskSpec(type="echo", input_json="1"),
                                                               idempotency_key=prefix + "probe"), timeout=10,
                                          metadata=creds.metadata())
        end = time.monotonic() + 15
        while probe.task_id not in completed and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if probe.task_id not in completed:
            raise RuntimeError("the Watch stream delivered no TaskCompleted for the probe task within 15 s")
        completed.clear()
        early.clear()
        stamps.clear()
        cpu0 = time.process_time()
        hard_deadline = time.monotonic() + max_seconds
        errors = 0
        # Requests built before the clock starts.
        if mode == "dag":
            reqs = []
            for b in range(0, n, batch):
                specs = [pb.TaskSpec(type="echo", name=f"t{k}", input_json=f'{{"i":{k}}}')
                         for k in range(b, min(n, b + batch))]
                reqs.append(pb.SubmitDagRequest(tasks=specs, idempotency_key=f"{prefix}dag{b}"))
        else:
            reqs = [pb.SubmitTaskRequest(task=pb.TaskSpec(type="echo", name="t", input_json=f'{{"i":{k}}}'),
                                         idempotency_key=f"{prefix}{k}") for k in range(n)]
        next_req = [0]
        workers = submitters if mode == "dag" else in_flight

        async def submitter() -> None:
            nonlocal errors
            while next_req[0] < len(reqs) and time.monotonic() < hard_deadline:
                k = next_req[0]
                next_req[0] += 1
                stub = stubs[k % len(stubs)]
                for _attempt in range(5):  # idempotent: a retry never duplicates
                    try:
                        if mode == "dag":
                            resp = await stub.SubmitDag(reqs[k], timeout=30, metadata=creds.metadata())
                            ours.update(resp.ordered_ids)
                        else:
                            resp = await stub.SubmitTask(reqs[k], timeout=30, metadata=creds.metadata())
                            ours.add(resp.task_id)
                        break
                    except grpc.aio.AioRpcError:
                        errors += 1
                        await asyncio.sleep(0.05)

        t0 = time.time()
        await asyncio.wait_for(asyncio.gather(*(submitter() for _ in range(workers))), max_seconds)
        t_submitted = time.time()
        # Completions that arrived before their submit was acked.
        for tid in list(early):
            if tid not in ours:
                completed.pop(tid, None)
        early.clear()
        if len([t for t in completed if t in ours]) >= n:
            all_done.set()
        try:
            await asyncio.wait_for(all_done.wait(), max(1.0, hard_deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        done = [completed[t] for t in ours if t in completed]
        t_end = max(done) if done else time.time()
        seconds = max(1e-9, t_end - t0)
        phases = _phases(stamps, ours, t0)
        phases["client_cpu_pct"] = round(100 * (time.process_time() - cpu0) / seconds, 1)
        label = (f"ours: {n} echo tasks, SubmitDag x{batch} (no deps), {submitters} submitters" if mode == "dag"
                 else f"ours: {n} echo tasks, SubmitTask, {in_flight} in flight")
        return Result(name=label, concurrency=workers, ops=len(done), seconds=round(seconds, 3),
                      ops_per_s=round(len(done) / seconds, 1), p50_ms=float("nan"), p99_ms=float("nan"),
                      errors=errors + (n - len(done)),
                      extra={"submitted": len(ours), "submit_s": round(t_submitted - t0, 3),
                             "submit_per_s": round(len(ours) / max(1e-9, t_submitted - t0), 1),
                             "window_unix": [t0, t_end], "mode": mode, "phases": phases})
    finally:
        stop.set()
        if watch_call is not None:
            watch_call.cancel()
        if watch_task is not None:
            watch_task.cancel()
            await asyncio.gather(watch_task, return_exceptions=True)
        for ch in channels.values():
            await ch.close()


def _phases(stamps: dict[str, dict[str, Any]], ours: set[str], t0: float) -> dict[str, Any]:
    """Where a task's time goes under load, from the event stamps (ms): submit (client t0) -> assigned
    (the scheduler's round), assigned -> started (the started report reached a node), started ->
    completed; the mean number of tasks assigned and not yet completed (Little: = tasks/s x the
    assigned -> completed time); tasks per executor."""
    rows = [s for t, s in stamps.items() if t in ours and {"TaskAssigned", "TaskStarted", "TaskCompleted"} <= s.keys()]
    if not rows:
        return {}
    a2s = [s["TaskStarted"] - s["TaskAssigned"] for s in rows]
    s2c = [s["TaskCompleted"] - s["TaskStarted"] for s in rows]
    a2c = [s["TaskCompleted"] - s["TaskAssigned"] for s in rows]
    first_a = min(s["TaskAssigned"] for s in rows)
    last_c = max(s["TaskCompleted"] for s in rows)
    per_exec: dict[str, int] = {}
    for s in rows:
        per_exec[s.get("executor", "?")] = per_exec.get(s.get("executor", "?"), 0) + 1
    return {"tasks": len(rows), "submit_to_first_assigned_ms": round(first_a - t0 * 1000, 1),
            "assigned_to_started_ms": _stats(a2s), "started_to_completed_ms": _stats(s2c),
            "assigned_to_completed_ms": _stats(a2c),
            "mean_in_flight": round(sum(a2c) / max(1, last_c - first_a), 1), "per_executor": per_exec}


# ============================================================================ ours: cluster + agents


class OurDispatchCluster:
    """3 nodes (``bench_cluster.OurCluster``) and ``agents`` executor agent processes."""

    def __init__(self, agents: int = 4, capacity: int = 8, base_dir: str | None = None, prefetch: int = 0) -> None:
        self.n_agents = agents
        self.capacity = capacity
        self.prefetch = prefetch
        self.base_dir = base_dir
        self.cl = None
        self.agents: list[subprocess.Popen] = []
        self.agent_logs: list[str] = []
        self.agent_summaries: list[dict[str, Any]] = []

    def __enter__(self) -> OurDispatchCluster:
        from benchmarks.bench_cluster import OurCluster

        self.cl = OurCluster(base_dir=self.base_dir)
        self.cl.__enter__()
        try:
            eps = self.cl.endpoints
            for k in range(self.n_agents):
                rotated = eps[k % len(eps):] + eps[: k % len(eps)]
                log_path = os.path.join(self.cl.tmp, f"agent{k}.log")
                self.agent_logs.append(log_path)
                with open(log_path, "ab") as log_file:
                    self.agents.append(subprocess.Popen(
                        [sys.executable, "-m", "cluster.cli", "executor", "run", "--type", "algorithmic",
                         "--name", f"bench-e{k}", "--capacity", str(self.capacity),
                         "--prefetch", str(self.prefetch), "--endpoints", ",".join(rotated),
                         "--data-dir", self.cl.data_dir,  # its certificate and key ring: the agent's credentials
                         "--log-level", "WARNING", "--output", "json"],
                        cwd=REPO_ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=log_file, preexec_fn=die_with_parent))
            self._wait_executors(30)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_executors(self, timeout_s: float) -> None:

        deadline = time.monotonic() + timeout_s
        with self.cl.client(self.cl.endpoints) as client:
            while time.monotonic() < deadline:
                online = [e for e in client.call("ListExecutors", _pb().ListExecutorsRequest()).executors
                          if e.status == "online" and e.name.startswith("bench-e")]
                if len(online) >= self.n_agents:
                    return
                for p in self.agents:
                    if p.poll() is not None:
                        raise RuntimeError(f"an executor agent exited with {p.returncode}; see {self.agent_logs}")
                time.sleep(0.1)
        raise TimeoutError(f"{self.n_agents} executors not online within {timeout_s} s")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            for p in self.agents:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in self.agents:
                try:
                    out, _ = p.communicate(timeout=15)
                    try:
                        self.agent_summaries.append(json.loads(out))
                    except ValueError:
                        pass
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate(timeout=5)
        finally:
            self.agents = []
            if self.cl is not None:
                self.cl.close()

    def agent_pids(self) -> list[int]:
        return [p.pid for p in self.agents]

    def completed_count(self) -> int:

        pb = _pb()
        with self.cl.client(self.cl.endpoints) as client:
            leader = self.cl.leader()
            client._preferred = self.cl.endpoints.index(self.cl.node(leader).grpc_address)
            return client.list_tasks(status=["completed"], type="echo", limit=1,
                                     consistency=pb.CONSISTENCY_LINEARIZABLE).total_matching


def _pb():
    from proto import coordinator_pb2 as pb

    return pb


def run_ours(args, prof_dir: str | None) -> dict[str, Any]:
    from benchmarks.bench_cluster import CpuSampler, Profiler

    out: dict[str, Any] = {}
    with OurDispatchCluster(agents=args.agents, capacity=args.capacity, prefetch=args.prefetch) as oc:
        cl = oc.cl
        leader = cl.leader()
        leader_ep = cl.node(leader).grpc_address
        pids = {**cl.pids(), **{f"agent{k}": pid for k, pid in enumerate(oc.agent_pids())}}
        out["latency"] = run_in_subprocess("benchmarks.bench_dispatch:our_latency_client",
                                           {"endpoints": cl.endpoints, "watch_endpoint": leader_ep,
                                            "leader_endpoint": leader_ep, "samples": args.samples,
                                            "data_dir": cl.data_dir},
                                           timeout_s=120)
        before = oc.completed_count()
        rows = []
        for mode in args.modes:
            with CpuSampler(pids) as cpu:
                r = run_in_subprocess("benchmarks.bench_dispatch:our_throughput_client",
                                      {"endpoints": cl.endpoints, "watch_endpoint": leader_ep, "n": args.tasks,
                                       "mode": mode, "batch": args.batch, "data_dir": cl.data_dir}, timeout_s=150)
            _cpu_extra(r, cpu, leader, [n.id for n in cl.lc.nodes])
            rows.append(r)
        out["throughput"] = rows
        out["completed_delta"] = oc.completed_count() - before
        out["expected_delta"] = sum(r.extra.get("submitted", 0) for r in rows) + len(rows)  # + probes
        if prof_dir:
            # A longer load, so py-spy sees the steady state of the leader and one executor.
            p_leader, p_exec = Profiler(prof_dir), Profiler(prof_dir)
            n_prof = args.tasks * 3
            # The executor connected first to the leader's node, if any; else agent 0.
            idx = cl.endpoints.index(leader_ep) % max(1, len(oc.agents))
            p_leader.start(cl.pids()[leader], "dispatch_leader", args.profile_seconds)
            p_exec.start(oc.agent_pids()[idx], "dispatch_executor", args.profile_seconds)
            try:
                r = run_in_subprocess("benchmarks.bench_dispatch:our_throughput_client",
                                      {"endpoints": cl.endpoints, "watch_endpoint": leader_ep, "n": n_prof,
                                       "mode": "dag", "batch": args.batch, "data_dir": cl.data_dir},
                                      timeout_s=150)
            finally:
                out["profiles"] = [p_leader.stop(), p_exec.stop()]
            out["profile_load"] = r
        out["leader"] = leader
        out["agent_nodes"] = {f"bench-e{k}": cl.lc.nodes[k % len(cl.lc.nodes)].id + (
            " (leader)" if cl.lc.nodes[k % len(cl.lc.nodes)].id == leader else "") for k in range(len(oc.agents))}
    out["agent_summaries"] = oc.agent_summaries
    return out


def _cpu_extra(r: Result, cpu, leader: str, node_ids: list[str]) -> None:
    w = r.extra.get("window_unix")
    pct = cpu.pct(*w) if w else {}
    if pct:
        r.extra["cpu_leader_pct"] = pct.get(leader)
        r.extra["cpu_followers_pct"] = [pct[k] for k in sorted(pct) if k in node_ids and k != leader]
        r.extra["cpu_agents_pct"] = [pct[k] for k in sorted(pct) if k.startswith("agent")]


# ============================================================================ Celery + Redis


def _make_celery_app():
    from celery import Celery

    url = os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0")
    app = Celery("bench_dispatch", broker=url, backend=url)
    app.conf.update(
        task_acks_late=os.environ.get(ACKS_LATE_ENV, "0") == "1",
        task_serializer="json", result_serializer="json", accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.echo")
    def echo(x):
        return {"x": x, "started": time.time()}

    return app


_celery_app = None


def __getattr__(name: str):
    # `celery -A benchmarks.bench_dispatch:celery_app worker`: built on first use only, so the rest of
    # this module (ours) needs no Celery installed.
    global _celery_app
    if name == "celery_app":
        if _celery_app is None:
            _celery_app = _make_celery_app()
        return _celery_app
    raise AttributeError(name)


def celery_latency_client(samples: int = 200, warmup: int = 10, gap_s: float = 0.02,
                          max_seconds: float = 60.0) -> Result:
    app = _make_celery_app()
    echo = app.tasks["bench.echo"]
    rows = []
    errors = 0
    hard_deadline = time.monotonic() + max_seconds
    for i in range(warmup + samples):
        if time.monotonic() > hard_deadline:
            break
        try:
            t0 = time.time()
            res = echo.apply_async(args=[i])
            t_sent = time.time()
            v = res.get(timeout=10)
            t_done = time.time()
        except Exception:
            if i >= warmup:
                errors += 1
            time.sleep(0.05)
            continue
        if i >= warmup:
            rows.append({"ack_ms": (t_sent - t0) * 1000, "started_ms": (v["started"] - t0) * 1000,
                         "done_ms": (t_done - t0) * 1000})
        time.sleep(gap_s)
    started = sorted(r["started_ms"] for r in rows)
    extra = {k: _stats([r[k] for r in rows]) for k in ("ack_ms", "started_ms", "done_ms")}
    extra["acks_late"] = app.conf.task_acks_late
    return Result(name="celery: dispatch latency (apply_async -> task start)", concurrency=1, ops=len(rows),
                  seconds=0.0, ops_per_s=0.0, p50_ms=round(percentile(started, 50), 3),
                  p99_ms=round(percentile(started, 99), 3), errors=errors,
                  mean_ms=round(sum(started) / max(1, len(started)), 3),
                  max_ms=round(started[-1], 3) if started else float("nan"), extra=extra)


def celery_throughput_client(n: int = 5000, max_seconds: float = 90.0, subscribe_each: bool = False) -> Result:
    import redis

    app = _make_celery_app()
    echo = app.tasks["bench.echo"]
    url = os.environ[REDIS_URL_ENV]
    r = redis.Redis.from_url(url)
    ps = r.pubsub(ignore_subscribe_messages=False)
    ps.psubscribe("celery-task-meta-*")
    end = time.monotonic() + 10
    while time.monotonic() < end:  # wait for the psubscribe confirmation
        m = ps.get_message(timeout=0.5)
        if m and m["type"] == "psubscribe":
            break
    # warm-up: one round trip through a worker
    echo.apply_async(args=[-1]).get(timeout=15)
    if not subscribe_each:
        # This client learns of results through its PSUBSCRIBE, so the per-task SUBSCRIBE that the redis
        # backend's result consumer does in apply_async (for AsyncResult.get) is skipped: the producer
        # then outruns the workers and the number is the workers', not the client's.
        app.backend.on_task_call = lambda *a, **k: None
    hard_deadline = time.monotonic() + max_seconds
    prefix = b"celery-task-meta-"
    done: dict[str, float] = {}
    ids: set[str] = set()
    t0 = time.time()
    for i in range(n):
        if time.monotonic() > hard_deadline:
            break
        ids.add(echo.apply_async(args=[i]).id)
    t_submitted = time.time()
    while len(done) < len(ids) and time.monotonic() < hard_deadline:
        m = ps.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if not m or m["type"] != "pmessage":
            continue
        ch = m["channel"]
        if ch.startswith(prefix):
            tid = ch[len(prefix):].decode()
            if tid in ids and tid not in done:
                done[tid] = time.time()
    t_end = max(done.values()) if done else time.time()
    # Check: every result stored, all SUCCESS.
    id_list = list(ids)
    ok = 0
    for k in range(0, len(id_list), 1000):
        for raw in r.mget([prefix + t.encode() for t in id_list[k:k + 1000]]):
            if raw and json.loads(raw).get("status") == "SUCCESS":
                ok += 1
    ps.close()
    seconds = max(1e-9, t_end - t0)
    return Result(name=f"celery: {n} echo tasks, apply_async from one process", concurrency=1, ops=len(done),
                  seconds=round(seconds, 3), ops_per_s=round(len(done) / seconds, 1), p50_ms=float("nan"),
                  p99_ms=float("nan"), errors=n - ok,
                  extra={"submitted": len(ids), "submit_s": round(t_submitted - t0, 3),
                         "submit_per_s": round(len(ids) / max(1e-9, t_submitted - t0), 1),
                         "results_success": ok, "window_unix": [t0, t_end], "acks_late": app.conf.task_acks_late})


class CeleryPeer:
    """redis-server and `workers` Celery workers (prefork, concurrency 1 each), all on 127.0.0.1."""

    def __init__(self, workers: int = 2, concurrency: int = 1, acks_late: bool = False) -> None:
        self.workers_n = workers
        self.concurrency = concurrency
        self.acks_late = acks_late
        self.redis: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.tmp: str | None = None
        self.url = ""

    def env(self) -> dict[str, str]:
        return {**_child_env(), REDIS_URL_ENV: self.url, ACKS_LATE_ENV: "1" if self.acks_late else "0"}

    def __enter__(self) -> CeleryPeer:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found (Debian: apt-get install -y redis-server)")
        self.tmp = tempfile.mkdtemp(prefix="bench-celery-")
        try:
            (port,) = free_ports(1)
            self.url = f"redis://127.0.0.1:{port}/0"
            self.redis = subprocess.Popen(
                [exe, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
                 "--dir", self.tmp, "--daemonize", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
            self._wait_redis(10)
            for k in range(self.workers_n):
                log = open(os.path.join(self.tmp, f"worker{k}.log"), "ab")  # noqa: SIM115
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "benchmarks.bench_dispatch:celery_app", "worker",
                     "--pool", "prefork", "--concurrency", str(self.concurrency), "-n", f"w{k}@bench",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                    cwd=REPO_ROOT, env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))  # own process group: the prefork children die with it
                log.close()
            self._wait_workers(60)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_redis(self, timeout_s: float) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on {self.url} not answering within {timeout_s} s")

    def _wait_workers(self, timeout_s: float) -> None:
        os.environ[REDIS_URL_ENV] = self.url
        app = _make_celery_app()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                replies = app.control.ping(timeout=0.5)
                if len(replies) >= self.workers_n:
                    return
                for p in self.workers:
                    if p.poll() is not None:
                        raise RuntimeError(f"a Celery worker exited with {p.returncode}; see {self.tmp}")
            raise TimeoutError(f"{self.workers_n} Celery workers not ready within {timeout_s} s")
        finally:
            app.close()

    def pids(self) -> dict[str, int]:
        out = {"redis": self.redis.pid} if self.redis else {}
        for k, p in enumerate(self.workers):
            out[f"worker{k}"] = p.pid
            for child in _children(p.pid):
                out[f"worker{k}-child{child}"] = child
        return out

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            for p in self.workers:
                _kill_pid(p, group=True)
            if self.redis is not None:
                _kill_pid(self.redis)
        finally:
            self.workers = []
            self.redis = None
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def run_celery(args, acks_late: bool) -> dict[str, Any]:
    from benchmarks.bench_cluster import CpuSampler

    out: dict[str, Any] = {}
    with CeleryPeer(workers=args.celery_workers, concurrency=args.celery_concurrency, acks_late=acks_late) as peer:
        env_backup = os.environ.get(REDIS_URL_ENV)
        os.environ[REDIS_URL_ENV] = peer.url
        os.environ[ACKS_LATE_ENV] = "1" if acks_late else "0"
        try:
            out["latency"] = run_in_subprocess("benchmarks.bench_dispatch:celery_latency_client",
                                               {"samples": args.samples}, timeout_s=120)
            pids = peer.pids()
            with CpuSampler(pids) as cpu:
                r = run_in_subprocess("benchmarks.bench_dispatch:celery_throughput_client", {"n": args.tasks},
                                      timeout_s=150)
            w = r.extra.get("window_unix")
            pct = cpu.pct(*w) if w else {}
            if pct:
                r.extra["cpu_redis_pct"] = pct.get("redis")
                r.extra["cpu_workers_pct"] = round(sum(v for k, v in pct.items() if k.startswith("worker")), 1)
            out["throughput"] = r
        finally:
            if env_backup is None:
                os.environ.pop(REDIS_URL_ENV, None)
            else:
                os.environ[REDIS_URL_ENV] = env_backup
    return out


# ============================================================================ report


def _fmt_stats(s: dict[str, float]) -> str:
    if not s or not s.get("n"):
        return "—"
    return f"{s['p50']:.2f} / {s['p99']:.2f}"


def report(ours: dict[str, Any] | None, celery: list[tuple[str, dict[str, Any]]], args) -> str:
    lines: list[str] = []
    lat_rows = []
    if ours:
        e = ours["latency"].extra
        lat_rows.append(("ours, 3 replicated nodes, 4 agents x8 (SubmitTask round-robin)", e, True))
    for label, c in celery:
        lat_rows.append((f"celery + redis, {args.celery_workers} workers x{args.celery_concurrency}, {label}",
                         c["latency"].extra, False))
    lines.append("### Dispatch latency, one task at a time, idle executors (p50 / p99 ms)\n")
    lines.append("| system | n | submit acked | submit -> assigned | **submit -> started** | "
                 "submit -> started seen by client | submit -> completed (client) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for label, e, is_ours in lat_rows:
        lines.append(f"| {label} | {e['started_ms'].get('n', 0)} | {_fmt_stats(e['ack_ms'])} | "
                     f"{_fmt_stats(e.get('assigned_ms', {}))} | **{_fmt_stats(e['started_ms'])}** | "
                     f"{_fmt_stats(e.get('started_seen_ms', {}))} | {_fmt_stats(e['done_ms'])} |")
    if ours:
        e = ours["latency"].extra
        lines.append(f"\nours by the node the client submitted to: submit -> started leader {_fmt_stats(e['started_ms_leader'])}, "
                     f"followers {_fmt_stats(e['started_ms_followers'])}; -> completed leader "
                     f"{_fmt_stats(e['done_ms_leader'])}, followers {_fmt_stats(e['done_ms_followers'])}. "
                     f"errors: {ours['latency'].errors}.")
    lines.append("\n### Throughput of no-op echo tasks (first submit -> last result)\n")
    lines.append("| system | tasks | seconds | **tasks/s** | submit phase tasks/s | not completed | CPU % (100 = 1 core) | vs Celery |")
    lines.append("|---|---:|---:|---:|---:|---:|---|---:|")
    best_celery = max((c["throughput"].ops_per_s for _, c in celery), default=0.0)
    if ours:
        for r in ours["throughput"]:
            x = r.extra
            cpu = (f"leader {x.get('cpu_leader_pct')}, followers {x.get('cpu_followers_pct')}, "
                   f"agents {x.get('cpu_agents_pct')}")
            ratio = f"{r.ops_per_s / best_celery:.2f}" if best_celery else "—"
            lines.append(f"| {r.name} | {r.ops} | {r.seconds:.2f} | **{r.ops_per_s:,.0f}** | "
                         f"{x.get('submit_per_s', 0):,.0f} | {r.errors} | {cpu} | {ratio} |")
    for label, c in celery:
        r = c["throughput"]
        x = r.extra
        cpu = f"redis {x.get('cpu_redis_pct')}, workers (all processes) {x.get('cpu_workers_pct')}"
        lines.append(f"| celery + redis, {args.celery_workers} workers x{args.celery_concurrency}, {label} | {r.ops} | "
                     f"{r.seconds:.2f} | **{r.ops_per_s:,.0f}** | {x.get('submit_per_s', 0):,.0f} | {r.errors} | {cpu} | "
                     f"{r.ops_per_s / best_celery:.2f} |" if best_celery else "")
    if ours:
        lines.append("\nOurs under load, from the Watch stream's event stamps (ms, p50 / p99): ")
        for r in ours["throughput"]:
            ph = r.extra.get("phases") or {}
            if not ph:
                continue
            lines.append(f"- {r.extra['mode']}: submit -> first assigned {ph['submit_to_first_assigned_ms']}; "
                         f"assigned -> started {_fmt_stats(ph['assigned_to_started_ms'])}; started -> completed "
                         f"{_fmt_stats(ph['started_to_completed_ms'])}; assigned -> completed "
                         f"{_fmt_stats(ph['assigned_to_completed_ms'])}; mean tasks in flight (assigned, not completed) "
                         f"{ph['mean_in_flight']} of {args.agents * (args.capacity + args.prefetch)} leasable "
                         f"({args.agents} x ({args.capacity} running + {args.prefetch} prefetched)); per executor "
                         f"{ph['per_executor']}; client CPU {ph.get('client_cpu_pct')} %")
        lines.append(f"- executors first connected to: {ours.get('agent_nodes')}")
        lines.append(f"\nCheck: ListTasks(completed, echo) grew by {ours['completed_delta']:,} (expected "
                     f"{ours['expected_delta']:,}). Agents: " + "; ".join(
                         f"{s.get('executor_id')}: {s.get('attempts_completed_total')} completed, "
                         f"{s.get('attempts_failed_total')} failed, over capacity {s.get('assignments_over_capacity_total')}, "
                         f"duplicates {s.get('assignments_duplicate_total')}"
                         for s in ours.get("agent_summaries", [])))
    # Verdicts
    lines.append("\n### Targets\n")
    lines.append("| target | measured | |")
    lines.append("|---|---|---|")
    if ours and best_celery:
        best_ours = max(ours["throughput"], key=lambda r: r.ops_per_s)
        ratio = best_ours.ops_per_s / best_celery
        lines.append(f"| throughput >= {TARGET_TPUT_VS_CELERY:.0f}x Celery's (replicated, durable) | "
                     f"{best_ours.ops_per_s:,.0f} / {best_celery:,.0f} = {ratio:.2f}x ({best_ours.extra['mode']}) | "
                     f"{'met' if ratio >= TARGET_TPUT_VS_CELERY else '**not met**'} |")
        for r in ours["throughput"]:
            if r is not best_ours:
                lines.append(f"| (same, {r.extra['mode']}) | {r.ops_per_s:,.0f} / {best_celery:,.0f} = "
                             f"{r.ops_per_s / best_celery:.2f}x | "
                             f"{'met' if r.ops_per_s / best_celery >= TARGET_TPUT_VS_CELERY else '**not met**'} |")
    if ours:
        p50 = ours["latency"].p50_ms
        lines.append(f"| dispatch p50 <= {TARGET_DISPATCH_P50_MS:.0f} ms (submit -> executor started) | {p50:.2f} ms "
                     f"(p99 {ours['latency'].p99_ms:.2f}) | {'met' if p50 <= TARGET_DISPATCH_P50_MS else '**not met**'} |")
    if ours and celery:
        c = celery[0][1]["latency"]
        lines.append(f"\nLatency ratio ours / celery ({celery[0][0]}), submit -> started p50: "
                     f"{ours['latency'].p50_ms:.2f} / {c.p50_ms:.2f} = {ours['latency'].p50_ms / c.p50_ms:.2f}")
    if ours and ours.get("profiles"):
        from benchmarks.bench_cluster import summarize_profile

        pl = ours["profile_load"]
        lines.append(f"\n### Profiles (py-spy, {args.profile_seconds} s, load: {pl.ops} echo tasks at "
                     f"{pl.ops_per_s:,.0f} tasks/s)\n")
        lines.append("```")
        for p in ours["profiles"]:
            if p:
                lines.append(summarize_profile(p, top=15))
        lines.append("```")
    lines.append("\n" + machine_note())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=("ours", "celery"), default=["ours", "celery"])
    ap.add_argument("--samples", type=int, default=200, help="latency samples (after 10 warm-up)")
    ap.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    ap.add_argument("--batch", type=int, default=500, help="tasks per SubmitDag in the dag mode")
    ap.add_argument("--modes", nargs="+", choices=("dag", "submit"), default=["dag", "submit"])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=None,
                    help="attempts each agent may hold queued beyond --capacity (default 4 x capacity, as Celery's "
                         "default prefetch multiplier of 4)")
    ap.add_argument("--celery-workers", type=int, default=2)
    ap.add_argument("--celery-concurrency", type=int, default=1)
    ap.add_argument("--celery-acks-late", choices=("off", "on", "both"), default="both")
    ap.add_argument("--profile", default=None, help="directory: py-spy the leader and one executor")
    ap.add_argument("--profile-seconds", type=int, default=10)
    args = ap.parse_args(argv)
    if args.prefetch is None:
        args.prefetch = 4 * args.capacity
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every `finally` kills its processes
    t_start = time.monotonic()
    ours = None
    celery: list[tuple[str, dict[str, Any]]] = []
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.celery_acks_late] if "celery" in args.only else []
    # Celery before and after ours (when both variants run), so drifting load on the shared machine
    # hits both sides alike.
    for acks_late in variants[:1]:
        celery.append((f"acks_late {'on' if acks_late else 'off'}", run_celery(args, acks_late)))
    if "ours" in args.only:
        ours = run_ours(args, args.profile)
    for acks_late in variants[1:]:
        celery.append((f"acks_late {'on' if acks_late else 'off'}", run_celery(args, acks_late)))
    print(report(ours, celery, args))
    print(f"\n(total {time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
