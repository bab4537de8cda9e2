"""LLM adapter overhead (issue 5): what `CloudRuAdapter.execute` adds per call over calling the
same OpenAI-compatible server directly with the `openai` client, and throughput with 16 tasks
running at once on one adapter (one executor), side by side in one run.

Two servers on 127.0.0.1, so the overhead is measured where it is visible:
- static: a minimal OpenAI-compatible responder of ours (a fixed completion with `usage`, HTTP/1.1
  keep-alive), so the server costs ~nothing and the difference is the adapter's own work
  (template rendering, resilience wrapper, health check cache, accounting, result envelope);
- tiny model: `transformers serve` on the tiny GPT-2 of tests/support (real generation,
  max_tokens=4), as the adapter meets a real server.
Calls alternate direct / adapter (A/B/A/B...) so drift on this shared machine hits both alike.

    python -m benchmarks.bench_llm                 # ~1 min
    python -m benchmarks.bench_llm --calls 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

from benchmarks.loadgen import machine_note

KEY = "sk-bench-not-a-secret"
MODEL = "zai-org/GLM-4.7"


class StaticServer:
    """POST /v1/chat/completions -> a fixed completion; GET /v1/models -> an empty list."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                               if line.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                if method == "POST" and path.endswith("/chat/completions"):
                    model = json.loads(body).get("model", MODEL)
                    payload = json.dumps({
                        "id": "c1", "object": "chat.completion", "created": 1, "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "OK"}}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}).encode()
                else:
                    payload = b'{"object": "list", "data": []}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def measure(base_url: str, model_alias: dict[str, str], calls: int, concurrency: int) -> dict[str, float]:
    import openai

    from executors.base import ExecutorTask, LocalContext
    from executors.cloudru import CloudRuAdapter, CloudRuConfig
    from executors.llm.adapter import LLMSettings

    served_model = model_alias.get(MODEL, MODEL)
    config = CloudRuConfig(base_url=base_url, preset="glm47", tier_models={"big": served_model},
                           settings=LLMSettings(request_timeout_s=60, running_tasks_max=max(64, concurrency)))
    adapter = CloudRuAdapter(config, env={"CLOUDRU_API_KEY": KEY}, rng=random.Random(1))
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Say OK."}]

    async def direct() -> None:
        await client.chat.completions.create(model=served_model, messages=messages, max_tokens=4)

    def task(n: int) -> ExecutorTask:
        return ExecutorTask(f"b{n}", 1, "chat", {"prompt": "Say OK.", "max_tokens": 4}, {"tier": "big"})

    async def via_adapter(n: int) -> None:
        await adapter.execute(task(n), LocalContext())

    try:
        for n in range(10):                                # warm-up: connections, health check, imports
            await direct()
            await via_adapter(-n - 1)
        direct_ms, adapter_ms = [], []
        for n in range(calls):
            t0 = time.perf_counter()
            await direct()
            t1 = time.perf_counter()
            await via_adapter(n)
            t2 = time.perf_counter()
            direct_ms.append((t1 - t0) * 1000)
            adapter_ms.append((t2 - t1) * 1000)
        total = calls * 2
        t0 = time.perf_counter()
        queue = iter(range(total))

        async def worker(fn) -> None:
            for n in queue:
                await fn(n)

        await asyncio.gather(*(worker(lambda n: direct()) for _ in range(concurrency)))
        direct_rate = total / (time.perf_counter() - t0)
        queue = iter(range(total))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(via_adapter) for _ in range(concurrency)))
        adapter_rate = total / (time.perf_counter() - t0)
    finally:
        await adapter.aclose()
        await client.close()
    return {"direct_p50": statistics.median(direct_ms), "direct_p99": pct(direct_ms, 0.99),
            "adapter_p50": statistics.median(adapter_ms), "adapter_p99": pct(adapter_ms, 0.99),
            "added_p50": statistics.median(a - d for a, d in zip(adapter_ms, direct_ms)),
            "direct_rate": direct_rate, "adapter_rate": adapter_rate}


async def main_async(args: argparse.Namespace) -> str:
    from tests.support.llm_server import TransformersServer
    from tests.support.tiny_model import build_tiny_model

    rows = []
    static = StaticServer()
    await static.start()
    try:
        rows.append(("static responder", await measure(static.base_url, {}, args.calls, args.concurrency)))
    finally:
        await static.stop()
    server = TransformersServer(build_tiny_model())
    server.start()
    try:
        rows.append(("transformers serve, tiny GPT-2, max_tokens 4",
                     await measure(server.base_url, {MODEL: server.model}, max(20, args.calls // 4), args.concurrency)))
    finally:
        server.stop()
    lines = [f"| server | direct p50 / p99 ms | adapter p50 / p99 ms | **added p50 ms** (paired) | direct tasks/s at "
             f"{args.concurrency} | adapter tasks/s at {args.concurrency} | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['direct_p50']:.2f} / {r['direct_p99']:.2f} | {r['adapter_p50']:.2f} / "
                     f"{r['adapter_p99']:.2f} | **{r['added_p50']:.2f}** | {r['direct_rate']:,.0f} | "
                     f"{r['adapter_rate']:,.0f} | {r['adapter_rate'] / r['direct_rate']:.2f} |")
    lines.append("")
    lines.append(f"({machine_note()})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="paired calls per server (>= 20)")
    ap.add_argument("--concurrency", type=int, default=16, help="tasks at once on one adapter")
    args = ap.parse_args(argv)
    if args.calls < 20 or not 1 <= args.concurrency <= 256:
        ap.error("--calls >= 20, --concurrency in 1..256")
    print(asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
