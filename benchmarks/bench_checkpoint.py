"""Checkpoints on a 3-node cluster (issue 4): write latency and throughput, restore time against
the delta-chain length, and bytes stored with deltas against full snapshots.

The cluster is ``OurCluster`` (3 ``coordctl node run`` processes on 127.0.0.1, temp dirs, killed by
PID on exit). The writer is a real executor agent in this process (``cluster.agent.ExecutorAgent``)
running one task type, ``ckpt_bench``: the attempt holds the lease and saves checkpoints through the
same ``ClusterCheckpoints`` sink the SDK uses (``SaveCheckpoint``: validated, proposed, committed by
a majority, applied, then acknowledged). Each save is timed from the call to the acknowledgement.

(w) write: for states of 1 KiB, 64 KiB and 256 KiB, an agent-like state (a blob of that size plus a
    growing list of actions; each checkpoint appends one ~100-byte action and changes a counter)
    saved N times, one save at a time (latency), as fulls (every record a full snapshot) and as
    deltas (``make_checkpoint``'s choice: a full, then deltas up to full_every). Then K attempts
    at once, each saving N (throughput, saves/s and MB/s of payload).
(r) restore: for a 64 KiB state, a full followed by d deltas (d = 0, 5, 10, 20 = full_every), then
    ``RestoreCheckpoint`` timed (node: verify the full, replay d deltas, checksum each; the reply
    carries the document), median of 20.
(b) bytes: an agent state growing by one tool call (~600 bytes) per checkpoint over 200
    checkpoints: payload bytes stored with deltas against full snapshots (pure computation with
    ``make_checkpoint``; the cluster run's own bytes from (w) are printed too).

    python -m benchmarks.bench_checkpoint                  # everything (~1 min)
    python -m benchmarks.bench_checkpoint --saves 100      # fewer saves per series
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.bench_cluster import OurCluster
from benchmarks.loadgen import machine_note
from coordinator.checkpoints import CheckpointLimits, canonical_bytes, make_checkpoint
from coordinator.model import ExecutorCapabilities
from executors.base import ExecutionContext, ExecutorResult, ExecutorTask

KIB = 1024
SIZES_KIB = (1, 64, 256)
CHAIN_LENGTHS = (0, 5, 10, 20)
LIMITS = CheckpointLimits()


def document(size_bytes: int, actions: int) -> dict[str, Any]:
    return {"state_snapshot": {"blob": "x" * size_bytes, "counter": actions},
            "executed_actions": [{"id": f"a{i}", "tool": "search", "summary": f"result {i} " + "y" * 60}
                                 for i in range(actions)],
            "remaining_plan": [{"step": "continue"}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class BenchAdapter:
    """Runs the measurement inside an attempt, so every save is fenced by a real lease."""

    def __init__(self) -> None:
        self.agent = None

    def get_capabilities(self) -> ExecutorCapabilities:
        return ExecutorCapabilities(supported_task_types=["ckpt_bench"], resumable=True)

    async def get_status(self) -> dict[str, Any]:
        return {}

    async def cancel(self, task_id: str) -> None:
        return None

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        from cluster.agent import ClusterCheckpoints

        spec = task.input
        sink = ClusterCheckpoints(self.agent, (task.task_id, task.attempt))
        if spec["what"] == "write":
            return ExecutorResult(output=await self._write(task.task_id, sink, spec))
        return ExecutorResult(output=await self._restore(task.task_id, sink, spec))

    @staticmethod
    async def _write(task_id: str, sink: Any, spec: dict[str, Any]) -> dict[str, Any]:
        size, saves, mode = spec["size_bytes"], spec["saves"], spec["mode"]
        previous, sequence, deltas, delta_bytes = None, 0, 0, 0
        latencies_ms, payload_bytes, kinds = [], 0, {"full": 0, "delta": 0}
        started = time.perf_counter()
        for n in range(saves):
            current = document(size, n + 1)
            t0 = time.perf_counter()
            record = make_checkpoint(previous if mode == "delta" else None, sequence, current, task_id=task_id,
                                     timestamp_ms=0, full_every=LIMITS.full_every,
                                     delta_chain_bytes_max=LIMITS.delta_chain_bytes_max,
                                     chain_deltas_so_far=deltas, chain_bytes_so_far=delta_bytes)
            await sink.save(record)
            latencies_ms.append((time.perf_counter() - t0) * 1000)
            previous, sequence = current, record.sequence_number
            deltas, delta_bytes = (0, 0) if record.kind == "full" else (deltas + 1, delta_bytes + record.payload_bytes)
            payload_bytes += record.payload_bytes
            kinds[record.kind] += 1
        return {"latencies_ms": latencies_ms, "seconds": time.perf_counter() - started,
                "payload_bytes": payload_bytes, "kinds": kinds}

    @staticmethod
    async def _restore(task_id: str, sink: Any, spec: dict[str, Any]) -> dict[str, Any]:
        size, repeats = spec["size_bytes"], spec["repeats"]
        out: dict[str, float] = {}
        sequence = 0
        for chain in CHAIN_LENGTHS:
            base = document(size, 1)
            record = make_checkpoint(None, sequence, base, task_id=task_id, timestamp_ms=0, full_every=LIMITS.full_every,
                                     delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=0,
                                     chain_bytes_so_far=0)
            await sink.save(record)
            sequence, previous, position = record.sequence_number, base, (0, 0)
            for n in range(chain):
                current = document(size, n + 2)
                record = make_checkpoint(previous, sequence, current, task_id=task_id, timestamp_ms=0,
                                         full_every=LIMITS.full_every, delta_chain_bytes_max=LIMITS.delta_chain_bytes_max,
                                         chain_deltas_so_far=position[0], chain_bytes_so_far=position[1])
                assert record.kind == "delta", "the chain must be deltas"
                await sink.save(record)
                sequence, previous = record.sequence_number, current
                position = (position[0] + 1, position[1] + record.payload_bytes)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                restored = await sink.load()
                times.append((time.perf_counter() - t0) * 1000)
                assert restored is not None and restored.sequence_number == sequence and restored.problem is None
            out[str(chain)] = statistics.median(times)
        return out


async def run_tasks(agent: Any, client: Any, inputs: list[dict[str, Any]], timeout_s: float) -> list[dict[str, Any]]:
    from proto import coordinator_pb2 as pb

    specs = [pb.TaskSpec(type="ckpt_bench", input_json=json.dumps(i), max_attempts=1) for i in inputs]
    ids = list((await asyncio.to_thread(client.submit_dag, specs)).ordered_ids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = (await asyncio.to_thread(client.wait_tasks, ids, 5)).tasks
        if all(t.status in ("completed", "failed", "dead_letter", "cancelled") for t in tasks):
            bad = [t for t in tasks if t.status != "completed"]
            if bad:
                raise RuntimeError(f"ckpt_bench task {bad[0].id} {bad[0].status}: {bad[0].error}")
            return [json.loads(t.result_json) for t in tasks]
    raise RuntimeError(f"ckpt_bench tasks not final after {timeout_s} s")


def bytes_growing_agent(checkpoints: int = 200, step_bytes: int = 600) -> tuple[int, int]:
    """Payload bytes stored for an agent state that grows by one tool call per checkpoint: with
    make_checkpoint's deltas, and as full snapshots every time."""
    delta_total = full_total = 0
    previous, sequence, deltas, delta_bytes = None, 0, 0, 0
    for n in range(checkpoints):
        current = {"state_snapshot": {"turn": n, "scratchpad": "z" * 200},
                   "executed_actions": [{"id": f"call-{i}", "result": "r" * step_bytes} for i in range(n + 1)],
                   "remaining_plan": [{"id": f"call-{i}"} for i in range(n + 1, checkpoints)][:20]}
        record = make_checkpoint(previous, sequence, current, task_id="t", timestamp_ms=0, full_every=LIMITS.full_every,
                                 delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=deltas,
                                 chain_bytes_so_far=delta_bytes)
        delta_total += record.payload_bytes
        full_total += len(canonical_bytes(current))
        previous, sequence = current, record.sequence_number
        deltas, delta_bytes = (0, 0) if record.kind == "full" else (deltas + 1, delta_bytes + record.payload_bytes)
    return delta_total, full_total


