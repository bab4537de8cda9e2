"""Errors of the LLM machinery, under executors.base's TaskError tree (STYLE §6).

    TaskError (executors.base)
    ├── RetryableTaskError
    │   ├── TransientLLMError        the call may succeed if repeated: resilience retries it with
    │   │   │                        backoff; once retries are spent the adapter falls back a tier
    │   │   ├── RateLimited          HTTP 429; `.retry_after_s` from Retry-After when given
    │   │   ├── ServerError          HTTP 500/502/503/504, or a response that does not parse
    │   │   ├── Conflict             HTTP 409
    │   │   ├── RequestTimeout       the per-request timeout passed, or HTTP 408
    │   │   └── ConnectionFailed     connect refused/reset, a stream cut mid-way
    │   ├── EndpointUnavailable      fail fast: never retried by resilience
    │   │   ├── CircuitOpen          this endpoint's breaker is open → the adapter falls back a tier
    │   │   └── EndpointDown         the health check failed → no retry and no fallback at all
    │   └── TiersExhausted           every tier of the fallback chain failed; `.tries` says how
    └── PermanentTaskError
        ├── RequestRejected          HTTP 4xx other than 408/409/429 (and 501/505…); `.status`
        └── OutputInvalid            model output fails the output schema after the repair
                                     attempts; `.path` is a JSON path such as "$.items[0].name"
    MissingApiKey (ValueError)       configuration, at construction: names the variable, never a key

Library errors (openai, httpx) are mapped into this tree in one place: `client.mapped_errors`.
`counts_against_endpoint` tells the circuit breaker whether the failure says the endpoint is
unhealthy (5xx, timeouts, connection errors) or merely that it answered "no" (429, 409, 4xx).
"""

from __future__ import annotations

from typing import Any

from executors.base import PermanentTaskError, RetryableTaskError


class TransientLLMError(RetryableTaskError):
    code = "LLM_TRANSIENT"
    counts_against_endpoint = True

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class RateLimited(TransientLLMError):
    code = "LLM_RATE_LIMITED"
    counts_against_endpoint = False


class ServerError(TransientLLMError):
    code = "LLM_SERVER_ERROR"


class Conflict(TransientLLMError):
    code = "LLM_CONFLICT"
    counts_against_endpoint = False


class RequestTimeout(TransientLLMError):
    code = "LLM_TIMEOUT"


class ConnectionFailed(TransientLLMError):
    code = "LLM_CONNECTION_FAILED"


class EndpointUnavailable(RetryableTaskError):
    code = "LLM_ENDPOINT_UNAVAILABLE"


class CircuitOpen(EndpointUnavailable):
    code = "LLM_CIRCUIT_OPEN"


class EndpointDown(EndpointUnavailable):
    code = "LLM_ENDPOINT_DOWN"


class TiersExhausted(RetryableTaskError):
    code = "LLM_TIERS_EXHAUSTED"

    def __init__(self, message: str, tries: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.tries = tries


class RequestRejected(PermanentTaskError):
    code = "LLM_REQUEST_REJECTED"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OutputInvalid(PermanentTaskError):
    code = "LLM_OUTPUT_INVALID"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"model output at {path}: {problem}")
        self.path = path
        self.problem = problem


class MissingApiKey(ValueError):
    """The API key is not configured; the message names the environment variable."""
