"""The local LLM executor: `LLMAdapter` (executors/llm/adapter.py) over one or more
OpenAI-compatible servers on our own machines — vLLM (`python -m vllm.entrypoints.openai.api_server`)
or `transformers serve` — balanced by `BalancedChatAPI`.

    adapter = LocalLLMAdapter()          # LOCAL_LLM_ENDPOINTS, LOCAL_LLM_MODEL, LOCAL_LLM_API_KEY, ...
    adapter = LocalLLMAdapter(LocalLLMConfig(endpoints=("http://10.0.0.5:8000/v1", ...), model="qwen-7b",
                                             loras={"sql": LoraModule("/models/sql-lora")}, load_lora=True))

How a task is served:

    execute(task)                                         LLMAdapter: templates, accounting, repair, cancel
      resolve_model(task) → (model, lora)                 metadata.model / metadata.lora, checked against
      │                                                   the configured default, extra models and LoRAs
      health.ensure_up()  → BalancedChatAPI.probe         down only when every replica is down
      Resilience.call("balanced(...)#<model or lora>")    backoff, Retry-After, breaker over the pool
        └ BalancedChatAPI.complete(request)               one call: tries each replica at most once
            pick: least outstanding requests; ties → round robin (deterministic)
            skip: cooling after Retry-After │ replica HealthCheck down │ replica breaker open
            LoRA named and not loaded there → POST <endpoint>/load_lora_adapter (once per replica;
                                              again once if the server answers 404 for it: restarted)
            OpenAIChatAPI(replica).complete               per-request timeout; stream closed on cancel
            TransientLLMError → record on the replica, try the next replica
          every replica skipped → EndpointDown at once (no call, no retry); some failed → the last
          error (its Retry-After kept), which Resilience backs off on

A replica that fails is retried on another healthy replica within the same call; its breaker
opens after `ReplicaPolicy.breaker.failures_to_open` consecutive failures and lets one half-open
probe through after `open_cooldown_s`. A 429/503 with Retry-After keeps that replica out of the
rotation until the time passes. Nothing here sleeps: waiting is Resilience's job.

Models: vLLM serves a LoRA adapter under its own model name (`--enable-lora --lora-modules
name=path`, or at run time `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` when the
server runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), so a task naming a LoRA sends the LoRA's
name as `model`. `resolve_model(task)` is the seam where a model registry will plug in
(`LocalLLMAdapter(resolver=...)`).

Cost: usage comes from the server's `usage`; the price table defaults to 0 USD for every model
(`PriceTable(default=FREE)`), configurable per model or LoRA name (e.g. to charge for power).

Environment (all read by `LocalLLMConfig.from_env`):

    LOCAL_LLM_ENDPOINTS   comma-separated base URLs (…/v1), 1..REPLICAS_MAX; default http://127.0.0.1:8000/v1
    LOCAL_LLM_MODEL       the default model name the servers serve (required)
    LOCAL_LLM_API_KEY     optional; sent as Bearer (vLLM --api-key)
    LOCAL_LLM_MODELS      optional, comma-separated other base models a task may name
    LOCAL_LLM_LORAS       optional, comma-separated name=path (or name, when preloaded by --lora-modules)
    LOCAL_LLM_LOAD_LORA   optional, 1/true/yes to load a named LoRA through /v1/load_lora_adapter
    LOCAL_LLM_REQUEST_TIMEOUT_S  optional, the per-request timeout (LLMSettings.request_timeout_s)

Errors: the tree of executors/llm/errors.py; configuration problems are ValueError naming the
variable (or field) and the limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import httpx

from coordinator.model import ExecutorType
from executors.base import ExecutionContext, ExecutorTask, InvalidTaskInput, TaskError
from executors.llm.accounting import FREE, PriceTable, TaskAccount
from executors.llm.adapter import LLMAdapter, LLMSettings
from executors.llm.cache import CacheLimits
from executors.llm.client import ChatAPI, ChatRequest, ChatResponse, OnText, OpenAIChatAPI, mapped_errors
from executors.llm.errors import (
    CircuitOpen,
    ConnectionFailed,
    EndpointDown,
    RateLimited,
    RequestRejected,
    RequestTimeout,
    ServerError,
    TransientLLMError,
)
from executors.llm.resilience import BreakerPolicy, CircuitBreaker, Clock, HealthCheck, SystemClock, parse_retry_after
from executors.llm.secrets import Secret, mask_secrets
from executors.llm.templates import Message

# Bounds (STYLE §8).
REPLICAS_MAX = 16                    # servers behind one adapter
MODELS_MAX = 64                      # base models a task may name
LORAS_MAX = 256                      # LoRA adapters a task may name
MODEL_NAME_CHARS_MAX = 256
REPLICA_TRACE_MAX = 64               # entries of a result's `replicas`
REASON_CHARS_MAX = 300
LORA_RESPONSE_CHARS_MAX = 2_000      # characters of a load_lora_adapter answer kept in an error

LOCAL_LLM_ENDPOINTS_ENV = "LOCAL_LLM_ENDPOINTS"
LOCAL_LLM_MODEL_ENV = "LOCAL_LLM_MODEL"
LOCAL_LLM_API_KEY_ENV = "LOCAL_LLM_API_KEY"
LOCAL_LLM_MODELS_ENV = "LOCAL_LLM_MODELS"
LOCAL_LLM_LORAS_ENV = "LOCAL_LLM_LORAS"
LOCAL_LLM_LOAD_LORA_ENV = "LOCAL_LLM_LOAD_LORA"
LOCAL_LLM_REQUEST_TIMEOUT_ENV = "LOCAL_LLM_REQUEST_TIMEOUT_S"
LOCAL_LLM_ENDPOINT_DEFAULT = "http://127.0.0.1:8000/v1"

# The openai client wants some key; a vLLM started without --api-key accepts any.
NO_API_KEY = "local-llm-no-key"
# LLMAdapter's tiers are a fallback chain of models; here a task names its one model, and
# replicas (not tiers) give the redundancy, so there is one tier, the head of the chain.
LOCAL_TIER = "big"

_NAME_RE = re.compile(r"^[^\s,=]+$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter a task may name. `path` is what vLLM loads (a directory on the server's
    machine); "" means the servers already serve it (`--lora-modules name=path`) and it is
    never loaded by us. `base_model` "" means the configured default model."""

    path: str = ""
    base_model: str = ""