async def main_async(args: argparse.Namespace) -> str:
    from cluster.agent import ExecutorAgent

    lines: list[str] = []
    started = time.monotonic()
    with OurCluster() as cluster:
        adapter = BenchAdapter()
        agent = ExecutorAgent(adapter, executor_id="ckpt-bench", name="ckpt-bench", executor_type="algorithmic",
                              capacity=args.concurrency, endpoints=[cluster.endpoints[0]],
                              credentials=cluster.credentials(cert_name="executor", subject="executor:ckpt-bench",
                                                              roles=("agent:executor",)))
        adapter.agent = agent
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            await agent.wait_connected(30)
            with cluster.client(cluster.endpoints) as client:
                lines.append("### (w) Write latency, one save at a time, and throughput with "
                             f"{args.concurrency} attempts saving at once\n")
                lines.append("| state | mode | saves | p50 ms | p99 ms | saves/s (1 writer) | fulls / deltas | "
                             f"payload bytes per save | saves/s ({args.concurrency} writers) | payload MB/s |")
                lines.append("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
                for size_kib in SIZES_KIB:
                    for mode in ("full", "delta"):
                        spec = {"what": "write", "size_bytes": size_kib * KIB, "saves": args.saves, "mode": mode}
                        one = (await run_tasks(agent, client, [spec], 600))[0]
                        many = await run_tasks(agent, client, [spec] * args.concurrency, 600)
                        lat = one["latencies_ms"]
                        wall = max(m["seconds"] for m in many)
                        total = sum(len(m["latencies_ms"]) for m in many)
                        mb = sum(m["payload_bytes"] for m in many) / wall / 1e6
                        lines.append(
                            f"| {size_kib} KiB | {mode} | {len(lat)} | {percentile(lat, 0.5):.2f} | "
                            f"{percentile(lat, 0.99):.2f} | {len(lat) / one['seconds']:,.0f} | "
                            f"{one['kinds']['full']} / {one['kinds']['delta']} | "
                            f"{one['payload_bytes'] // len(lat):,} | {total / wall:,.0f} | {mb:.1f} |")
                        print(lines[-1], file=sys.stderr)
                lines.append("")
                lines.append("### (r) RestoreCheckpoint against the delta-chain length (64 KiB state, median of "
                             f"{args.repeats})\n")
                restore_ms = (await run_tasks(agent, client, [{"what": "restore", "size_bytes": 64 * KIB,
                                                               "repeats": args.repeats}], 600))[0]
                lines.append("| deltas after the full | " + " | ".join(str(c) for c in CHAIN_LENGTHS) + " |")
                lines.append("|---|" + "---:|" * len(CHAIN_LENGTHS))
                lines.append("| restore ms | " + " | ".join(f"{restore_ms[str(c)]:.2f}" for c in CHAIN_LENGTHS) + " |")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 30)
    delta_total, full_total = bytes_growing_agent()
    lines.append("")
    lines.append("### (b) Bytes stored for a growing agent state (200 checkpoints, one ~600-byte tool call each)\n")
    lines.append(f"deltas {delta_total:,} bytes, full snapshots {full_total:,} bytes: **{full_total / delta_total:.1f}x "
                 "fewer with deltas** (target >= 5x)")
    lines.append("")
    lines.append(f"({machine_note()}; {time.monotonic() - started:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saves", type=int, default=200, help="checkpoints per series (>= 10)")
    ap.add_argument("--concurrency", type=int, default=8, help="attempts saving at once in the throughput run")
    ap.add_argument("--repeats", type=int, default=20, help="restores per chain length")
    args = ap.parse_args(argv)
    if args.saves < 10 or args.concurrency < 1 or args.repeats < 1:
        ap.error("--saves >= 10, --concurrency >= 1, --repeats >= 1")
    print(asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
