"""pytest fixtures for LLM adapter tests: a tiny model, a real `transformers serve`, a fault proxy.

Use them from any test module by loading this module as a plugin (once per session, so every
module shares one server):

    pytest_plugins = ["tests.support.llm_fixtures"]

    async def test_something(llm_server, fault_proxy):
        client = openai.AsyncOpenAI(base_url=fault_proxy.base_url, api_key="k", max_retries=0)
        fault_proxy.push(Status(429, retry_after_s=1))
        ...

Fixtures:
- `tiny_model_dir` (session): Path of the tiny GPT-2 (built once, then cached by content hash in
  $LLM_TEST_MODEL_CACHE or ~/.cache/agent-coordinator/llm-test).
- `llm_server` (session): a started `TransformersServer`; `.base_url` (…/v1), `.model` (the name
  requests must use), `.api_key`, `.pid`, `.start_s`, `.log_tail()`.
- `fault_proxy` (function): a fresh `FaultProxy` in front of `llm_server`, stopped after the test.
- `llm_timings` (session): dict with `model_build_s` and `server_start_s`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fault_proxy import FaultProxy
from tests.support.llm_server import TransformersServer
from tests.support.tiny_model import build_tiny_model

_TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def llm_timings() -> dict[str, float]:
    return _TIMINGS


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    t0 = time.monotonic()
    path = build_tiny_model()
    _TIMINGS["model_build_s"] = time.monotonic() - t0
    return path


@pytest.fixture(scope="session")
def llm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersServer]:
    log = tmp_path_factory.mktemp("llm-server") / "server.log"
    server = TransformersServer(tiny_model_dir, log_path=log)
    try:
        server.start()
        _TIMINGS["server_start_s"] = server.start_s or 0.0
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_proxy(llm_server: TransformersServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(llm_server.root_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()
