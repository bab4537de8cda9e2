"""Scheduler benchmarks: `python -m benchmarks.bench_scheduler [--quick] [--json PATH]`.

(i) Decision cost: one `select()` (plus applying its one assignment and queueing a replacement,
    so the queue size stays constant) with 1k, 10k and 100k ready tasks spread over all 101
    priorities with random deadlines. Must stay flat within ~2x: the deadline-aware pick compares
    the <= 101 bucket heads, never the whole queue.
(ii) Scheduling quality on every shared workload (../shared/workloads/*.dag.json), simulated on
    K one-slot executors with a fake clock: makespan / lower bound, where lower bound =
    max(critical path, total work / K), and the deadline hit rate when each task's deadline is
    its latest finish for the DAG to end by lower_bound * (1 + slack). Also shown, to tell a loose
    bound from a poor schedule (the target stays defined against lower bound): makespan over two
    tighter valid bounds, the energetic one and the "cut" one (energetic + precedence cuts +
    pigeonhole, `simulate.cut_lower_bound_ms`; >= the energetic one).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from scheduler.policies import get_policy
from scheduler.queue import ReadyQueue
from scheduler.simulate import cut_lower_bound_ms, energetic_lower_bound_ms, load_workload, simulate_workload
from scheduler.view import ExecutorView, SchedulerView, TaskView

WORKLOADS_DIR = Path(__file__).resolve().parents[2] / "shared" / "workloads"
QUEUE_SIZES = (1_000, 10_000, 100_000)
DECISIONS_PER_SIZE = 3_000
EXECUTOR_COUNTS = (4, 16)
DEADLINE_SLACK = 0.1
POLICIES = ("fifo", "deadline_aware", "critical_path")


def decision_cost(sizes: tuple[int, ...], decisions: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for policy_name in ("deadline_aware", "fifo", "critical_path"):
        policy = get_policy(policy_name)
        for size in sizes:
            queue = ReadyQueue()
            seq = 0

            def make_task(priority: int | None = None) -> TaskView:
                nonlocal seq
                seq += 1
                deadline_ms = 0 if rng.random() < 0.3 else now_ms + rng.randint(1, 3_600_000)
                priority = rng.randint(0, 100) if priority is None else priority
                return TaskView(f"t{seq}", "a", priority, deadline_ms, seq, (), rng.choice([None, 1.0, 30.0]),
                                rng.random() * 100)

            now_ms = 0

            for _ in range(size):
                queue.add(make_task())
            executors = tuple(ExecutorView(f"e{i}", "algorithmic", frozenset({"a"}), 4, 3) for i in range(8))
            view = SchedulerView(queue, executors)
            samples_us = []
            for _ in range(decisions):
                now_ms += rng.randint(0, 2_000)
                started = time.perf_counter_ns()
                plan = policy.select(view, now_ms, 1)
                samples_us.append((time.perf_counter_ns() - started) / 1000)
                for a in plan.assignments:  # keep the queue size and priority mix constant
                    removed = queue.remove(a.task_id)
                    queue.add(make_task(removed.priority))
            samples_us.sort()
            rows.append({
                "policy": policy_name, "ready_tasks": size,
                "us_per_decision_p50": round(statistics.median(samples_us), 1),
                "us_per_decision_p99": round(samples_us[int(len(samples_us) * 0.99) - 1], 1),
                "us_per_decision_mean": round(statistics.fmean(samples_us), 1),
            })
    return rows


def quality(executor_counts: tuple[int, ...]) -> list[dict]:
    rows = []
    for path in sorted(WORKLOADS_DIR.glob("*.dag.json")):
        workload = load_workload(path)
        for k in executor_counts:
            tight_ms = energetic_lower_bound_ms(workload.tasks, k)
            cut_ms = cut_lower_bound_ms(workload.tasks, k)
            for policy_name, estimates in [(p, True) for p in POLICIES] + [("deadline_aware", False)]:
                result = simulate_workload(workload, k, get_policy(policy_name), deadline_slack=DEADLINE_SLACK,
                                           estimates=estimates)
                rows.append({
                    "workload": workload.name, "tasks": len(workload.tasks), "executors": k,
                    "policy": policy_name + ("" if estimates else " (no runtime estimates)"),
                    "lower_bound_s": result.lower_bound_ms / 1000, "makespan_s": result.sim.makespan_ms / 1000,
                    "makespan_over_lb": round(result.makespan_over_lower_bound, 3),
                    "makespan_over_tight_lb": round(result.sim.makespan_ms / tight_ms, 3) if tight_ms else 1.0,
                    "cut_lb_s": cut_ms / 1000,
                    "makespan_over_cut_lb": round(result.sim.makespan_ms / cut_ms, 3) if cut_ms else 1.0,
                    "deadline_hit_rate": round(result.sim.deadline_hit_rate, 3),
                })
    return rows


def print_tables(cost: list[dict], qual: list[dict]) -> None:
    print("## Decision cost (one select(), slots_max=1, window 64)\n")
    print("| policy | ready tasks | µs/decision p50 | p99 | mean |")
    print("|---|---:|---:|---:|---:|")
    for r in cost:
        print(f"| {r['policy']} | {r['ready_tasks']:,} | {r['us_per_decision_p50']} | {r['us_per_decision_p99']} | {r['us_per_decision_mean']} |")
    for policy_name in sorted({r["policy"] for r in cost}):
        p50 = [r["us_per_decision_p50"] for r in cost if r["policy"] == policy_name]
        print(f"\n{policy_name}: largest/smallest p50 = {max(p50) / min(p50):.2f}x", end="")
    print("\n")
    print(f"## Scheduling quality (K one-slot executors; deadlines = latest finish, slack {DEADLINE_SLACK:.0%})\n")
    print("| workload | K | policy | makespan / LB | makespan / energetic LB | makespan / cut LB | deadline hits |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in qual:
        print(f"| {r['workload']} | {r['executors']} | {r['policy']} | {r['makespan_over_lb']:.3f} | "
              f"{r['makespan_over_tight_lb']:.3f} | {r['makespan_over_cut_lb']:.3f} | {r['deadline_hit_rate']:.0%} |")
    default = [r for r in qual if r["policy"] == "deadline_aware"]
    fifo = {(r["workload"], r["executors"]): r for r in qual if r["policy"] == "fifo"}
    within = sum(1 for r in default if r["makespan_over_lb"] <= 1.10)
    ahead = sum(1 for r in default if r["deadline_hit_rate"] > fifo[(r["workload"], r["executors"])]["deadline_hit_rate"])
    tied = sum(1 for r in default if r["deadline_hit_rate"] == fifo[(r["workload"], r["executors"])]["deadline_hit_rate"])
    within_cut = sum(1 for r in default if r["makespan_over_cut_lb"] <= 1.10)
    worst_cut = max(default, key=lambda r: r["makespan_over_cut_lb"])
    print(f"\ndeadline_aware: within 10% of LB in {within}/{len(default)} runs (of the cut LB, a tighter valid bound: "
          f"{within_cut}/{len(default)}, worst {worst_cut['makespan_over_cut_lb']:.3f} on {worst_cut['workload']} "
          f"K={worst_cut['executors']}); deadline hits ahead of FIFO in "
          f"{ahead}, tied in {tied}, behind in {len(default) - ahead - tied} of {len(default)}; "
          f"mean hit rate {statistics.fmean(r['deadline_hit_rate'] for r in default):.1%} vs FIFO "
          f"{statistics.fmean(r['deadline_hit_rate'] for r in fifo.values()):.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decisions per size")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    cost = decision_cost(QUEUE_SIZES, 500 if args.quick else DECISIONS_PER_SIZE)
    qual = quality(EXECUTOR_COUNTS)
    print_tables(cost, qual)
    if args.json:
        args.json.write_text(json.dumps({"decision_cost": cost, "quality": qual}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
