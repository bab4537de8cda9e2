"""Every benchmark in one run, side by side, with ratios: ``python -m benchmarks.run_all`` (``make bench``).

Order: (f) gRPC echo ceiling, (e) etcd 3.4 (skipped with a note if ``etcd`` is not installed),
(a) raw pysyncobj counter, then ours: (b) SubmitTask c=1 / c=64, DAG submission, (c) leader
failover, (d) restart with 100k tasks (log replay and from a snapshot) and memory per task.
Writes the markdown report to stdout and to ``benchmarks/out/latest.md``. ~4-5 minutes.

    python -m benchmarks.run_all
    python -m benchmarks.run_all --duration 3 --failovers 3 --tasks 50000     # quicker
    python -m benchmarks.run_all --profile /tmp/prof                           # + py-spy of our leader
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

from benchmarks.loadgen import REPO_ROOT, Result, machine_note

OUT = REPO_ROOT / "benchmarks" / "out" / "latest.md"

TARGET_SUBMIT_VS_ECHO = 0.5
TARGET_SINGLE_P50_MS = 2.0
TARGET_DAG_TASKS_PER_S = 20_000
TARGET_FAILOVER_MEDIAN_S = 0.5
TARGET_RESTART_S = 5.0
TARGET_BYTES_PER_TASK = 2048


def _ok(cond: bool) -> str:
    return "met" if cond else "**not met**"


def _row(name: str, r: Result, ref: Result | None, note: str = "") -> str:
    ratio = f"{r.ops_per_s / ref.ops_per_s:.2f}" if ref is not None and ref.ops_per_s else "—"
    return (f"| {name} | {r.concurrency} | {r.ops_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | "
            f"{ratio} | {note} |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per throughput run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--failovers", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=100_000, help="tasks loaded for restart/memory")
    ap.add_argument("--dag-clients", type=int, default=4)
    ap.add_argument("--skip-etcd", action="store_true")
    ap.add_argument("--profile", default=None, help="directory for py-spy profiles of our leader")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every `finally` kills its processes

    from benchmarks import bench_cluster as bc
    from benchmarks.bench_echo import run_echo
    from benchmarks.bench_raw_raft import run_raw_raft

    started = time.monotonic()
    d, w = args.duration, args.warmup
    notes: list[str] = []

    def stamp(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {what}", file=sys.stderr, flush=True)

    # (f) echo ceiling
    stamp("echo")
    echo = {c: run_echo(c, d, warmup_s=w) for c in (1, 64)}

    # (e) etcd
    etcd_rows: dict[str, Result] = {}
    etcd_fo = None
    from benchmarks import bench_etcd as be

    if args.skip_etcd:
        notes.append("etcd: skipped (--skip-etcd).")
    elif not (shutil.which(be.ETCD_BIN) or os.path.exists(be.ETCD_BIN)):
        notes.append(f"etcd: **skipped**, no `etcd` binary ({be.ETCD_BIN}); `apt-get install -y etcd-server` "
                     "(Debian 12: 3.4.23) or set ETCD_BIN.")
    else:
        stamp("etcd")
        with be.EtcdCluster() as ec:
            etcd_version = ec.version()
            etcd_rows["c1"] = be.run_etcd(1, d, cluster=ec, warmup_s=w, first="follower")
            etcd_rows["c64"] = be.run_etcd(64, d, cluster=ec, warmup_s=w)
            if args.failovers > 0:
                etcd_fo = be.run_etcd_failover(args.failovers, cluster=ec)
        notes.append(f"etcd {etcd_version}, 3 members, default timeouts, JSON gateway, data dirs on the local disk.")

    # (a) raw raft
    stamp("raw raft")
    raw = {r.concurrency: r for r in run_raw_raft([1, 64], d, w)}

    # ours: (b), DAG, (c)
    prof = bc.Profiler(args.profile) if args.profile else None
    stamp("ours: submit, dag, failover")
    with bc.OurCluster() as cl:
        ours_c1 = bc.run_submit(cl, 1, d, target="spread", warmup_s=w)
        ours_c1_leader = bc.run_submit(cl, 1, d, target="leader", warmup_s=w)
        ours_c1_fol = bc.run_submit(cl, 1, d, target="followers", warmup_s=w)
        ours_c64 = bc.run_submit(cl, 64, d, target="spread", warmup_s=w, profiler=prof)
        ours_dag = bc.run_dag(cl, args.dag_clients, d, warmup_s=w, profiler=prof)
        fo = bc.run_failover(cl, args.failovers) if args.failovers > 0 else None
    # (d) + memory on a fresh cluster
    stamp("ours: load, restart, memory")
    mem, restarts = bc.run_load_and_restart(args.tasks)
    stamp("done")

    # ------------------------------------------------------------------ report
    dag_tps = ours_dag.extra["tasks_per_s"]
    e1, e64 = echo[1], echo[64]
    rep = []
    rep.append(f"# Benchmark run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n")
    rep.append(f"`python -m benchmarks.run_all --duration {d} --failovers {args.failovers} --tasks {args.tasks}` — "
               f"Python {platform.python_version()}, {machine_note()}. "
               f"Total run time {time.monotonic() - started:.0f} s. Every row ran in this one run; compare ratios, "
               "not absolute numbers, across runs.\n\n")
    rep.append("## Throughput and latency (closed loop, client in its own process)\n\n")
    rep.append("| what | in flight | ops/s | p50 ms | p99 ms | errors | ratio | note |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
    rep.append(_row("(f) gRPC echo, grpc.aio server", e1, None, "ceiling of one-call-per-request Python gRPC"))
    rep.append(_row("(f) gRPC echo, grpc.aio server", e64, None, ""))
    if etcd_rows:
        rep.append(_row("(e) etcd 3.4 put (worker on a follower)", etcd_rows["c1"], e1, "ratio = / echo c=1"))
        rep.append(_row("(e) etcd 3.4 put (spread over 3)", etcd_rows["c64"], e64, "ratio = / echo c=64"))
    rep.append(_row("(a) raw pysyncobj counter, load in the leader", raw[1], None,
                    f"1 entry per command; {raw[1].extra.get('fsyncs_per_commit_leader')} leader fsyncs/commit"))
    rep.append(_row("(a) raw pysyncobj counter, load in the leader", raw[64], None,
                    f"{raw[64].extra.get('fsyncs_per_commit_leader')} leader fsyncs/commit"))
    cpu = lambda r: f"CPU leader {r.extra.get('leader_cpu_pct')} %, followers {r.extra.get('followers_cpu_pct')}, client {r.extra.get('client_cpu_pct')} %"  # noqa: E731
    rep.append(_row("(b) ours SubmitTask, round-robin 3 nodes", ours_c1, e1, "ratio = / echo c=1; " + cpu(ours_c1)))
    rep.append(_row("(b) ours SubmitTask, leader only", ours_c1_leader, e1, "ratio = / echo c=1"))
    rep.append(_row("(b) ours SubmitTask, followers only", ours_c1_fol, e1, "ratio = / echo c=1"))
    rep.append(_row("(b) ours SubmitTask, round-robin 3 nodes", ours_c64, e64, "ratio = / echo c=64; " + cpu(ours_c64)))
    rep.append(f"| DAG: ours SubmitDag, {ours_dag.extra['dag_tasks']}-task DAGs | {ours_dag.concurrency} | "
               f"{ours_dag.ops_per_s:,.1f} DAGs/s = **{dag_tps:,.0f} tasks/s** | {ours_dag.p50_ms:.1f} | "
               f"{ours_dag.p99_ms:.1f} | {ours_dag.errors} | — | {cpu(ours_dag)} |\n")
    rep.append("\nRatios: ours c=64 / echo c=64 = "
               f"**{ours_c64.ops_per_s / e64.ops_per_s:.2f}**; ours c=64 / raw pysyncobj c=64 = "
               f"{ours_c64.ops_per_s / raw[64].ops_per_s:.2f}; ours c=1 p50 / raw pysyncobj c=1 p50 = "
               f"{ours_c1.p50_ms / raw[1].p50_ms:.2f}")
    if etcd_rows:
        rep.append(f"; ours c=64 / etcd c=64 = {ours_c64.ops_per_s / etcd_rows['c64'].ops_per_s:.2f}; "
                   f"ours c=1 p50 / etcd c=1 p50 = {ours_c1.p50_ms / etcd_rows['c1'].p50_ms:.2f}")
    rep.append(".\n\n## Leader failover (SIGKILL -> first acknowledged write through a survivor, probes every 10 ms)\n\n")
    rep.append("| system | runs | min s | median s | max s |\n|---|---:|---:|---:|---:|\n")
    if etcd_fo is not None:
        rep.append(f"| (e) etcd 3.4, default timeouts | {len(etcd_fo.runs_s)} | {etcd_fo.min_s:.3f} | "
                   f"{etcd_fo.median_s:.3f} | {etcd_fo.max_s:.3f} |\n")
    if fo is not None:
        rep.append(f"| (c) ours (election 0.2-0.4 s) | {len(fo.runs_s)} | {fo.min_s:.3f} | {fo.median_s:.3f} | "
                   f"{fo.max_s:.3f} |\n")
        rep.append(f"\nours, runs: {[round(x, 3) for x in fo.runs_s]} s; probes per run: {fo.attempts}; killed node "
                   f"restarted: process start -> serving {[round(x, 2) for x in fo.restart_serving_s]} s (small state).\n")
    rep.append(f"\n## (d) Restart with {mem.tasks_after - mem.tasks_before:,} tasks in state, and memory\n\n")
    rep.append(f"Loaded with SubmitDag (4 clients, {args.tasks // 1000} DAGs of 1000, no warm-up): "
               f"{mem.load.ops} DAGs in {mem.load.seconds:.1f} s = {mem.load.extra.get('tasks_per_s'):,.0f} tasks/s.\n\n")
    rep.append(bc.restart_table(restarts))
    rep.append("\n")
    rep.append(bc.memory_table(mem))
    snap_rss = next((r for r in restarts if r.label == "from snapshot"), None)
    if snap_rss is not None:
        rep.append(f"\nRSS of the follower after restarting from the snapshot (state only, log compacted): "
                   f"{snap_rss.rss_kib_after / 1024:.0f} MiB for {snap_rss.tasks:,} tasks.\n")
    bpt = mem.bytes_per_task(mem.leader)
    worst_restart = max(r.caught_up_s for r in restarts)
    rep.append("\n## Targets\n\n| target | measured | |\n|---|---|---|\n")
    rep.append(f"| SubmitTask c=64 >= {TARGET_SUBMIT_VS_ECHO:.0%} of echo c=64 | {ours_c64.ops_per_s:,.0f} / "
               f"{e64.ops_per_s:,.0f} = {ours_c64.ops_per_s / e64.ops_per_s:.0%} | "
               f"{_ok(ours_c64.ops_per_s >= TARGET_SUBMIT_VS_ECHO * e64.ops_per_s)} |\n")
    rep.append(f"| single-client p50 <= {TARGET_SINGLE_P50_MS} ms | {ours_c1.p50_ms:.2f} ms (leader only "
               f"{ours_c1_leader.p50_ms:.2f}, followers only {ours_c1_fol.p50_ms:.2f}) | "
               f"{_ok(ours_c1.p50_ms <= TARGET_SINGLE_P50_MS)} |\n")
    rep.append(f"| DAG submission >= {TARGET_DAG_TASKS_PER_S:,} tasks/s | {dag_tps:,.0f} tasks/s | "
               f"{_ok(dag_tps >= TARGET_DAG_TASKS_PER_S)} |\n")
    if fo is not None:
        rep.append(f"| failover median <= {TARGET_FAILOVER_MEDIAN_S} s | {fo.median_s:.3f} s | "
                   f"{_ok(fo.median_s <= TARGET_FAILOVER_MEDIAN_S)} |\n")
    rep.append(f"| restart with 100k tasks <= {TARGET_RESTART_S} s (caught up) | "
               + ", ".join(f"{r.label}: {r.caught_up_s:.2f} s" for r in restarts)
               + f" | {_ok(worst_restart <= TARGET_RESTART_S)} |\n")
    rep.append(f"| memory <= {TARGET_BYTES_PER_TASK} B/task | leader {bpt:,.0f} B/task | "
               f"{_ok(bpt <= TARGET_BYTES_PER_TASK)} |\n")
    if notes:
        rep.append("\nNotes: " + " ".join(notes) + "\n")
    if prof is not None:
        rep.append("\n## Profiles (py-spy record -r 200 of the leader, non-idle samples; `Handle._run` self = "
                   "grpc.aio's Cython code, invisible to py-spy; `poll`/`select` = waiting)\n\n```\n")
        for r in (ours_c64, ours_dag):
            if r.extra.get("profile"):
                rep.append(bc.summarize_profile(r.extra["profile"]) + "\n\n")
        rep.append("```\n")
    text = "".join(rep)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
