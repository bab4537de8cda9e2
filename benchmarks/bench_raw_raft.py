"""(a) The ceiling of the Raft layer here: raw pysyncobj 0.3.17, a bare replicated counter.

Three processes on 127.0.0.1, each a ``SyncObj`` subclass with one ``@replicated`` method
(``incr()``), configured exactly as our nodes configure pysyncobj: ``wal.journal.LmdbJournal`` put in
by replacing ``pysyncobj.syncobj.createJournal`` during construction, ``transportClass=
cluster.raft_patches.CoordinatorTransport`` (acks wait for one group fsync per tick, keepalives, nextIndex fix),
``recommended_conf_kwargs()``, a ``password``, ``autoTick=False`` with our own tick thread that calls
``doTick(0.05)`` and then ``transport.flush_and_drain()`` (as ``cluster.raft.RaftLog`` does), and the same
``commandsQueueSize``. Data dirs in a temp dir on the local disk, so every entry is fsynced on the
leader and on the followers.

The load runs inside the leader's process (no RPC, no gRPC, no batching): C asyncio workers in the
main thread, each calling ``incr(callback=...)`` and awaiting the callback handed over with
``call_soon_threadsafe`` (the same hand-off our proposer uses). One command = one log entry, so
commits/s here is entries/s: what our proposer multiplies by its batch size.

    python -m benchmarks.bench_raw_raft                     # 1 and 64 in flight, 4 s each
    python -m benchmarks.bench_raw_raft --concurrency 1 16 64 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

from benchmarks.loadgen import (
    REPO_ROOT,
    Result,
    _child_env,
    die_with_parent,
    free_ports,
    machine_note,
    markdown_table,
    run_closed_loop,
)

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- node (own process)


def _make_counter_class():
    import pysyncobj.syncobj as syncobj_module
    from pysyncobj import SyncObj, SyncObjConf, replicated

    from cluster.raft_patches import CoordinatorTransport, recommended_conf_kwargs
    from wal.journal import LmdbJournal

    transport_class = CoordinatorTransport

    class Counter(SyncObj):
        def __init__(self, self_address: str, peers: list[str], data_dir: str, secret: str) -> None:
            self.counter = 0
            self.journal = LmdbJournal(os.path.join(data_dir, "wal"))
            kwargs = recommended_conf_kwargs()
            # No log compaction: our nodes snapshot with their own serializer; pysyncobj's stock one would
            # pickle this object (thread, lock) and fail, and a snapshot mid-run would skew the numbers.
            kwargs.update(password=secret, bindAddress=self_address, commandsQueueSize=2 * 64 + 1000,
                          logCompactionMinEntries=10**9, logCompactionMinTime=10**9)
            conf = SyncObjConf(autoTick=False, **kwargs)
            original = syncobj_module.createJournal
            syncobj_module.createJournal = lambda _path: self.journal
            try:
                super().__init__(self_address, peers, conf=conf, transportClass=transport_class)
            finally:
                syncobj_module.createJournal = original
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._tick_loop, name="raft-tick", daemon=True)
            self._thread.start()

        @replicated
        def incr(self) -> int:
            self.counter += 1
            return self.counter

        def _tick_loop(self) -> None:  # as cluster.raft.RaftLog._tick_loop
            transport = self._SyncObj__transport
            while not self._stop.is_set():
                try:
                    self.doTick(0.05)
                    transport.flush_and_drain()
                except Exception:
                    import traceback

                    traceback.print_exc()
                    time.sleep(0.05)

    return Counter


async def _bench_in_process(node, concurrency: int, duration_s: float, warmup_s: float) -> Result:
    loop = asyncio.get_running_loop()

    async def op() -> None:
        fut = loop.create_future()

        def cb(result, err) -> None:  # tick thread: hand off, never block
            loop.call_soon_threadsafe(_resolve, fut, result, err)

        node.incr(callback=cb)
        await fut

    return await run_closed_loop(op, concurrency, duration_s=duration_s, warmup_s=warmup_s, op_timeout_s=5.0,
                                 max_seconds=warmup_s + duration_s + 30,
                                 name="raw pysyncobj counter (LMDB journal, our transport; load in the leader)")


def _resolve(fut: asyncio.Future, result, err) -> None:
    if fut.done():
        return
    if err == 0:
        fut.set_result(result)
    else:
        fut.set_exception(RuntimeError(f"pysyncobj error {err}"))


def serve(self_address: str, peers: list[str], data_dir: str) -> None:
    """Reads JSON commands on stdin, one per line, answers one JSON line each; exits on EOF."""
    Counter = _make_counter_class()
    node = Counter(self_address, peers, data_dir, os.environ["RAW_RAFT_SECRET"])
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "status":
            st = node.getStatus()
            leader = st.get("leader")
            reply = {"is_leader": st.get("state") == 2, "has_leader": leader is not None,
                     "term": st.get("raft_term"), "commit": st.get("commit_idx"), "applied": st.get("last_applied"),
                     "counter": node.counter, "flushes": node.journal.flushes_total,
                     "fsync_s": node.journal.fsync_seconds_total}
        elif req["cmd"] == "bench":
            r = asyncio.run(_bench_in_process(node, req["concurrency"], req["duration_s"], req["warmup_s"]))
            reply = {"result": asdict(r)}
        else:
            reply = {"error": f"unknown {req['cmd']}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    os._exit(0)


# --------------------------------------------------------------------------- the cluster (parent)


class RawRaftCluster:
    """3 counter processes; every one SIGKILLed by PID and the temp dir removed on exit."""

    def __init__(self, size: int = 3, base_dir: str | None = None) -> None:
        self.size = size
        self.base_dir = base_dir
        self.procs: list[subprocess.Popen] = []
        self.tmp: str | None = None

    def __enter__(self) -> RawRaftCluster:
        self.tmp = tempfile.mkdtemp(prefix="bench-rawraft-", dir=self.base_dir)
        try:
            addrs = [f"{HOST}:{p}" for p in free_ports(self.size)]
            env = _child_env()
            env["RAW_RAFT_SECRET"] = secrets.token_urlsafe(32)
            for i, a in enumerate(addrs):
                d = os.path.join(self.tmp, f"n{i}")
                os.makedirs(d)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_raw_raft", "--serve", "--self", a,
                     "--peers", ",".join(x for x in addrs if x != a), "--dir", d],
                    cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=open(os.path.join(d, "stderr.log"), "wb"), text=True, preexec_fn=die_with_parent))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
        self.procs = []
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def ask(self, i: int, req: dict, timeout_s: float = 10.0) -> dict:
        p = self.procs[i]
        p.stdin.write(json.dumps(req) + "\n")
        p.stdin.flush()
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout_s):
                raise TimeoutError(f"raw raft node {i} did not answer {req['cmd']} within {timeout_s} s")
            line = p.stdout.readline()
        finally:
            sel.close()
        if not line:
            raise RuntimeError(f"raw raft node {i} exited (code {p.poll()})")
        return json.loads(line)

    def wait_leader(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sts = [self.ask(i, {"cmd": "status"}) for i in range(self.size)]
            leaders = [i for i, s in enumerate(sts) if s["is_leader"]]
            if len(leaders) == 1 and all(s["has_leader"] for s in sts):
                return leaders[0]
            time.sleep(0.05)
        raise TimeoutError(f"raw raft: no leader within {timeout_s} s")

    def bench(self, concurrency: int, duration_s: float, warmup_s: float = 1.0) -> Result:
        leader = self.wait_leader()
        before = [self.ask(i, {"cmd": "status"}) for i in range(self.size)]
        reply = self.ask(leader, {"cmd": "bench", "concurrency": concurrency, "duration_s": duration_s,
                                  "warmup_s": warmup_s}, timeout_s=warmup_s + duration_s + 60)
        after = [self.ask(i, {"cmd": "status"}) for i in range(self.size)]
        r = Result.from_dict(reply["result"])
        r.extra["fsyncs_per_commit_leader"] = round(
            (after[leader]["flushes"] - before[leader]["flushes"]) / max(1, after[leader]["counter"] - before[leader]["counter"]), 2)
        flushes = after[leader]["flushes"] - before[leader]["flushes"]
        r.extra["leader_fsync_ms_mean"] = round(
            1000 * (after[leader]["fsync_s"] - before[leader]["fsync_s"]) / max(1, flushes), 3)
        return r


def run_raw_raft(concurrencies: list[int], duration_s: float = 4.0, warmup_s: float = 1.0,
                 base_dir: str | None = None) -> list[Result]:
    with RawRaftCluster(base_dir=base_dir) as c:
        return [c.bench(n, duration_s, warmup_s) for n in concurrencies]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--self", dest="self_address", help=argparse.SUPPRESS)
    ap.add_argument("--peers", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--base-dir", default=None)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.self_address, args.peers.split(","), args.dir)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = run_raw_raft(args.concurrency, args.duration, args.warmup, args.base_dir)
    print(markdown_table(rows))
    for r in rows:
        print(f"- c={r.concurrency}: {r.extra}")
    print(machine_note())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
