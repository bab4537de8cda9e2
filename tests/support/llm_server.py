"""A real OpenAI-compatible server on 127.0.0.1 for tests: `transformers serve` on a local model.

    from tests.support.llm_server import TransformersServer
    with TransformersServer(model_dir) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key)
        await client.chat.completions.create(model=server.model, messages=[...], max_tokens=8)

How `transformers serve` (transformers 5.x, `transformers/cli/serve.py`) is driven here:
- `transformers serve MODEL_DIR --host 127.0.0.1 --port N --device cpu`: the positional argument
  is `force_model`; the server loads it before it binds its port and serves only it. A request's
  `model` must then be exactly that string (or the server answers 400), so use `server.model`.
- Offline: with HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 every `from_pretrained` is forced to
  `local_files_only=True` and a local directory loads without any network. The CLI's entry point
  also asks PyPI whether a newer transformers exists; HF_HUB_DISABLE_UPDATE_CHECK=1 turns that off.
- Readiness: `GET /health` answers 200 once uvicorn is up, which is after the model was loaded.
- Requests with no `max_tokens` generate up to 1024 tokens (the server raises smaller defaults to
  1024); tests should pass a small `max_tokens`. `stream_options` is ignored with a warning; a
  streamed response always carries `usage` in its last chunk, and sends no `data: [DONE]`.
- `GET /v1/models` lists models found in the hub cache, not the forced one; we point HF_HOME at an
  empty private cache, so it answers an empty list.

The process is stopped by its PID: SIGTERM, then SIGKILL after `stop_timeout_s`, whatever happened
(also at interpreter exit if a test forgot)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS_MAX = 3


class ServerStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def offline_env(hf_home: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        HF_HOME=hf_home,
        TOKENIZERS_PARALLELISM="false",
        # Two shared cores: a 2-layer model gains nothing from more threads.
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
    )
    return env


def _transformers_cli() -> list[str]:
    """The `transformers` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("transformers")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "transformers.cli.transformers"]


class TransformersServer:
    """One `transformers serve` process serving `model_dir` on 127.0.0.1:`port` (free if None)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        extra_args: list[str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.host = host
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = list(extra_args or [])
        self._own_tmp = tempfile.mkdtemp(prefix="llm-server-")
        self.log_path = Path(log_path) if log_path else Path(self._own_tmp) / "server.log"
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None  # wall time from spawn to /health == 200

    # -- what clients need --
    @property
    def model(self) -> str:
        """The `model` every request must name (the server is pinned to it)."""
        return str(self.model_dir)

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    api_key = "test-key"  # the server checks none; the openai client insists on one

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- lifecycle --
    def start(self) -> TransformersServer:
        if self.proc is not None:
            raise ServerStartError("already started")
        hf_home = Path(self._own_tmp) / "hf-home"
        (hf_home / "hub").mkdir(parents=True, exist_ok=True)
        env = offline_env(str(hf_home))
        fixed_port = self.port is not None
        last_error = ""
        for _ in range(1 if fixed_port else PORT_ATTEMPTS_MAX):
            if not fixed_port:
                self.port = free_port(self.host)
            cmd = [
                *_transformers_cli(), "serve", str(self.model_dir),
                "--host", self.host, "--port", str(self.port),
                "--device", "cpu", "--log-level", "warning",
                *self.extra_args,
            ]  # fmt: skip
            t0 = time.monotonic()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self._own_tmp
                )
            atexit.register(self.stop)
            try:
                self._wait_ready(t0)
                self.start_s = time.monotonic() - t0
                return self
            except ServerStartError as exc:
                last_error = str(exc)
                self.stop()
                if "address already in use" not in last_error.lower():
                    break
        raise ServerStartError(last_error)

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.ready_timeout_s
        url = f"{self.root_url}/health"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"transformers serve exited with {code} before ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"transformers serve not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after stop_timeout_s; by PID; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> TransformersServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
