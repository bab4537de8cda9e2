"""Executor agent processes for cluster tests, and waits bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cluster.client import CoordinatorClient
from cluster.local import LocalCluster
from proto import coordinator_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Executors:
    """Executor agent processes (`coordctl executor run`), stopped by PID whatever happens."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, capacity: int = 4, *, executor_type: str = "algorithmic",
              env: dict[str, str] | None = None, args: list[str] | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.cluster.data_dir, f"executor-{name}.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "executor", "run", "--type", executor_type, "--name", name,
             "--capacity", str(capacity), "--endpoints", ",".join(self.cluster.endpoints), "--data-dir", self.cluster.data_dir,
             *(args or ())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.procs[name] = proc
        return proc

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)


def wait_online(client: CoordinatorClient, count: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = client.call("ListExecutors", pb.ListExecutorsRequest())
        if sum(1 for e in listed.executors if e.status == "online") >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} executors online after {timeout_s} s")


def wait_final(client: CoordinatorClient, ids: list[str], timeout_s: float) -> list[pb.Task]:
    deadline = time.monotonic() + timeout_s
    tasks: list[pb.Task] = []
    while time.monotonic() < deadline:
        tasks = []
        for start in range(0, len(ids), 1000):
            tasks += list(client.wait_tasks(ids[start:start + 1000], 5).tasks)
        if all(t.status in ("completed", "failed", "cancelled", "dead_letter") for t in tasks):
            return tasks
    statuses: dict[str, int] = {}
    for t in tasks:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    raise AssertionError(f"not final after {timeout_s} s: {statuses}")
