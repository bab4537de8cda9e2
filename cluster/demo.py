"""`make demo`: a local 3-node cluster with built-in executors runs a sample DAG; then the leader
and an executor are killed mid-run and the work still completes, exactly once.

Every step runs the real `coordctl` in a subprocess, so what you see is what you would type.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from rich.console import Console

from cluster.local import LocalCluster

console = Console(width=None if sys.stdout.isatty() else 120)
DATA_DIR = os.path.abspath(".coord-demo")
SAMPLE_DAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_dag.yaml")


def coordctl(*args: str, capture: bool = False) -> str:
    ids = [a for a in args if a.startswith("t-")]
    shown_args = [a for a in args if not a.startswith("t-")]
    if len(ids) > 3:  # a long list of task ids would bury the command
        shown_args[2:2] = [ids[0], f"… ({len(ids)} task ids)"]
    else:
        shown_args = list(args)
    shown = "coordctl " + " ".join(shown_args)
    console.print(f"\n[bold cyan]$ {shown}[/bold cyan]")
    env = {**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, text=True,
                            capture_output=capture, timeout=120, check=False)
    if result.returncode != 0:
        if capture:
            sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"demo step failed: {shown} (exit {result.returncode})")
    return result.stdout if capture else ""


def executor_trace_file(name: str) -> str:
    return os.path.join(DATA_DIR, f"executor-{name}.traces.jsonl")


def start_executor(name: str, capacity: int) -> subprocess.Popen:
    log = open(os.path.join(DATA_DIR, f"executor-{name}.log"), "ab")  # noqa: SIM115
    traces = executor_trace_file(name)
    console.print(f"[bold cyan]$ coordctl executor run --type algorithmic --name {name} --capacity {capacity} "
                  f"--trace-file {os.path.relpath(traces)} --trace-sample-ratio 1 &[/bold cyan]")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "executor", "run", "--type", "algorithmic",
                             "--name", name, "--capacity", str(capacity), "--trace-file", traces,
                             "--trace-sample-ratio", "1"],
                            env={**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc


def main() -> None:
    if os.path.exists(os.path.join(DATA_DIR, "cluster.json")):
        LocalCluster(DATA_DIR).down()  # a previous demo that was interrupted
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    cluster = LocalCluster(DATA_DIR)
    executors: list[subprocess.Popen] = []
    try:
        console.rule("1. start a local 3-node cluster (Raft over an fsync'd LMDB journal)")
        coordctl("cluster", "up", "--nodes", "3", "--trace-sample-ratio", "1")
        cluster = LocalCluster(DATA_DIR)  # reads the cluster.json that `cluster up` wrote
        coordctl("cluster", "status")

        console.rule("2. start two built-in executors (echo, sleep, fail, code_analysis)")
        executors.append(start_executor("worker-a", 4))
        executors.append(start_executor("worker-b", 4))
        coordctl("executor", "list")

        console.rule("3. submit a sample DAG atomically and wait for it; then one task with an idempotency key, twice")
        cli_traces = os.path.join(DATA_DIR, "coordctl.traces.jsonl")
        submitted = json.loads(coordctl("--trace-file", cli_traces, "dag", "submit", SAMPLE_DAG, "--output", "json",
                                        capture=True))
        for name, task_id in submitted["task_ids"].items():
            console.print(f"  {name:14} {task_id}")
        coordctl("task", "wait", *submitted["task_ids"].values(), "--timeout", "60")
        analysis_id = submitted["task_ids"]["analyse-code"]
        shown = json.loads(coordctl("task", "show", analysis_id, "--output", "json", capture=True))
        console.print("result of analyse-code:", json.loads(shown["result_json"] or "null"))
        coordctl("task", "submit", "--type", "echo", "--input", '{"hello": "world"}', "--priority", "90",
                 "--deadline", "+5m", "--idempotency-key", "demo-1")
        coordctl("task", "submit", "--type", "echo", "--input", '{"hello": "world"}', "--idempotency-key", "demo-1")
        coordctl("task", "list")

        console.rule("4. bad input is rejected whole, naming the field and the limit")
        for args in (["--type", "echo", "--priority", "150"], ["--type", "echo", "--depends-on", "t-missing"]):
            console.print(f"\n[bold cyan]$ coordctl task submit {' '.join(args)}[/bold cyan]")
            result = subprocess.run([sys.executable, "-m", "cluster.cli", "task", "submit", *args],
                                    env={**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}, text=True,
                                    capture_output=True, timeout=60, check=False)
            console.print(result.stderr.strip(), highlight=False)

        console.rule("5. a 200-task DAG; SIGKILL the leader and one executor mid-run")
        executors.append(start_executor("worker-c", 4))
        big = os.path.join(DATA_DIR, "chains.json")
        with open(big, "w") as f:
            json.dump({"tasks": [{"name": f"n{i}", "type": "sleep", "input": {"ms": 150},
                                  "depends_on": [f"n{i - 1}"] if i % 20 else []} for i in range(200)]}, f)
        chains = json.loads(coordctl("dag", "submit", big, "--output", "json", capture=True))
        time.sleep(1.0)
        leader = cluster.wait_leader()
        started = time.monotonic()
        cluster.kill_node(leader)
        executors[0].kill()
        new_leader = cluster.wait_leader(exclude=leader)
        console.print(f"killed leader {leader} and executor worker-a; {new_leader} leads after "
                      f"{time.monotonic() - started:.2f} s")
        waited = json.loads(coordctl("task", "wait", *chains["task_ids"].values(), "--timeout", "120",
                                     "--output", "json", capture=True))
        outcomes: dict[str, int] = {}
        for task in waited["tasks"]:
            outcomes[task["status"]] = outcomes.get(task["status"], 0) + 1
        moved = sum(1 for task in waited["tasks"] if any(a["outcome"] == "lost" for a in task["attempts"]))
        console.print(f"the 200-task DAG: {outcomes}; {moved} attempts were taken back from worker-a and "
                      "ran again elsewhere; every task completed once")
        coordctl("cluster", "status")
        cluster.start_node(leader)
        cluster.wait_converged()
        console.print(f"{leader} restarted from its own disk and caught up (same state hash on every node)")

        console.rule("6. a 30-step task checkpoints after each step; SIGKILL its executor midway: it resumes elsewhere")
        names = {"worker-b": executors[1], "worker-c": executors[2]}
        steps_id = coordctl("task", "submit", "--type", "steps", "--input", '{"steps": 30, "step_ms": 100}',
                            "--output", "json", capture=True)
        steps_id = json.loads(steps_id)["task_id"]
        deadline = time.monotonic() + 30
        runner = ""
        while time.monotonic() < deadline:
            task = json.loads(coordctl("task", "show", steps_id, "--output", "json", capture=True))
            if task["status"] == "executing" and int(task.get("checkpoint_sequence") or 0) >= 10:
                runner = task["assigned_executor"]
                break
            time.sleep(0.1)
        if runner in names:
            names[runner].kill()
            console.print(f"killed {runner}, which ran it, after checkpoint {task['checkpoint_sequence']}")
            executors.append(start_executor("worker-d", 4))
        waited = json.loads(coordctl("task", "wait", steps_id, "--timeout", "60", "--output", "json", capture=True))
        result = json.loads(waited["tasks"][0]["result_json"] or "null") or {}
        by_attempt: dict[int, list[int]] = {}
        for step in result.get("steps", []):
            by_attempt.setdefault(step["attempt"], []).append(step["step"])
        for attempt, done in sorted(by_attempt.items()):
            console.print(f"  attempt {attempt} ran steps {done[0]}..{done[-1]}")
        console.print(f"resumed from checkpoint {result.get('resumed_from_sequence')}; no step ran twice")
        coordctl("checkpoint", "list", steps_id)

        console.rule("7. the committed event stream, from any node")
        coordctl("events", "watch", "--from-index", "1", "--count", "12", "--timeout", "5")

        console.rule("8. security: every call is mTLS + a JWT, checked by RBAC and audited")
        console.print("[bold cyan]$ coordctl --token not-a-jwt task list[/bold cyan]")
        refused = subprocess.run([sys.executable, "-m", "cluster.cli", "--token", "not-a-jwt", "task", "list"],
                                 env={**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}, text=True, capture_output=True,
                                 timeout=120, check=False)
        console.print(refused.stderr.strip() or refused.stdout.strip(), highlight=False)
        viewer = coordctl("token", "issue", "--subject", "viewer", "--role", "operator:level1", "--ttl", "300",
                          capture=True).strip()
        console.print("[bold cyan]$ coordctl --token $VIEWER task cancel …  (operator:level1 may read, not cancel)"
                      "[/bold cyan]")
        denied = subprocess.run([sys.executable, "-m", "cluster.cli", "--token", viewer, "task", "cancel", steps_id],
                                env={**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}, text=True, capture_output=True,
                                timeout=120, check=False)
        console.print(denied.stderr.strip() or denied.stdout.strip(), highlight=False)
        time.sleep(1.5)  # access decisions reach the audit chain within a second
        coordctl("audit", "list", "--outcome", "denied", "--last", "5")
        coordctl("audit", "verify")

        console.rule("9. observability: the sample DAG's trace across processes, metrics, a frame of `top`")
        listed = json.loads(coordctl("trace", "list", "--file", cli_traces, "--output", "json", capture=True))
        dag_trace = next(t["trace_id"] for t in reversed(listed["traces"]) if t["root"] == "coordctl dag")
        coordctl("trace", "show", dag_trace, "--file", cli_traces,
                 *(a for name in ("worker-a", "worker-b", "worker-c", "worker-d")
                   if os.path.exists(executor_trace_file(name)) for a in ("--file", executor_trace_file(name))))
        node = next(n for n in cluster.nodes if n.id != leader)   # counters start at a node's start
        console.print(f"\n[bold cyan]$ curl -s http://{node.metrics_address}/metrics | grep -E "
                      "'^(raft_is_leader|tasks_total|dispatch_latency_seconds_count)'[/bold cyan]")
        import urllib.request

        with urllib.request.urlopen(f"http://{node.metrics_address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(("raft_is_leader", "tasks_total", "dispatch_latency_seconds_count")):
                    console.print(line, highlight=False)
        coordctl("top", "--once")
    finally:
        console.rule("10. stop the executors and the cluster")
        for proc in executors:
            if proc.poll() is None:
                proc.terminate()
        for proc in executors:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster = LocalCluster(DATA_DIR)
        cluster.down()
        console.print(f"data kept in {DATA_DIR} (remove it freely)")


if __name__ == "__main__":
    main()
