"""(e) A peer to compare with: etcd 3.4, a 3-member cluster on loopback, driven from Python.

etcd (Debian 12's ``etcd-server``, 3.4.x) runs as three processes on free 127.0.0.1 ports with
data directories in a temporary directory on the local disk (so every write is fsynced, as ours
are). Python drives it through etcd's JSON gRPC-gateway (``POST /v3/kv/put`` with base64 key and
value) over raw asyncio HTTP/1.1 keep-alive connections: one connection per closed-loop worker,
workers spread round-robin over the three members (a put arriving at a follower is forwarded to
the leader inside etcd, as ours will be). The load client runs in its own Python process.

It also measures leader failover: SIGKILL the leader (found with ``/v3/maintenance/status``) and
time until a put through a surviving member succeeds again; the killed member is restarted and the
cluster let settle between runs. etcd runs with its defaults (heartbeat 100 ms, election timeout
1000 ms, pre-vote off in 3.4).

    python -m benchmarks.bench_etcd                       # concurrency 1 and 64 (5 s each) + 5 failovers
    python -m benchmarks.bench_etcd --failovers 0 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import (
    Result,
    die_with_parent,
    free_ports,
    machine_note,
    markdown_table,
    run_closed_loop,
    run_in_subprocess,
)

ETCD_BIN = os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- raw HTTP/1.1 client


class HttpConn:
    """One HTTP/1.1 keep-alive connection; one request at a time (a closed-loop worker owns it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path``; returns (status, response body). On any failure the
        connection is dropped, so the next call starts on a fresh one."""
        try:
            if self.writer is None:
                await self._connect()
            self.writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                data = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                for _ in range(100_000):  # bounded: no response of ours has this many chunks
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")  # end of trailers (we send none)
                        break
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readexactly(2)
                data = b"".join(parts)
            else:
                raise RuntimeError("response without length")
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, data
        except BaseException:
            self.close()
            raise


def put_body(key: bytes, value: bytes) -> bytes:
    return json.dumps(
        {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}
    ).encode()


async def put(conn: HttpConn, key: bytes, value: bytes) -> None:
    status, data = await conn.post("/v3/kv/put", put_body(key, value))
    if status != 200:
        raise RuntimeError(f"put: HTTP {status}: {data[:200]!r}")


# --------------------------------------------------------------------------- the cluster


def _http_json(port: int, path: str, body: dict | None = None, timeout: float = 1.0) -> dict:
    """Blocking control-plane request (health, status): GET without body, POST with one."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method="GET" if data is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """A 3-member etcd cluster on loopback. Use as a context manager: every process it started is
    SIGKILLed by PID and the temporary directory removed on exit, whatever happened."""

    size: int = 3
    base_dir: str | None = None  # where the temp dir goes (default: the system temp dir, on disk here)
    extra_args: list[str] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    tmp: Path | None = None

    def __enter__(self) -> EtcdCluster:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-etcd-", dir=self.base_dir))
        try:
            ports = free_ports(2 * self.size)
            for i in range(self.size):
                self.members.append(Member(
                    f"m{i}", ports[2 * i], ports[2 * i + 1], self.tmp / f"m{i}.etcd", self.tmp / f"m{i}.log"))
            for i in range(self.size):
                self.start(i)
            self.wait_stable(timeout_s=30)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def start(self, i: int) -> None:
        m = self.members[i]
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            ETCD_BIN, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-token", "bench",
            "--initial-cluster-state", "new",  # ignored when the data dir already exists (restart)
            "--logger", "zap", "--log-level", "warn", *self.extra_args,
        ]
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def kill(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None:
            if m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)
            m.proc = None

    def alive(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.proc is not None and m.proc.poll() is None]

    def status(self, i: int) -> dict:
        return _http_json(self.members[i].client_port, "/v3/maintenance/status", {})

    def version(self) -> str:
        return self.status(self.alive()[0]).get("version", "?")

    def leader(self) -> int | None:
        """Index of the member that says it is the leader (member_id == leader), if any."""
        for i in self.alive():
            try:
                st = self.status(i)
            except OSError:
                continue
            if st.get("leader") and st["header"]["member_id"] == st["leader"]:
                return i
        return None

    def wait_stable(self, timeout_s: float = 30.0) -> int:
        """Wait (bounded) until every running member is healthy and all agree on one leader, and
        every member has applied up to the leader's index. Returns the leader's index."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                alive = self.alive()
                for i in alive:
                    h = _http_json(self.members[i].client_port, "/health")
                    if h.get("health") != "true":
                        raise RuntimeError(f"m{i} health {h}")
                sts = [self.status(i) for i in alive]
                leaders = {s.get("leader") for s in sts}
                if len(sts) == self.size and len(leaders) == 1 and "0" not in leaders and None not in leaders:
                    if len({s.get("raftIndex") for s in sts}) == 1:
                        for i, s in zip(alive, sts, strict=True):
                            if s["header"]["member_id"] == s["leader"]:
                                return i
                last = f"leaders {leaders}, indexes {[s.get('raftIndex') for s in sts]}"
            except (OSError, ValueError, RuntimeError) as e:
                last = repr(e)
            time.sleep(0.05)
        logs = "\n".join(f"--- {m.name}\n{m.log_path.read_text()[-1500:]}" for m in self.members if m.log_path.exists())
        raise TimeoutError(f"etcd cluster not stable in {timeout_s} s: {last}\n{logs}")


# --------------------------------------------------------------------------- throughput / latency


async def etcd_client(
    ports: list[int], concurrency: int, duration_s: float = 5.0, warmup_s: float = 1.0,
    value_bytes: int = 16, name: str = "etcd put",
) -> Result:
    """The load client: ``concurrency`` closed-loop workers, each with its own keep-alive
    connection to member ``worker % len(ports)``, each putting its own keys."""
    value = b"v" * value_bytes
    conns = [HttpConn(HOST, ports[w % len(ports)]) for w in range(concurrency)]
    free = list(range(concurrency))  # a worker takes a connection index for its whole run
    counter = [0]

    def make_op():
        # run_closed_loop calls op() from each worker in turn; give each worker its own connection
        # by handing out connections from a pool (one request at a time per connection).
        async def op() -> None:
            w = free.pop()
            try:
                counter[0] += 1
                await put(conns[w], f"bench/{w}/{counter[0] % 1000}".encode(), value)
            finally:
                free.append(w)
        return op

    try:
        return await run_closed_loop(
            make_op(), concurrency, duration_s=duration_s, warmup_s=warmup_s, op_timeout_s=5.0,
            max_seconds=warmup_s + duration_s + 30, name=name,
        )
    finally:
        for c in conns:
            c.close()


def run_etcd(concurrency: int, duration_s: float = 5.0, *, cluster: EtcdCluster | None = None,
             warmup_s: float = 1.0, first: str = "follower") -> Result:
    """Puts/s and latency of a 3-member etcd cluster at ``concurrency``; the client runs in its
    own process. Worker w talks to member (k + w) % 3, where member k is chosen by ``first``:
    "follower" (a follower, so a lone worker pays etcd's follower -> leader forward, as a client
    of ours that hits any node does), "leader", or "any" (m0). Starts (and always stops) a cluster
    unless one is given."""
    if cluster is None:
        with EtcdCluster() as c:
            return run_etcd(concurrency, duration_s, cluster=c, warmup_s=warmup_s, first=first)
    leader = cluster.wait_stable()
    k = {"leader": leader, "follower": (leader + 1) % cluster.size, "any": 0}[first]
    ports = [cluster.members[(k + j) % cluster.size].client_port for j in range(cluster.size)]
    where = f"first worker on the {first}" if concurrency == 1 else "workers spread over 3 members"
    result = run_in_subprocess(
        "benchmarks.bench_etcd:etcd_client",
        {"ports": ports, "concurrency": concurrency, "duration_s": duration_s, "warmup_s": warmup_s,
         "name": f"etcd 3.4 put, JSON gateway ({where})"},
        timeout_s=warmup_s + duration_s + 60,
    )
    result.extra["leader"] = cluster.members[leader].name
    result.extra["version"] = cluster.version()
    return result

# --------------------------------------------------------------------------- failover


@dataclass
class FailoverResult:
    runs_s: list[float]
    attempts: list[int]  # put probes started per run until the first success

    @property
    def min_s(self) -> float:
        return min(self.runs_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def max_s(self) -> float:
        return max(self.runs_s)


async def _time_to_first_put(cluster: EtcdCluster, survivors: list[int], leader: int,
                             probe_every_s: float, probe_timeout_s: float, give_up_s: float) -> tuple[float, int]:
    """Kill the leader, then start a put probe every ``probe_every_s`` through the survivors in
    turn, each on a fresh connection and bounded by ``probe_timeout_s``, until one is acknowledged.
    Returns (seconds from SIGKILL to the first acknowledged put, probes started).

    Staggered probes rather than retries: a put sent to a follower that still believes in the dead
    leader hangs until etcd's request timeout, so a retry loop would measure its own timeout. With
    probes the error is at most ``probe_every_s`` plus one put's latency."""
    ports = [cluster.members[i].client_port for i in survivors]
    for p in ports:  # the survivors answer puts before the kill
        c = HttpConn(HOST, p)
        try:
            await asyncio.wait_for(put(c, b"failover/warm", b"1"), 5)
        finally:
            c.close()

    async def probe(n: int) -> float:
        c = HttpConn(HOST, ports[n % len(ports)])
        try:
            await asyncio.wait_for(put(c, b"failover/probe", str(n).encode()), probe_timeout_s)
            return time.perf_counter()
        finally:
            c.close()

    probes: list[asyncio.Task] = []
    t0 = time.perf_counter()
    cluster.kill(leader)
    try:
        max_probes = int(give_up_s / probe_every_s) + 1
        for n in range(max_probes):
            ok = [t.result() for t in probes if t.done() and not t.cancelled() and t.exception() is None]
            if ok:
                return min(ok) - t0, len(probes)
            probes.append(asyncio.create_task(probe(n)))
            await asyncio.sleep(probe_every_s)
        raise TimeoutError(f"no put succeeded within {give_up_s} s of killing the leader")
    finally:
        for t in probes:
            t.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


def run_etcd_failover(runs: int = 5, *, cluster: EtcdCluster | None = None,
                      probe_every_s: float = 0.01, settle_s: float = 1.0) -> FailoverResult:
    """SIGKILL the leader ``runs`` times; time until a put succeeds again through a survivor.
    The killed member is restarted and the cluster waited on (bounded) between runs."""
    if cluster is None:
        with EtcdCluster() as c:
            return run_etcd_failover(runs, cluster=c, probe_every_s=probe_every_s, settle_s=settle_s)
    out, attempts = [], []
    for _ in range(runs):
        leader = cluster.wait_stable(timeout_s=30)
        time.sleep(settle_s)  # a steady state, not a leader that has just been elected
        leader = cluster.wait_stable(timeout_s=30)
        survivors = [i for i in range(cluster.size) if i != leader]
        secs, n = asyncio.run(_time_to_first_put(cluster, survivors, leader, probe_every_s,
                                                  probe_timeout_s=3.0, give_up_s=30))
        out.append(secs)
        attempts.append(n)
        cluster.start(leader)
        cluster.wait_stable(timeout_s=30)
    return FailoverResult(out, attempts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--failovers", type=int, default=5, help="leader-kill runs (0 to skip)")
    ap.add_argument("--base-dir", default=None, help="where the data dirs go (default: system temp dir)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` kills the members
    with EtcdCluster(base_dir=args.base_dir) as cluster:
        version = cluster.version()
        rows = []
        for c in args.concurrency:
            for first in (("follower", "leader") if c == 1 else ("follower",)):
                rows.append(run_etcd(c, args.duration, cluster=cluster, warmup_s=args.warmup, first=first))
        fo = run_etcd_failover(args.failovers, cluster=cluster) if args.failovers > 0 else None
    print(f"etcd {version}, 3 members on {HOST}, data dirs under {args.base_dir or tempfile.gettempdir()}\n")
    print(markdown_table(rows))
    print("client CPU % (one Python process), per row:", ", ".join(str(r.extra.get("client_cpu_pct")) for r in rows))
    print()
    if fo is not None:
        print("| etcd leader failover (SIGKILL -> first put acked) | runs | min s | median s | max s |")
        print("|---|---:|---:|---:|---:|")
        print(f"| default timeouts (heartbeat 100 ms, election 1000 ms) | {len(fo.runs_s)} | "
              f"{fo.min_s:.2f} | {fo.median_s:.2f} | {fo.max_s:.2f} |")
        runs = ", ".join(f"{s:.3f}" for s in fo.runs_s)
        print(f"\nruns: {runs} s; put probes started per run (one per 10 ms): {fo.attempts}")
    print(machine_note())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