@dataclass(frozen=True)
class ReplicaPolicy:
    """Per-replica health: a breaker and a health probe (GET /v1/models) per server."""

    breaker: BreakerPolicy = field(default_factory=lambda: BreakerPolicy(failures_to_open=3, open_cooldown_s=30.0))
    health_timeout_s: float = 3.0       # below LLMSettings.health_timeout_s: the pool's probe waits for these
    health_up_ttl_s: float = 30.0       # an "up" answer is trusted this long
    health_down_ttl_s: float = 5.0      # a "down" replica is skipped without a probe this long
    lora_load_timeout_s: float = 300.0  # loading an adapter reads it from disk (and may move it to a GPU)

    def __post_init__(self) -> None:
        for name in ("health_timeout_s", "health_up_ttl_s", "health_down_ttl_s", "lora_load_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3_600:
                raise ValueError(f"ReplicaPolicy.{name}: in (0, 3600] s, got {value!r}")


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: a non-empty model name, got {value!r}")
    value = value.strip()
    if len(value) > MODEL_NAME_CHARS_MAX or not _NAME_RE.match(value):
        raise ValueError(f"{where}: at most {MODEL_NAME_CHARS_MAX} chars (MODEL_NAME_CHARS_MAX) with no spaces, "
                         f"commas or '=', got {value[:MODEL_NAME_CHARS_MAX]!r}")
    return value


def _check_endpoints(endpoints: Sequence[str], where: str) -> tuple[str, ...]:
    if isinstance(endpoints, str):
        raise ValueError(f"{where}: a sequence of URLs, not one string")
    cleaned = tuple(str(e).strip().rstrip("/") for e in endpoints)
    if not 1 <= len(cleaned) <= REPLICAS_MAX:
        raise ValueError(f"{where}: 1..{REPLICAS_MAX} endpoints (REPLICAS_MAX), got {len(cleaned)}")
    for url in cleaned:
        if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
            raise ValueError(f"{where}: each endpoint an http(s) base URL such as {LOCAL_LLM_ENDPOINT_DEFAULT}, "
                             f"got {url!r}")
    duplicates = sorted({u for u in cleaned if cleaned.count(u) > 1})
    if duplicates:
        raise ValueError(f"{where}: each endpoint once; repeated: {duplicates}")
    return cleaned


@dataclass(frozen=True)
class LocalLLMConfig:
    model: str                                                   # the default model of a task
    endpoints: tuple[str, ...] = (LOCAL_LLM_ENDPOINT_DEFAULT,)
    models: frozenset[str] = frozenset()                         # other base models a task may name
    loras: Mapping[str, LoraModule] = field(default_factory=dict)
    load_lora: bool = False                                      # POST /v1/load_lora_adapter when needed
    api_key: Secret | None = None
    prices: PriceTable | None = None                             # None: every model costs 0 USD
    settings: LLMSettings = field(default_factory=LLMSettings)
    replica: ReplicaPolicy = field(default_factory=ReplicaPolicy)
    cache: CacheLimits | None = None                             # None: no response cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _check_name(self.model, "LocalLLMConfig.model"))
        object.__setattr__(self, "endpoints", _check_endpoints(self.endpoints, "LocalLLMConfig.endpoints"))
        models = frozenset(_check_name(m, "LocalLLMConfig.models") for m in self.models)
        if len(models) > MODELS_MAX:
            raise ValueError(f"LocalLLMConfig.models: at most {MODELS_MAX} (MODELS_MAX), got {len(models)}")
        object.__setattr__(self, "models", models)
        if len(self.loras) > LORAS_MAX:
            raise ValueError(f"LocalLLMConfig.loras: at most {LORAS_MAX} (LORAS_MAX), got {len(self.loras)}")
        for name, module in self.loras.items():
            _check_name(name, "LocalLLMConfig.loras")
            if not isinstance(module, LoraModule):
                raise ValueError(f"LocalLLMConfig.loras.{name}: a LoraModule, got {type(module).__name__}")
            if module.base_model and module.base_model not in self.models_allowed:
                raise ValueError(f"LocalLLMConfig.loras.{name}.base_model: one of {sorted(self.models_allowed)}, "
                                 f"got {module.base_model!r}")
            if name in self.models_allowed:
                raise ValueError(f"LocalLLMConfig.loras.{name}: the name of a base model too; names must differ")
        if self.load_lora and not any(m.path for m in self.loras.values()):
            raise ValueError(f"LocalLLMConfig.load_lora ({LOCAL_LLM_LOAD_LORA_ENV}): needs at least one LoRA with a "
                             f"path in loras ({LOCAL_LLM_LORAS_ENV}=name=path)")
        if not self.replica.health_timeout_s < self.settings.health_timeout_s:
            raise ValueError(f"LocalLLMConfig.replica.health_timeout_s: below settings.health_timeout_s "
                             f"({self.settings.health_timeout_s} s), got {self.replica.health_timeout_s}")
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            raise ValueError("LocalLLMConfig.api_key: a Secret (executors.llm.secrets)")

    @property
    def models_allowed(self) -> frozenset[str]:
        return self.models | {self.model}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LocalLLMConfig:
        """From LOCAL_LLM_* (see the module docstring); a bad value is a ValueError naming the
        variable and the limit. Keyword overrides win over the environment."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        model = env.get(LOCAL_LLM_MODEL_ENV, "").strip()
        if "model" not in overrides:
            if not model:
                raise ValueError(f"{LOCAL_LLM_MODEL_ENV} is not set: the model name the servers serve "
                                 "(vLLM: --served-model-name, else the --model path)")
            kwargs["model"] = _env_name(model, LOCAL_LLM_MODEL_ENV)
        endpoints = env.get(LOCAL_LLM_ENDPOINTS_ENV, "").strip()
        if endpoints:
            kwargs["endpoints"] = _check_endpoints([e for e in endpoints.split(",") if e.strip()] or [""],
                                                   LOCAL_LLM_ENDPOINTS_ENV)
        if env.get(LOCAL_LLM_MODELS_ENV, "").strip():
            names = [_env_name(m, LOCAL_LLM_MODELS_ENV) for m in env[LOCAL_LLM_MODELS_ENV].split(",") if m.strip()]
            if len(names) > MODELS_MAX:
                raise ValueError(f"{LOCAL_LLM_MODELS_ENV}: at most {MODELS_MAX} models (MODELS_MAX), got {len(names)}")
            kwargs["models"] = frozenset(names)
        if env.get(LOCAL_LLM_LORAS_ENV, "").strip():
            kwargs["loras"] = _env_loras(env[LOCAL_LLM_LORAS_ENV])
        flag = env.get(LOCAL_LLM_LOAD_LORA_ENV, "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError(f"{LOCAL_LLM_LOAD_LORA_ENV}: one of 1/true/yes or 0/false/no, got {flag!r}")
        if flag in _TRUE:
            kwargs["load_lora"] = True
        key = env.get(LOCAL_LLM_API_KEY_ENV, "").strip()
        if key:
            kwargs["api_key"] = Secret(key)
        timeout = env.get(LOCAL_LLM_REQUEST_TIMEOUT_ENV, "").strip()
        if timeout:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds <= 3_600:
                raise ValueError(f"{LOCAL_LLM_REQUEST_TIMEOUT_ENV}: seconds in (0, 3600], got {timeout!r}")
            kwargs["settings"] = replace(overrides.get("settings", LLMSettings()), request_timeout_s=seconds)
        kwargs.update({k: v for k, v in overrides.items() if not (k == "settings" and "settings" in kwargs)})
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{exc} (from the LOCAL_LLM_* environment)") from None


def _env_name(value: str, variable: str) -> str:
    try:
        return _check_name(value, variable)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _env_loras(text: str) -> dict[str, LoraModule]:
    loras: dict[str, LoraModule] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        name = _env_name(name, LOCAL_LLM_LORAS_ENV)
        if name in loras:
            raise ValueError(f"{LOCAL_LLM_LORAS_ENV}: {name!r} named twice")
        loras[name] = LoraModule(path=path.strip())
        if len(loras) > LORAS_MAX:
            raise ValueError(f"{LOCAL_LLM_LORAS_ENV}: at most {LORAS_MAX} adapters (LORAS_MAX)")
    return loras


# ------------------------------------------------------------------------------------ LoRA loading


class LoraLoader(Protocol):
    async def load(self, endpoint: str, name: str, path: str, *, timeout_s: float) -> None:
        """Make `endpoint` serve the LoRA `name` from `path`; return when it does (also when it
        already did). Raise TaskErrors of executors/llm/errors.py otherwise."""
        ...

    async def aclose(self) -> None: ...


class VLLMLoraLoader:
    """`POST {endpoint}/load_lora_adapter {"lora_name", "lora_path"}` — vLLM's runtime LoRA API
    (vllm/entrypoints/openai/serving_models.py). 200 means loaded; 400 "has already been loaded"
    means loaded too; 404 means the route is off (the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
    or the path holds no adapter. Errors are mapped like chat calls (5xx/timeouts/connection → transient)."""

    def __init__(self, *, api_key: Secret | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._key = api_key
        headers = {"Authorization": f"Bearer {api_key.reveal()}"} if api_key is not None else {}
        self._client = httpx.AsyncClient(headers=headers, transport=transport, trust_env=False)
        self.loads_total = 0

    async def load(self, endpoint: str, name: str, path: str, *, timeout_s: float) -> None:
        secrets = [self._key] if self._key is not None else []
        url = f"{endpoint.rstrip('/')}/load_lora_adapter"
        self.loads_total += 1
        with mapped_errors(endpoint, secrets):
            async with asyncio.timeout(timeout_s):
                response = await self._client.post(url, json={"lora_name": name, "lora_path": path},
                                                   timeout=timeout_s)
        if response.status_code == 200:
            return
        detail = mask_secrets(_error_message(response), secrets)
        message = f"{endpoint}: loading LoRA {name!r} from {path!r}: HTTP {response.status_code}: {detail}"
        if response.status_code == 400 and "already been loaded" in detail:
            return
        if response.status_code == 404:
            raise RequestRejected(message + " (is the route on? start vLLM with --enable-lora and "
                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; is the path an adapter directory "
                                  "on the server?)", status=404)
        if response.status_code == 429:
            raise RateLimited(message, status=429, retry_after_s=_retry_after(response))
        if response.status_code in (500, 502, 503, 504):
            raise ServerError(message, status=response.status_code, retry_after_s=_retry_after(response))
        if response.status_code == 408:
            raise RequestTimeout(message, status=408)
        raise RequestRejected(message, status=response.status_code)

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_message(response: httpx.Response) -> str:
    text = response.text[:LORA_RESPONSE_CHARS_MAX]
    try:
        body = response.json()
    except ValueError:
        return text
    if isinstance(body, Mapping):       # vLLM: {"error": {"message"}} (newer) or {"message"} (older)
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return inner["message"][:LORA_RESPONSE_CHARS_MAX]
    return text


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"), time.time())


# -------------------------------------------------------------------------------------- balancing


# The replicas one task's calls went to (appended by BalancedChatAPI, read into the result).
_REPLICA_TRACE: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "local_llm_replica_trace", default=None)


class Replica:
    """One server: its ChatAPI, breaker, health check, outstanding requests, Retry-After
    cool-down and the LoRA adapters it is known to serve."""

    def __init__(self, index: int, api: ChatAPI, policy: ReplicaPolicy, clock: Clock) -> None:
        self.index = index
        self.api = api
        self.endpoint = api.endpoint
        self.breaker = CircuitBreaker(self.endpoint, policy.breaker, clock)
        self.health = HealthCheck(self.endpoint, lambda: api.probe(timeout_s=policy.health_timeout_s), clock,
                                  timeout_s=policy.health_timeout_s, up_ttl_s=policy.health_up_ttl_s,
                                  down_ttl_s=policy.health_down_ttl_s)
        self.outstanding = 0
        self.cooling_until_s = 0.0
        self.loras_loaded: set[str] = set()
        self.lora_locks: dict[str, asyncio.Lock] = {}
        self.counts: Counter[str] = Counter()

    def snapshot(self, now_s: float) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "outstanding": self.outstanding,
                "cooling_s": round(max(0.0, self.cooling_until_s - now_s), 3),
                "breaker": self.breaker.snapshot(), "health": self.health.snapshot(),
                "loras_loaded": sorted(self.loras_loaded),
                "calls_total": self.counts["calls"], "failures_total": self.counts["failures"],
                "skipped_total": self.counts["skipped"], "lora_loads_total": self.counts["lora_loads"],
                "lora_reloads_total": self.counts["lora_reloads"]}


class BalancedChatAPI:
    """A ChatAPI over several replicas of one OpenAI-compatible service (see the module
    docstring for the order of decisions). `loras` maps a LoRA name to the path to load it from
    ("" = never loaded by us); `lora_loader` None turns loading off."""

    def __init__(self, replicas: Sequence[ChatAPI], *, policy: ReplicaPolicy | None = None,
                 clock: Clock | None = None, loras: Mapping[str, str] | None = None,
                 lora_loader: LoraLoader | None = None) -> None:
        if not 1 <= len(replicas) <= REPLICAS_MAX:
            raise ValueError(f"replicas: 1..{REPLICAS_MAX} (REPLICAS_MAX), got {len(replicas)}")
        endpoints = [r.endpoint for r in replicas]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"replicas: each endpoint once, got {endpoints}")
        self.policy = policy or ReplicaPolicy()
        self.clock = clock or SystemClock()
        self.replicas = [Replica(i, api, self.policy, self.clock) for i, api in enumerate(replicas)]
        self.endpoint = "balanced(" + ",".join(endpoints) + ")"
        self._lora_paths = {name: path for name, path in (loras or {}).items() if path}
        self._lora_loader = lora_loader
        self._rr = itertools.count()
        self.counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"BalancedChatAPI({[r.endpoint for r in self.replicas]!r})"

    # ------------------------------------------------------------------------------------- pick

    def pick(self, exclude: set[int]) -> Replica | None:
        """The replica with the fewest outstanding requests among those not excluded and not
        cooling after a Retry-After; ties go round robin. Pure apart from the round-robin counter."""
        now_s = self.clock.monotonic()
        start = next(self._rr) % len(self.replicas)
        order = self.replicas[start:] + self.replicas[:start]
        candidates = [r for r in order if r.index not in exclude and r.cooling_until_s <= now_s]
        if not candidates:
            return None
        return min(candidates, key=lambda r: r.outstanding)      # min keeps the first of equals

    # ------------------------------------------------------------------------------------- call

    async def complete(self, request: ChatRequest, *, timeout_s: float, on_text: OnText | None = None) -> ChatResponse:
        tried: set[int] = set()
        why: list[str] = []                   # one line per replica that did not answer
        last: TransientLLMError | None = None
        self.counts["calls"] += 1
        for _ in range(len(self.replicas)):
            replica = self.pick(tried)
            if replica is None:
                break
            tried.add(replica.index)
            try:
                await replica.health.ensure_up()
                replica.breaker.before_call()
            except (EndpointDown, CircuitOpen) as exc:
                replica.counts["skipped"] += 1
                why.append(exc.message)
                _trace(replica, "skipped", exc)
                continue
            replica.outstanding += 1
            replica.counts["calls"] += 1
            try:
                response = await self._call(replica, request, timeout_s, on_text)
            except TransientLLMError as exc:
                replica.breaker.record_failure(exc)
                replica.counts["failures"] += 1
                last = exc
                why.append(exc.message)
                _trace(replica, "error", exc)
                if exc.retry_after_s is not None:
                    replica.cooling_until_s = self.clock.monotonic() + exc.retry_after_s
                if isinstance(exc, ConnectionFailed):
                    await _quietly(replica.health.ensure_up(force=True))   # down → skipped for a while
                continue
            except TaskError as exc:          # the replica answered "no": permanent, no failover
                replica.breaker.record_failure(exc)
                _trace(replica, "error", exc)
                raise
            except BaseException:             # cancelled (the stream was closed), or a bug
                replica.breaker.release()
                raise
            finally:
                replica.outstanding -= 1
            replica.breaker.record_success()
            _trace(replica, "ok", None)
            return response
        self.counts["failed"] += 1
        summary = "; ".join(why) if why else "none tried"
        if last is not None:                  # keeps the type, status and Retry-After of the last failure
            raise type(last)(f"{len(tried)} of {len(self.replicas)} replicas failed: {summary}",
                             status=last.status, retry_after_s=last.retry_after_s)
        cooling = [r.cooling_until_s - self.clock.monotonic() for r in self.replicas if r.index not in tried]
        if cooling:
            raise RateLimited(f"every replica asked to wait (Retry-After); the first is free in {min(cooling):.1f} s"
                              + (f"; others: {summary}" if why else ""), retry_after_s=max(0.0, min(cooling)))
        raise EndpointDown(f"all {len(self.replicas)} replicas are unavailable: {summary}")

    async def _call(self, replica: Replica, request: ChatRequest, timeout_s: float,
                    on_text: OnText | None) -> ChatResponse:
        await self._ensure_lora(replica, request.model)
        try:
            return await replica.api.complete(request, timeout_s=timeout_s, on_text=on_text)
        except RequestRejected as exc:
            # A restarted vLLM forgot the adapters loaded at run time: 404 "model does not exist".
            if exc.status != 404 or request.model not in replica.loras_loaded:
                raise
            replica.loras_loaded.discard(request.model)
            replica.counts["lora_reloads"] += 1
        await self._ensure_lora(replica, request.model)
        return await replica.api.complete(request, timeout_s=timeout_s, on_text=on_text)

    async def _ensure_lora(self, replica: Replica, model: str) -> None:
        path = self._lora_paths.get(model)
        if path is None or self._lora_loader is None or model in replica.loras_loaded:
            return
        lock = replica.lora_locks.setdefault(model, asyncio.Lock())
        async with lock:                      # concurrent tasks naming it load it once
            if model in replica.loras_loaded:
                return
            await self._lora_loader.load(replica.endpoint, model, path, timeout_s=self.policy.lora_load_timeout_s)
            replica.loras_loaded.add(model)
            replica.counts["lora_loads"] += 1

    async def probe(self, *, timeout_s: float) -> None:
        """Up when any replica is up (their health checks run concurrently and are cached)."""
        results = await asyncio.gather(*(r.health.ensure_up() for r in self.replicas), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, TaskError):
                raise result
        if all(isinstance(r, BaseException) for r in results):
            raise ConnectionFailed(f"all {len(self.replicas)} replicas are down: "
                                   + "; ".join(str(getattr(r, "message", r)) for r in results))

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.api.aclose()
        if self._lora_loader is not None:
            await self._lora_loader.aclose()

    def snapshot(self) -> dict[str, Any]:
        now_s = self.clock.monotonic()
        return {"calls_total": self.counts["calls"], "failed_total": self.counts["failed"],
                "replicas": [r.snapshot(now_s) for r in self.replicas]}


def _trace(replica: Replica, outcome: str, exc: TaskError | None) -> None:
    trace = _REPLICA_TRACE.get()
    if trace is None or len(trace) >= REPLICA_TRACE_MAX:
        return
    entry: dict[str, Any] = {"replica": replica.endpoint, "outcome": outcome}
    if exc is not None:
        entry["error"] = exc.code
        entry["reason"] = exc.message if len(exc.message) <= REASON_CHARS_MAX else exc.message[:REASON_CHARS_MAX] + "…"
    trace.append(entry)


async def _quietly(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except TaskError:
        pass


# ---------------------------------------------------------------------------------------- adapter


Resolver = Callable[[ExecutorTask], "tuple[str, str | None]"]


def resolve_model(task: ExecutorTask, config: LocalLLMConfig) -> tuple[str, str | None]:
    """(base model, LoRA name or None) of a task: metadata.model (default: the configured model)
    and metadata.lora, each checked against the configured sets. The seam for a model registry."""
    model = (task.metadata.get("model") or "").strip() or config.model
    if model not in config.models_allowed:
        raise InvalidTaskInput("metadata.model", f"one of {sorted(config.models_allowed)} "
                                                 f"(LocalLLMConfig.model/models), got {model[:MODEL_NAME_CHARS_MAX]!r}")
    lora = (task.metadata.get("lora") or "").strip() or None
    if lora is None:
        return model, None
    module = config.loras.get(lora)
    if module is None:
        allowed = sorted(config.loras) or "none are configured (LocalLLMConfig.loras, LOCAL_LLM_LORAS)"
        raise InvalidTaskInput("metadata.lora", f"one of the configured LoRA adapters: {allowed}; "
                                                f"got {lora[:MODEL_NAME_CHARS_MAX]!r}")
    base = module.base_model or config.model
    if task.metadata.get("model") and model != base:
        raise InvalidTaskInput("metadata.lora", f"{lora!r} is an adapter of {base!r}, not of metadata.model {model!r}")
    return base, lora


class LocalLLMAdapter(LLMAdapter):
    """ExecutorAdapter of type "local_llm". `replicas` replaces the HTTP clients (tests pass
    FakeChatAPIs); `lora_loader` replaces VLLMLoraLoader; `resolver` replaces `resolve_model`."""

    def __init__(self, config: LocalLLMConfig | None = None, *, env: Mapping[str, str] | None = None,
                 replicas: Sequence[ChatAPI] | None = None, lora_loader: LoraLoader | None = None,
                 resolver: Resolver | None = None, clock: Clock | None = None,
                 rng: random.Random | None = None) -> None:
        config = config or LocalLLMConfig.from_env(env)
        self.config = config
        clock = clock or SystemClock()
        key = config.api_key
        if replicas is None:
            replicas = [OpenAIChatAPI(url, api_key=key or Secret(NO_API_KEY), clock_unix_s=clock.time)
                        for url in config.endpoints]
        if lora_loader is None and config.load_lora:
            lora_loader = VLLMLoraLoader(api_key=key)
        api = BalancedChatAPI(replicas, policy=config.replica, clock=clock,
                              loras={name: m.path for name, m in config.loras.items()},
                              lora_loader=lora_loader if config.load_lora else None)
        settings = config.settings if config.cache is None else replace(config.settings, cache=config.cache)
        super().__init__(executor_type=ExecutorType.LOCAL_LLM, api=api, tiers={LOCAL_TIER: config.model},
                         prices=config.prices or PriceTable(default=FREE), settings=settings, clock=clock,
                         rng=rng, secrets=[key] if key is not None else [])
        self.balanced = api
        self._resolver: Resolver = resolver or (lambda task: resolve_model(task, self.config))
        self._chosen: dict[int, tuple[str, str | None]] = {}      # id(run) → (model, lora) while it runs
        self._handlers = {name: self._with_model(handler) for name, handler in self._handlers.items()}

    def __repr__(self) -> str:
        return f"LocalLLMAdapter(endpoints={list(self.config.endpoints)!r}, model={self.config.model!r})"

    def resolve_model(self, task: ExecutorTask) -> tuple[str, str | None]:
        model, lora = self._resolver(task)
        if not isinstance(model, str) or not model or not (lora is None or (isinstance(lora, str) and lora)):
            raise InvalidTaskInput("metadata.model", f"the resolver gave no usable model: {(model, lora)!r}")
        return model, lora

    # A task's model reaches LLMAdapter's calling code through `_chosen`: LLMAdapter picks models
    # from its tiers, so `_with_fallback` is overridden to call the task's model (or LoRA) once;
    # the replicas, not a tier chain, are the fallback. (A `_chain(task)` hook in LLMAdapter would
    # make this override unnecessary.)
    def _with_model(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def run_with_model(task: ExecutorTask, ctx: ExecutionContext, run: Any, account: TaskAccount) -> Any:
            model, lora = self.resolve_model(task)
            trace: list[dict[str, Any]] = []
            token = _REPLICA_TRACE.set(trace)
            self._chosen[id(run)] = (model, lora)
            try:
                output = await handler(task, ctx, run, account)
            finally:
                self._chosen.pop(id(run), None)
                _REPLICA_TRACE.reset(token)
            return {**output, "base_model": model, "lora": lora, "replicas": trace}
        return run_with_model

    async def _with_fallback(self, messages: list[Message], params: dict[str, Any], stream: bool, pin: str | None,
                             run: Any, ctx: ExecutionContext, account: TaskAccount) -> tuple[ChatResponse, str, str]:
        model, lora = self._chosen[id(run)]
        served = lora or model                 # vLLM serves a LoRA under its own name
        response = await self._call_tier(LOCAL_TIER, served, messages, params, stream, run, ctx, account)
        return response, LOCAL_TIER, served

    # ---------------------------------------------------------------------- capabilities, status

    def performance_profile(self) -> dict[str, Any]:
        return {**super().performance_profile(), "replicas_total": len(self.balanced.replicas),
                "models": sorted(self.config.models_allowed), "loras": sorted(self.config.loras)}

    def output_schemas(self) -> dict[str, Any]:
        schemas = super().output_schemas()
        extra = {"base_model": {"type": "string"}, "lora": {"type": ["string", "null"]},
                 "replicas": {"type": "array", "maxItems": REPLICA_TRACE_MAX, "items": {
                     "type": "object", "required": ["replica", "outcome"],
                     "properties": {"replica": {"type": "string"}, "outcome": {"enum": ["ok", "error", "skipped"]},
                                    "error": {"type": "string"}, "reason": {"type": "string"}}}}}
        for schema in schemas.values():
            schema["properties"].update(extra)
            schema["required"] = [*schema["required"], "base_model", "lora", "replicas"]
        return schemas

    def metadata_schema(self) -> dict[str, Any]:
        """The task metadata this adapter reads (all optional)."""
        return {"type": "object", "properties": {
            "model": {"enum": sorted(self.config.models_allowed), "default": self.config.model},
            "lora": {"enum": sorted(self.config.loras)},
            "template_version": {"type": "string", "pattern": "^[1-9][0-9]*$"}}}

    async def get_status(self) -> dict[str, Any]:
        return {**await super().get_status(), "model": self.config.model, "balancer": self.balanced.snapshot()}
