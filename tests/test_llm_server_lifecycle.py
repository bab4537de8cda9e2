"""The test server's lifecycle: a server that cannot start says why, and stop() ends the process by
its PID whatever it does with SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.llm_server import ServerStartError, TransformersServer

pytest_plugins = ["tests.support.llm_fixtures"]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie is gone, only unreaped
    except FileNotFoundError:
        return True


def test_server_that_cannot_load_its_model_reports_the_log(tmp_path):
    empty = tmp_path / "no-model-here"
    empty.mkdir()
    server = TransformersServer(empty, ready_timeout_s=60)
    with pytest.raises(ServerStartError) as info:
        server.start()
    assert "exited with" in str(info.value)
    assert str(empty) in str(info.value) or "config.json" in str(info.value)
    assert server.pid is None  # stopped and forgotten


def test_stop_escalates_to_sigkill(tmp_path):
    server = TransformersServer(tmp_path, stop_timeout_s=0.5)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    server.proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE)
    assert server.proc.stdout.readline() == b"up\n"  # SIGTERM is ignored from here on
    pid = server.pid
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 5
    assert _gone(pid)
    server.stop()  # twice is fine


def test_session_server_is_up(llm_server):
    assert llm_server.pid is not None and not _gone(llm_server.pid)
    assert llm_server.start_s is not None and llm_server.start_s < llm_server.ready_timeout_s
