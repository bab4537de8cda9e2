"""A small synchronous client for the coordinator API, used by `coordctl`, tests and benchmarks.

Any node serves every call, so the client simply tries the endpoints in turn when one is down.
Writes carry an idempotency key, so retrying them on another node after an unknown outcome
(timeout, leader change) never creates a duplicate.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from cluster import tracing
from cluster.credentials import ClientCredentials
from proto import coordinator_pb2 as pb
from proto import coordinator_pb2_grpc as pb_grpc

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
GRPC_MESSAGE_BYTES_MAX = 32 << 20


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def default_data_dir() -> str:
    return os.environ.get("COORDCTL_DATA_DIR", ".coord")


def cluster_file_path(data_dir: str) -> str:
    return os.path.join(data_dir, "cluster.json")


def resolve_endpoints(endpoints: str | None, data_dir: str | None = None) -> list[str]:
    """--endpoints, then COORDCTL_ENDPOINTS, then the local cluster file."""
    text = endpoints or os.environ.get("COORDCTL_ENDPOINTS", "")
    if text:
        return [e.strip() for e in text.split(",") if e.strip()]
    path = cluster_file_path(data_dir or default_data_dir())
    if os.path.exists(path):
        with open(path) as f:
            return [n["grpc_address"] for n in json.load(f)["nodes"]]
    raise ClientError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"no endpoints: pass --endpoints host:port,..., set COORDCTL_ENDPOINTS, or run `coordctl cluster up` "
        f"(looked for {path})",
    )


class CoordinatorClient:
    def __init__(self, endpoints: Sequence[str], *, credentials: ClientCredentials, timeout_s: float = 10.0,
                 attempts_max: int = 6) -> None:
        if not endpoints:
            raise ValueError("endpoints: at least one host:port")
        self.endpoints = list(endpoints)
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.attempts_max = attempts_max
        self._channels: dict[str, grpc.Channel] = {}
        self._preferred = 0

    def _stub(self, endpoint: str) -> pb_grpc.CoordinatorStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self.credentials.channel(endpoint, options=[
                ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
            ])
            self._channels[endpoint] = channel
        return pb_grpc.CoordinatorStub(channel)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, *, timeout_s: float | None = None, retry: bool = True) -> Any:
        """Call `method` on one node; on UNAVAILABLE / DEADLINE_EXCEEDED try the next node, with
        backoff, up to attempts_max times. Only retry writes that carry an idempotency key."""
        last: grpc.RpcError | None = None
        if method in ("SubmitTask", "SubmitDag") and not request.idempotency_key:
            retry = False  # a retried submit without a key could create a duplicate
        attempts = self.attempts_max if retry else 1
        metadata = self.credentials.metadata()
        traceparent = tracing.traceparent_of()
        if traceparent:  # the caller's span (coordctl --trace-file, or a traced program) continues on the node
            metadata = (*(metadata or ()), (tracing.TRACEPARENT, traceparent))
        for attempt in range(attempts):
            endpoint = self.endpoints[(self._preferred + attempt) % len(self.endpoints)]
            try:
                response = getattr(self._stub(endpoint), method)(request, timeout=timeout_s or self.timeout_s,
                                                                 metadata=metadata)
                self._preferred = self.endpoints.index(endpoint)
                return response
            except grpc.RpcError as exc:
                last = exc
                if exc.code() not in RETRYABLE:
                    raise ClientError(exc.code(), exc.details() or "") from None
                time.sleep(min(0.05 * 2**attempt, 1.0))
        assert last is not None
        raise ClientError(last.code(), f"{last.details()} (after {attempts} attempts over {self.endpoints})")

    # -- convenience ---------------------------------------------------------------------
    def submit_task(self, spec: pb.TaskSpec, idempotency_key: str = "") -> pb.SubmitTaskResponse:
        key = idempotency_key or "cli-" + uuid.uuid4().hex
        return self.call("SubmitTask", pb.SubmitTaskRequest(task=spec, idempotency_key=key))

    def submit_dag(self, specs: Sequence[pb.TaskSpec], idempotency_key: str = "") -> pb.SubmitDagResponse:
        key = idempotency_key or "cli-" + uuid.uuid4().hex
        return self.call("SubmitDag", pb.SubmitDagRequest(tasks=list(specs), idempotency_key=key))

    def get_task(self, task_id: str, linearizable: bool = False) -> pb.Task:
        consistency = pb.CONSISTENCY_LINEARIZABLE if linearizable else pb.CONSISTENCY_LOCAL
        return self.call("GetTask", pb.GetTaskRequest(task_id=task_id, consistency=consistency))

    def list_checkpoints(self, task_id: str, linearizable: bool = False) -> pb.ListCheckpointsResponse:
        consistency = pb.CONSISTENCY_LINEARIZABLE if linearizable else pb.CONSISTENCY_LOCAL
        return self.call("ListCheckpoints", pb.ListCheckpointsRequest(task_id=task_id, consistency=consistency))

    def get_checkpoint(self, task_id: str, sequence_number: int = 0, linearizable: bool = False) -> pb.GetCheckpointResponse:
        consistency = pb.CONSISTENCY_LINEARIZABLE if linearizable else pb.CONSISTENCY_LOCAL
        return self.call("GetCheckpoint", pb.GetCheckpointRequest(task_id=task_id, sequence_number=sequence_number,
                                                                  consistency=consistency))

    def list_tasks(self, **kwargs: Any) -> pb.ListTasksResponse:
        return self.call("ListTasks", pb.ListTasksRequest(**kwargs))

    def cancel_task(self, task_id: str, reason: str = "") -> pb.CancelTaskResponse:
        return self.call("CancelTask", pb.CancelTaskRequest(task_id=task_id, reason=reason), retry=False)

    def wait_tasks(self, task_ids: Sequence[str], timeout_s: float) -> pb.WaitTasksResponse:
        return self.call("WaitTasks", pb.WaitTasksRequest(task_ids=list(task_ids), timeout_s=timeout_s),
                         timeout_s=timeout_s + 5)

    def status(self, endpoint: str, timeout_s: float = 2.0) -> pb.NodeStatus:
        return self._stub(endpoint).ClusterStatus(pb.ClusterStatusRequest(), timeout=timeout_s,
                                                  metadata=self.credentials.metadata()).node

    def watch(self, from_index: int = 0, kinds: Sequence[str] = (), timeout_s: float | None = None) -> Iterator[pb.Event]:
        stub = self._stub(self.endpoints[self._preferred])
        return stub.Watch(pb.WatchRequest(from_index=from_index, kinds=list(kinds)), timeout=timeout_s,
                          metadata=self.credentials.metadata())


def with_retries(fn: Callable[[], T], attempts: int, delay_s: float) -> T:
    for attempt in range(attempts):
        try:
            return fn()
        except (ClientError, grpc.RpcError):
            if attempt == attempts - 1:
                raise
            time.sleep(delay_s)
    raise AssertionError("unreachable")
