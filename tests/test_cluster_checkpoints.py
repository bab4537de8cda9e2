"""Checkpoints on a real 3-node cluster: a 50-step task resumes on another executor after its
first one is SIGKILLed mid-run, an acknowledged checkpoint survives the leader's SIGKILL, and
retention keeps a task of thousands of checkpoints bounded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.agent import ExecutorAgent
from cluster.client import CoordinatorClient
from coordinator.checkpoints import CheckpointLimits
from executors.algorithmic import AlgorithmicAdapter
from executors.base import ExecutionContext, ExecutorResult, ExecutorTask
from proto import coordinator_pb2 as pb
from tests.executor_pool import ROOT, wait_final, wait_online

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

STEPS = 50


def steps_spec(steps: int, step_ms: int) -> pb.TaskSpec:
    return pb.TaskSpec(type="steps", input_json=json.dumps({"steps": steps, "step_ms": step_ms}))


def wait_checkpoint(client: CoordinatorClient, task_id: str, at_least: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = client.list_checkpoints(task_id).last_sequence
        if last >= at_least:
            return last
        time.sleep(0.01)
    raise AssertionError(f"task {task_id}: fewer than {at_least} checkpoints after {timeout_s} s")


def assigned_events(client: CoordinatorClient, task_id: str) -> list[dict]:
    import grpc

    found = []
    try:
        for event in client.watch(from_index=1, kinds=["TaskAssigned"], timeout_s=3):
            if event.task_id == task_id:
                found.append(json.loads(event.data_json))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return found


def check_resumed_once(task: pb.Task, resumed_from: int, first: int = 1, second: int = 2) -> None:
    """Every step ran exactly once: those up to the checkpoint the second attempt resumed from by
    the first attempt, the rest by the second."""
    output = json.loads(task.result_json)
    assert [s["step"] for s in output["steps"]] == list(range(1, STEPS + 1))
    assert [s["attempt"] for s in output["steps"]] == [first] * resumed_from + [second] * (STEPS - resumed_from)
    assert output["resumed_from_sequence"] == resumed_from and output["attempt"] == second


def test_a_task_killed_midway_resumes_on_another_executor_without_redoing_steps(cluster3, executors) -> None:
    executors.start("first", capacity=1)
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        task_id = client.submit_task(steps_spec(STEPS, step_ms=40)).task_id
        wait_checkpoint(client, task_id, 25)
        executors.signal("first", signal.SIGKILL)
        killed_at = client.list_checkpoints(task_id, linearizable=True).last_sequence
        executors.start("second", capacity=1)
        task = wait_final(client, [task_id], timeout_s=60)[0]
        assert task.status == "completed", task.error
        assert [(a.executor_id, a.outcome) for a in task.attempts] == [("first", "lost"), ("second", "completed")]
        resumed_from = json.loads(task.result_json)["resumed_from_sequence"]
        # The dead executor may have saved one more checkpoint between our read and its death.
        assert killed_at <= resumed_from <= killed_at + 1 and resumed_from >= 25
        check_resumed_once(task, resumed_from)
        # The chain itself says the same: the newest document lists each step once, in order.
        newest = client.get_checkpoint(task_id, linearizable=True)
        document = json.loads(newest.document_json)
        assert newest.restored_sequence == STEPS and not newest.problem
        assert [a["id"] for a in document["executed_actions"]] == [f"step-{i}" for i in range(1, STEPS + 1)]
        assert [a["attempt"] for a in document["executed_actions"]] == [1] * resumed_from + [2] * (STEPS - resumed_from)
        assert document["remaining_plan"] == [] and document["state_snapshot"] == {"steps": STEPS, "steps_done": STEPS}
        assert {"attempt": 2, "resume_from_sequence": resumed_from} == {
            k: v for k, v in assigned_events(client, task_id)[-1].items() if k in ("attempt", "resume_from_sequence")}


class KillLeaderAfterCheckpoint:
    """The `steps` adapter, except that right after checkpoint `at` is acknowledged it SIGKILLs
    the cluster's leader and then never goes on (its executor is stopped next)."""

    def __init__(self, cluster, at: int) -> None:
        self.inner = AlgorithmicAdapter()
        self.cluster = cluster
        self.at = at
        self.killed_leader: str | None = None
        self.acknowledged = asyncio.Event()

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        adapter = self

        class Tripwire:
            def __getattr__(self, name):
                return getattr(ctx, name)

            async def checkpoint(self, state, **kwargs):
                sequence = await ctx.checkpoint(state, **kwargs)
                if sequence == adapter.at:
                    adapter.killed_leader = adapter.cluster.leader_id()
                    adapter.cluster.kill_node(adapter.killed_leader)
                    adapter.acknowledged.set()
                    await asyncio.Event().wait()        # hangs until the executor stops
                return sequence

        return await self.inner.execute(task, Tripwire())

    def get_capabilities(self):
        return self.inner.get_capabilities()

    async def get_status(self):
        return await self.inner.get_status()

    async def cancel(self, task_id: str) -> None:
        await self.inner.cancel(task_id)


