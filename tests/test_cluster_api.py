"""The gRPC API on a real local 3-node cluster: writes to any node, reads, validation, events."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from cluster.client import ClientError
from proto import coordinator_pb2 as pb

pytestmark = pytest.mark.cluster


def spec(**kwargs) -> pb.TaskSpec:
    kwargs.setdefault("type", "echo")
    return pb.TaskSpec(**kwargs)


def test_writes_to_any_node_and_linearizable_reads(cluster3) -> None:
    ids = []
    for endpoint in cluster3.endpoints:  # one write through each node, followers included
        with cluster3.client([endpoint]) as client:
            ids.append(client.submit_task(spec(input_json=json.dumps({"via": endpoint}))).task_id)
    for endpoint in cluster3.endpoints:
        with cluster3.client([endpoint]) as client:
            for task_id in ids:
                task = client.get_task(task_id, linearizable=True)
                assert task.status == "pending" and task.type == "echo"
            listed = client.list_tasks(limit=10, consistency=pb.CONSISTENCY_LINEARIZABLE)
            assert [t.id for t in listed.tasks] == ids and listed.total_matching == 3


def test_idempotent_submit_and_dag(cluster3) -> None:
    with cluster3.client(cluster3.endpoints) as client:
        first = client.submit_task(spec(), "key-1")
        again = client.submit_task(spec(priority=9, has_priority=True), "key-1")
        assert again.task_id == first.task_id and again.duplicate and not first.duplicate
        dag = [spec(name="a"), spec(name="b", depends_on=["a"]), spec(name="c", depends_on=["a", "b"])]
        one = client.submit_dag(dag, "dag-key")
        two = client.submit_dag(dag, "dag-key")
        assert list(one.ordered_ids) == list(two.ordered_ids) and two.duplicate
        c = client.get_task(one.task_ids["c"], linearizable=True)
        assert list(c.dependencies) == [one.task_ids["a"], one.task_ids["b"]]
        # a later DAG may depend on existing task ids
        later = client.submit_dag([spec(name="d", depends_on=[one.task_ids["c"]])])
        assert client.get_task(later.task_ids["d"]).dependencies == [one.task_ids["c"]]
        assert client.list_tasks(limit=1000).total_matching == 5


BAD_INPUTS = [
    ("priority", [spec(priority=101, has_priority=True)], "task.priority: must be between 0 and 100"),
    ("negative priority", [spec(priority=-1, has_priority=True)], "task.priority"),
    ("past deadline", [spec(deadline_unix_ms=1000)], "task.deadline: must be in the future"),
    ("both deadlines", [spec(deadline_unix_ms=10**13, deadline_in_ms=5)], "task.deadline"),
    ("unknown dependency", [spec(depends_on=["t-nope"])], "task.depends_on[0]: unknown task"),
    ("oversize input", [spec(input_json=json.dumps("x" * 70_000))], "task.input: at most 65536 bytes"),
    ("bad json", [spec(input_json="{nope")], "task.input: not valid JSON"),
    ("no type", [spec(type="")], "task.type: required"),
    ("bad type", [spec(type="a b")], "task.type"),
    ("max attempts", [spec(max_attempts=1000)], "task.max_attempts: must be between 1 and 100"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_single_submit_rejected_with_field_and_state_unchanged(cluster3, case) -> None:
    _, specs, message = case
    with cluster3.client(cluster3.endpoints) as client:
        client.submit_task(spec(), "seed")
        before = cluster3.wait_converged()
        with pytest.raises(ClientError) as err:
            client.submit_task(specs[0], "bad")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.message
        assert cluster3.wait_converged() == before


def test_bad_dags_rejected_whole(cluster3) -> None:
    cases = [
        ([spec(name="a", depends_on=["b"]), spec(name="b", depends_on=["a"])], "dependency cycle"),
        ([spec(name="a", depends_on=["a"])], "dependency cycle a -> a"),
        ([spec(name="a"), spec(name="a")], "tasks[1].name: 'a' is used twice"),
        ([spec(name="a"), spec(name="b", depends_on=["zzz"])], "tasks[1].depends_on[0]: unknown task 'zzz'"),
        ([spec(name=f"n{i}") for i in range(10_001)], "tasks: at most 10000 tasks per submission, got 10001"),
        ([], "tasks: at least one task is required"),
    ]
    with cluster3.client(cluster3.endpoints) as client:
        client.submit_task(spec(), "seed")
        before = cluster3.wait_converged()
        for dag, message in cases:
            with pytest.raises(ClientError) as err:
                client.submit_dag(dag)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in err.value.message
        assert cluster3.wait_converged() == before  # (a linearizable read would move the applied index)
        assert client.list_tasks(consistency=pb.CONSISTENCY_LINEARIZABLE).total_matching == 1


def test_cancel_and_wait(cluster3) -> None:
    with cluster3.client(cluster3.endpoints) as client:
        task_id = client.submit_task(spec()).task_id
        started = time.monotonic()
        waited = client.wait_tasks([task_id], 0.3)
        assert not waited.all_final and time.monotonic() - started >= 0.3
        cancelled = client.cancel_task(task_id, "not needed")
        assert cancelled.task.status == "cancelled" and cancelled.task.cancel_reason == "not needed"
        assert client.wait_tasks([task_id], 5).all_final
        with pytest.raises(ClientError) as err:
            client.cancel_task(task_id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ClientError) as err:
            client.cancel_task("t-missing")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_watch_from_any_node(cluster3) -> None:
    with cluster3.client(cluster3.endpoints[:1]) as client:
        dag = client.submit_dag([spec(name="a"), spec(name="b", depends_on=["a"])])
        client.cancel_task(dag.task_ids["b"])
    for endpoint in cluster3.endpoints:
        with cluster3.client([endpoint]) as client:
            events = []
            for event in client.watch(from_index=1, kinds=["TaskCreated", "TaskCancelled"], timeout_s=5):
                events.append((event.kind, event.task_id))
                if len(events) == 3:
                    break
            assert events == [("TaskCreated", dag.task_ids["a"]), ("TaskCreated", dag.task_ids["b"]),
                              ("TaskCancelled", dag.task_ids["b"])]


def test_executor_register_list(cluster3) -> None:
    with cluster3.client(cluster3.endpoints) as client:
        request = pb.RegisterExecutorRequest(executor=pb.ExecutorSpec(
            id="exec-1", name="worker", type="algorithmic", supported_task_types=["echo"], capacity=4))
        assert client.call("RegisterExecutor", request).executor_id == "exec-1"
        listed = client.call("ListExecutors", pb.ListExecutorsRequest(consistency=pb.CONSISTENCY_LINEARIZABLE))
        assert [(e.id, e.capacity, e.status) for e in listed.executors] == [("exec-1", 4, "online")]
        with pytest.raises(ClientError) as err:
            client.call("RegisterExecutor", pb.RegisterExecutorRequest(executor=pb.ExecutorSpec(name="w", type="gpu")))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "executor.type" in err.value.message
        client.call("UnregisterExecutor", pb.UnregisterExecutorRequest(executor_id="exec-1"))
        assert not client.call("ListExecutors", pb.ListExecutorsRequest(consistency=1)).executors


def test_health_and_reflection(cluster3) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for endpoint in cluster3.endpoints:
        credentials = cluster3.admin
        with credentials.channel(endpoint) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=5, metadata=credentials.metadata())
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert "agentcoordinator.v1.Coordinator" in names and "grpc.health.v1.Health" in names


def test_overload_is_pushed_back_with_resource_exhausted(make_cluster) -> None:
    import asyncio
    import uuid

    from proto import coordinator_pb2_grpc as pb_grpc

    cluster = make_cluster(3, extra_args=["--commands-in-flight-max", "4"], subdir="small")
    endpoint = cluster.node(cluster.wait_leader()).grpc_address
    codes: list[str] = []
    acked: dict[str, str] = {}

    async def flood() -> None:
        credentials = cluster.admin
        async with credentials.aio_channel(endpoint) as channel:
            stub = pb_grpc.CoordinatorStub(channel)

            async def one(n: int) -> None:
                key = f"flood-{n}-{uuid.uuid4().hex[:6]}"
                for _ in range(200):  # bounded retries with the same key
                    try:
                        reply = await stub.SubmitTask(pb.SubmitTaskRequest(task=spec(), idempotency_key=key), timeout=10,
                                                      metadata=credentials.metadata())
                        acked[key] = reply.task_id
                        return
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code().name)
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        assert "commands_in_flight_max=4" in exc.details()
                        await asyncio.sleep(0.01)
                raise AssertionError(f"{key} never got through")

            await asyncio.gather(*(one(n) for n in range(64)))

    asyncio.run(flood())
    assert "RESOURCE_EXHAUSTED" in codes and len(acked) == 64
    with cluster.client([endpoint]) as client:
        listed = client.list_tasks(limit=1000, consistency=pb.CONSISTENCY_LINEARIZABLE)
    assert sorted(t.id for t in listed.tasks) == sorted(acked.values())
