"""A small closed-loop load generator, reusable by every benchmark.

``run_closed_loop(op, concurrency, ...)`` runs ``concurrency`` asyncio workers; each worker calls
``await op()`` (one request), waits for it, records its latency, and calls again. A warm-up period
is run first and excluded from the numbers. Every loop is bounded in both count and time: a run
stops at the measurement deadline, or after ``count`` measured operations, or at a hard deadline,
whichever comes first, and each ``op()`` gets its own timeout.

``run_in_subprocess("pkg.module:function", kwargs)`` runs a client function in a fresh Python
process (so it never shares a process or GIL with the server it drives) and returns its result,
passed back as JSON on the child's stdout. The child is started as
``python -m benchmarks.loadgen --call pkg.module:function --kwargs '{...}'``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "LOADGEN_RESULT "


@dataclass
class Result:
    """What one closed-loop run measured. Latencies are in milliseconds."""

    name: str
    concurrency: int
    ops: int  # successful operations completed inside the measurement window
    seconds: float  # length of the measurement window
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # failed or timed-out operations inside the window
    mean_ms: float = 0.0
    max_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        return cls(**d)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def run_closed_loop(
    op: Callable[[], Awaitable[Any]],
    concurrency: int,
    *,
    duration_s: float | None = 5.0,
    count: int | None = None,
    warmup_s: float = 1.0,
    op_timeout_s: float = 5.0,
    max_seconds: float = 120.0,
    name: str = "",
) -> Result:
    """Drive ``op`` with ``concurrency`` closed-loop workers and measure it.

    Measures for ``duration_s`` seconds after ``warmup_s`` of warm-up, or until ``count`` measured
    operations have completed (give ``duration_s=None`` for a pure count run), never longer than
    ``max_seconds`` in total. An operation counts (throughput, latency, errors) if it completes
    inside the measurement window; no operation is started after the window ends.
    An exception or a timeout (``op_timeout_s``) counts as an error; workers go on after errors.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if duration_s is None and count is None:
        raise ValueError("give duration_s or count")
    loop = asyncio.get_running_loop()
    start = loop.time()
    cpu0 = time.process_time()
    hard_deadline = start + max_seconds
    measure_from = start + warmup_s
    measure_until = min(hard_deadline, measure_from + duration_s) if duration_s else hard_deadline
    latencies: list[float] = []
    errors = 0
    done = asyncio.Event()
    last_ok = [measure_from]

    async def worker() -> None:
        nonlocal errors
        while not done.is_set():
            t0 = loop.time()
            if t0 >= measure_until:
                break
            ok = True
            try:
                await asyncio.wait_for(op(), op_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                ok = False
            t1 = loop.time()
            if measure_from <= t1 <= measure_until:
                if ok and count is not None and len(latencies) >= count:
                    break
                if ok:
                    latencies.append(t1 - t0)
                    last_ok[0] = t1
                    if count is not None and len(latencies) >= count:
                        done.set()
                else:
                    errors += 1
            if not ok:
                # Back off a little so a dead target cannot turn the loop into a busy spin.
                await asyncio.sleep(0.001)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        # Workers stop by themselves at measure_until; wait a bounded extra time for stragglers.
        await asyncio.wait(tasks, timeout=(measure_until - loop.time()) + op_timeout_s + 1)
    finally:
        done.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if duration_s is not None and (count is None or len(latencies) < count):
        seconds = measure_until - measure_from
    else:
        seconds = last_ok[0] - measure_from
    seconds = max(seconds, 1e-9)
    wall = loop.time() - start
    cpu = time.process_time() - cpu0
    latencies.sort()
    ms = [x * 1000.0 for x in latencies]
    return Result(
        name=name,
        concurrency=concurrency,
        ops=len(ms),
        seconds=round(seconds, 3),
        ops_per_s=round(len(ms) / seconds, 1),
        p50_ms=round(percentile(ms, 50), 3),
        p99_ms=round(percentile(ms, 99), 3),
        errors=errors,
        mean_ms=round(sum(ms) / len(ms), 3) if ms else float("nan"),
        max_ms=round(ms[-1], 3) if ms else float("nan"),
        # CPU used by this (client) process over the whole run, warm-up included: near 100 means
        # the client's one core, not the target, may be the limit.
        extra={"client_cpu_pct": round(100.0 * cpu / wall, 1) if wall > 0 else None},
    )


# --------------------------------------------------------------------------- separate processes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_in_subprocess(target: str, kwargs: dict[str, Any] | None = None, *, timeout_s: float = 120.0) -> Result:
    """Run ``target`` ("module:function") with ``kwargs`` in a new Python process; return its Result.

    The function may be sync or async and must return a ``Result`` (or a dict of its fields). The
    child is killed if it runs longer than ``timeout_s``.
    """
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--call", target, "--kwargs", json.dumps(kwargs or {})]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout_s
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return Result.from_dict(json.loads(line[len(RESULT_MARKER):]))
    raise RuntimeError(
        f"{target} in a subprocess gave no result (exit {proc.returncode}):\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )


def _resolve(target: str) -> Callable[..., Any]:
    module_name, _, func_name = target.partition(":")
    if not func_name:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    return getattr(importlib.import_module(module_name), func_name)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a benchmark client function and print its Result as JSON.")
    ap.add_argument("--call", required=True, help="module:function returning a Result")
    ap.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    args = ap.parse_args(argv)
    func = _resolve(args.call)
    kwargs = json.loads(args.kwargs)
    out = func(**kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    if dataclasses.is_dataclass(out):
        # Not isinstance(out, Result): run as __main__, this module's Result is a different class.
        out = dataclasses.asdict(out)
    print(RESULT_MARKER + json.dumps(out), flush=True)
    return 0


def machine_note() -> str:
    """One line about the machine, to print next to results: the numbers move with other load."""
    l1, l5, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {l1:.2f} (1 min) / {l5:.2f} (5 min) at the end of the run"


def markdown_table(rows: list[Result]) -> str:
    """A small markdown table of results."""
    head = "| benchmark | concurrency | ops | seconds | ops/s | p50 ms | p99 ms | errors |\n"
    head += "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r.name} | {r.concurrency} | {r.ops} | {r.seconds:.1f} | {r.ops_per_s:,.0f} | "
        f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} |\n"
        for r in rows
    )
    return head + body


if __name__ == "__main__":
    raise SystemExit(_main())


def die_with_parent() -> None:
    """preexec_fn: on Linux, have the kernel SIGKILL the child if this process dies (even by
    SIGKILL), so no server outlives a killed benchmark. Best effort; the PID kill in each
    benchmark's cleanup is the normal path."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on `host` (all bound at once, so they differ)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
