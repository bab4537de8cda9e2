"""Executor adapters: the `ExecutorAdapter` port (`base`), the built-in `algorithmic` executor
and an in-memory scripted fake for tests. See executors/README.md."""

from executors.algorithmic import AlgorithmicAdapter, AlgorithmicLimits
from executors.base import (
    ExecutionContext,
    ExecutorAdapter,
    ExecutorBusy,
    ExecutorResult,
    ExecutorTask,
    InvalidTaskInput,
    LocalContext,
    PermanentTaskError,
    ProgressReport,
    RetryableTaskError,
    TaskCancelled,
    TaskError,
    UnsupportedTaskType,
    task_error_from,
)
from executors.code_analysis import AnalysisLimits, analyze_source
from executors.fake import Echo, FakeCall, FakeExecutor, Hang, Permanent, Retryable, Succeed

__all__ = [
    "AlgorithmicAdapter", "AlgorithmicLimits", "AnalysisLimits", "Echo", "ExecutionContext", "ExecutorAdapter",
    "ExecutorBusy", "ExecutorResult", "ExecutorTask", "FakeCall", "FakeExecutor", "Hang", "InvalidTaskInput",
    "LocalContext", "Permanent", "PermanentTaskError", "ProgressReport", "Retryable", "RetryableTaskError",
    "Succeed", "TaskCancelled", "TaskError", "UnsupportedTaskType", "analyze_source", "task_error_from",
]
