"""(f) The ceiling of Python RPC on this machine: a trivial gRPC echo.

One unary method (``/bench.Echo/Echo``), bytes in and bytes out through a generic handler with
identity serializers (no .proto, no codegen). The server runs in its own process on a free
127.0.0.1 port; the client (a ``grpc.aio`` channel driven by ``benchmarks.loadgen``) runs in
another process, so neither shares a process or GIL with the other.

    python -m benchmarks.bench_echo                      # aio server, concurrency 1 and 64, 5 s each
    python -m benchmarks.bench_echo --server sync        # sync thread-pool server instead
    python -m benchmarks.bench_echo --duration 3 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import signal
import subprocess
import sys
import threading
from concurrent import futures

from benchmarks.loadgen import (
    REPO_ROOT, Result, _child_env, machine_note, markdown_table, run_closed_loop, run_in_subprocess,
)

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


# --------------------------------------------------------------------------- server (own process)


def _exit_when_parent_goes() -> None:
    """The server reads stdin; EOF means the parent is gone, so exit (belt to the PID kill)."""

    def watch() -> None:
        try:
            sys.stdin.buffer.read()
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _handler(behaviour):
    import grpc

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {"Echo": grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=None, response_serializer=None)},
    )


async def _serve_aio() -> None:
    import grpc

    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(echo),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


def _serve_sync(workers: int = 16) -> None:
    import grpc

    def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((_handler(echo),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


def serve(kind: str = "aio") -> None:
    _exit_when_parent_goes()
    if kind == "aio":
        asyncio.run(_serve_aio())
    else:
        _serve_sync()


class EchoServer:
    """The echo server in its own process; always stopped by PID (use as a context manager)."""

    def __init__(self, kind: str = "aio", start_timeout_s: float = 15.0) -> None:
        self.kind = kind
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> EchoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_echo", "--serve", "--server", self.kind],
            cwd=REPO_ROOT, env=_child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            self.port = _read_port(self.proc, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_port(proc: subprocess.Popen, timeout_s: float) -> int:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout_s):
            raise TimeoutError(f"echo server gave no port within {timeout_s} s")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line.startswith("PORT "):
        raise RuntimeError(f"echo server said {line!r} (exit code {proc.poll()})")
    return int(line.split()[1])


# --------------------------------------------------------------------------- client (other process)


async def echo_client(
    port: int, concurrency: int, duration_s: float = 5.0, warmup_s: float = 1.0,
    payload_bytes: int = 16, name: str = "echo",
) -> Result:
    """The load client: one grpc.aio channel, ``concurrency`` closed-loop callers."""
    import grpc

    payload = b"x" * payload_bytes
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def op() -> None:
            reply = await call(payload)
            if reply != payload:
                raise RuntimeError("echo mismatch")

        return await run_closed_loop(
            op, concurrency, duration_s=duration_s, warmup_s=warmup_s, op_timeout_s=5.0,
            max_seconds=warmup_s + duration_s + 30, name=name,
        )


def run_echo(concurrency: int, duration_s: float = 5.0, *, server: str = "aio", warmup_s: float = 1.0) -> Result:
    """Start an echo server process, drive it from a client process, return the client's Result."""
    with EchoServer(server) as srv:
        return run_in_subprocess(
            "benchmarks.bench_echo:echo_client",
            {"port": srv.port, "concurrency": concurrency, "duration_s": duration_s,
             "warmup_s": warmup_s, "name": f"grpc echo ({server} server)"},
            timeout_s=warmup_s + duration_s + 60,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", choices=("aio", "sync"), default="aio")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.server)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` kills the server
    rows = [run_echo(c, args.duration, server=args.server, warmup_s=args.warmup) for c in args.concurrency]
    print(markdown_table(rows))
    cpu = ", ".join(f"c={r.concurrency}: {r.extra.get('client_cpu_pct')}" for r in rows)
    print("client CPU % (one Python process):", cpu)
    print(machine_note())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
