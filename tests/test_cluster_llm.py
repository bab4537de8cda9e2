"""End to end on a real 3-node cluster: a DAG whose tasks go to a `local_llm` executor (a real
`transformers serve` on the tiny GPT-2 of tests/support) and a `specialized_ml` executor (the
offline all-MiniLM-L6-v2 and the code analyzer), both agent processes; every task completes, in
dependency order, with token counts and costs recorded in its result."""

from __future__ import annotations

import json

import pytest


from proto import coordinator_pb2 as pb
from tests.executor_pool import wait_final, wait_online

pytestmark = [pytest.mark.cluster]
pytest_plugins = ["tests.support.llm_fixtures"]


def spec(name: str, task_type: str, task_input: dict, depends_on: tuple[str, ...] = ()) -> pb.TaskSpec:
    return pb.TaskSpec(name=name, type=task_type, input_json=json.dumps(task_input), depends_on=list(depends_on))


def test_a_dag_runs_on_a_local_llm_and_a_specialized_ml_executor(cluster3, executors, llm_server) -> None:
    executors.start("llm", capacity=4, executor_type="local_llm",
                    env={"LOCAL_LLM_ENDPOINTS": llm_server.base_url, "LOCAL_LLM_MODEL": llm_server.model})
    executors.start("ml", capacity=2, executor_type="specialized_ml")
    dag = [
        spec("triage", "classify", {"text": "the server returned HTTP 503 after the deploy",
                                    "labels": {"outage": "a service outage or server error",
                                               "billing": "payments, invoices and refunds"}}),
        spec("review", "code_report", {"source": "import os\n\ndef f(x):\n    try:\n        return x\n"
                                                 "    except:\n        return None\n"}),
        spec("draft", "chat", {"prompt": "Hello!", "max_tokens": 8}, depends_on=("triage", "review")),
        spec("summary", "chat", {"messages": [{"role": "user", "content": "How are you?"}], "max_tokens": 8},
             depends_on=("draft",)),
        spec("index", "embed", {"texts": ["incident report", "server outage"]}, depends_on=("summary",)),
    ]
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 2, timeout_s=60)          # the ML executor loads its model first
        submitted = client.submit_dag(dag, "llm-e2e")
        ids = {name: submitted.task_ids[name] for name in ("triage", "review", "draft", "summary", "index")}
        tasks = {t.id: t for t in wait_final(client, list(ids.values()), timeout_s=180)}
    by_name = {name: tasks[task_id] for name, task_id in ids.items()}
    for name, task in by_name.items():
        assert task.status == "completed", (name, task.status, task.error)
    assert {by_name[n].assigned_executor for n in ("draft", "summary")} == {"llm"}
    assert {by_name[n].assigned_executor for n in ("triage", "review", "index")} == {"ml"}
    # dependency order, from the attempts' end times and the LLM task's start
    assert by_name["draft"].attempts[-1].ended_unix_ms >= max(by_name["triage"].attempts[-1].ended_unix_ms,
                                                               by_name["review"].attempts[-1].ended_unix_ms)
    for name in ("draft", "summary"):
        result = json.loads(by_name[name].result_json)
        assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] > 0, result
        assert "cost_usd" in result and result["cost_usd"] >= 0 and result["template"]["version"] >= 1
    triage = json.loads(by_name["triage"].result_json)
    assert triage["top_label"] == "outage" and triage["model_versions"]
    review = json.loads(by_name["review"].result_json)
    assert {f["rule"] for f in review["findings"]} >= {"unused-import", "bare-except"}
    index = json.loads(by_name["index"].result_json)
    assert index["dimension"] == 384 and len(index["vectors"]) == 2


def test_profiling_a_local_llm_executor_measures_the_real_server(llm_server, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from tests.executor_pool import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "executor", "profile", "--type", "local_llm", "--repeats", "2",
         "--concurrency", "2", "--output", "json"], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "LOCAL_LLM_ENDPOINTS": llm_server.base_url, "LOCAL_LLM_MODEL": llm_server.model})
    assert out.returncode == 0, out.stderr
    chat = json.loads(out.stdout)["task_types"]["chat"]
    assert chat["success_rate"] == 1.0 and chat["latency_s_p50"] > 0 and chat["cost_per_task"] == 0.0
