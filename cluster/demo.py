"""`make demo`: a local 3-node cluster, a sample DAG, a leader crash, and the state surviving it.

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
    shown = "coordctl " + " ".join(args)
    console.print(f"\n[bold cyan]$ {shown}[/bold cyan]")
    env = {**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, text=True,
                            capture_output=capture, timeout=120, check=False)
    if result.returncode != 0:
        if capture:
            sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"demo step failed: {shown} (exit {result.returncode})")
    return result.stdout if capture else ""


def main() -> None:
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    cluster = LocalCluster(DATA_DIR)
    try:
        console.rule("1. start a local 3-node cluster (Raft over an fsync'd LMDB journal)")
        coordctl("cluster", "up", "--nodes", "3")
        cluster = LocalCluster(DATA_DIR)  # reads the cluster.json that `cluster up` wrote
        coordctl("cluster", "status")

        console.rule("2. submit a sample DAG atomically, then one task with an idempotency key, twice")
        coordctl("dag", "submit", SAMPLE_DAG)
        coordctl("task", "submit", "--type", "echo", "--input", '{"hello": "world"}', "--priority", "90",
                 "--deadline", "+5m", "--idempotency-key", "demo-1")
        coordctl("task", "submit", "--type", "echo", "--input", '{"hello": "world"}', "--idempotency-key", "demo-1")
        coordctl("task", "list")

        console.rule("3. bad input is rejected whole, naming the field and the limit")
        for args in (["--type", "echo", "--priority", "150"], ["--type", "echo", "--depends-on", "t-missing"]):
            console.print(f"\n[bold cyan]$ coordctl task submit {' '.join(args)}[/bold cyan]")
            result = subprocess.run([sys.executable, "-m", "cluster.cli", "task", "submit", *args],
                                    env={**os.environ, "COORDCTL_DATA_DIR": DATA_DIR}, text=True,
                                    capture_output=True, timeout=60, check=False)
            console.print(result.stderr.strip(), highlight=False)

        console.rule("4. SIGKILL the leader; a new one is elected and every task is still there")
        leader = cluster.wait_leader()
        started = time.monotonic()
        cluster.kill_node(leader)
        new_leader = cluster.wait_leader(exclude=leader)
        console.print(f"killed leader {leader}; {new_leader} leads after {time.monotonic() - started:.2f} s")
        coordctl("task", "submit", "--type", "echo", "--input", '{"after": "failover"}')
        coordctl("cluster", "status")
        cluster.start_node(leader)
        cluster.wait_converged()
        console.print(f"{leader} restarted from its own disk and caught up")
        listed = json.loads(coordctl("task", "list", "--output", "json", "--linearizable", capture=True))
        console.print(f"{listed['total_matching']} tasks on the cluster after the crash")

        console.rule("5. the committed event stream, from any node")
        coordctl("events", "watch", "--from-index", "1", "--count", "6", "--timeout", "5")

        console.print(
            "\n[yellow]Executors are not built yet (next issue: scheduler and dispatch), so tasks stay "
            "'pending'; this demo shows the replicated, durable task store they will run on.[/yellow]"
        )
    finally:
        console.rule("6. stop the cluster")
        cluster.down()
        console.print(f"data kept in {DATA_DIR} (remove it freely)")


if __name__ == "__main__":
    main()