async def test_a_checkpoint_acknowledged_just_before_the_leader_dies_is_not_lost(cluster3, executors) -> None:
    at = 20
    adapter = KillLeaderAfterCheckpoint(cluster3, at)
    agent = ExecutorAgent(adapter, executor_id="tripwire", name="tripwire", executor_type="algorithmic", capacity=1,
                          endpoints=cluster3.endpoints,
                          credentials=cluster3.credentials(cert_name="executor", subject="executor:tripwire",
                                                           roles=("agent:executor",)))
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        with cluster3.client(cluster3.endpoints) as client:
            await asyncio.to_thread(wait_online, client, 1)
            task_id = (await asyncio.to_thread(client.submit_task, steps_spec(STEPS, step_ms=10))).task_id
            await asyncio.wait_for(adapter.acknowledged.wait(), 60)
            # The leader is gone; a new one must hold checkpoint `at`, acknowledged by the old one.
            survivor = await asyncio.to_thread(cluster3.wait_leader, 30, adapter.killed_leader)
            assert survivor != adapter.killed_leader
            held = await asyncio.to_thread(client.get_checkpoint, task_id, at, True)
            assert json.loads(held.document_json)["state_snapshot"]["steps_done"] == at
            stop.set()                                  # attempt 1 ends: reported failed, retryable
            await asyncio.wait_for(running, 30)
            executors.start("rescuer", capacity=1)
            task = (await asyncio.to_thread(wait_final, client, [task_id], 60))[0]
        assert task.status == "completed", task.error
        # "failed" when its shutdown report was acked in time, else "lost" once its lease ran out.
        # A stopped executor stays "online" until its lease TTL says otherwise, so the retry may
        # first be leased to it again (and lost) when the rescuer comes up later than the backoff.
        first, *middle, last = task.attempts
        assert first.executor_id == "tripwire" and first.outcome in ("failed", "lost")
        assert all(a.executor_id == "tripwire" and a.outcome in ("failed", "lost") for a in middle), task.attempts
        assert last.executor_id == "rescuer" and last.outcome == "completed"
        check_resumed_once(task, at, second=last.attempt)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 30)


def test_retention_keeps_a_long_task_bounded(cluster3, executors) -> None:
    limits = CheckpointLimits()
    steps = 2000
    executors.start("long", capacity=1)
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        task_id = client.submit_task(steps_spec(steps, step_ms=0)).task_id
        task = wait_final(client, [task_id], timeout_s=240)[0]
        assert task.status == "completed", task.error
        held = client.list_checkpoints(task_id, linearizable=True)
    assert held.last_sequence == steps
    assert len(held.checkpoints) <= limits.keep_full_max * (limits.full_every + 1)
    kinds = [c.kind for c in held.checkpoints]
    assert kinds.count("full") <= limits.keep_full_max and kinds[0] == "full"
    # Bounded by the chain's limits, not by the 2,000 saves.
    assert held.payload_bytes_total <= limits.keep_full_max * (limits.checkpoint_bytes_max + limits.delta_chain_bytes_max)
    assert [c.sequence_number for c in held.checkpoints] == list(range(held.checkpoints[0].sequence_number, steps + 1))
    # What an operator sees: coordctl checkpoint list / show, as JSON.
    listed = coordctl_json(cluster3.data_dir, "checkpoint", "list", task_id)
    assert listed["last_sequence"] == steps and len(listed["checkpoints"]) == len(held.checkpoints)
    oldest = listed["checkpoints"][0]["sequence_number"]
    shown = coordctl_json(cluster3.data_dir, "checkpoint", "show", task_id, "--seq", str(oldest))
    assert shown["kind"] == "full" and shown["restored_sequence"] == oldest and shown["problem"] is None
    assert len(shown["document"]["executed_actions"]) == oldest
    missing = run_coordctl(cluster3.data_dir, "checkpoint", "show", task_id, "--seq", "1", expect=1)
    assert "holds no checkpoint 1" in missing.stderr


def run_coordctl(data_dir: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**os.environ, "COORDCTL_DATA_DIR": data_dir, "COORDCTL_ENDPOINTS": ""})
    assert result.returncode == expect, (args, result.stdout, result.stderr)
    return result


def coordctl_json(data_dir: str, *args: str) -> dict:
    return json.loads(run_coordctl(data_dir, *args, "--output", "json").stdout)
