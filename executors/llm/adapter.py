"""`LLMAdapter`: an ExecutorAdapter over any OpenAI-compatible chat API, with tiers and a
fallback chain. Cloud.ru (executors/cloudru.py) configures it; a vLLM adapter can too.

    execute(task)
      validate input and metadata (tier pin, template version)
      render the prompt (templates.py; id + version go into the result)
      health.ensure_up()                    endpoint down → EndpointDown at once: no retry, no fallback
      for tier in big → middle → small (only the pinned tier when metadata.tier is set):
          cache hit? → answer from the cache
          resilience.call(endpoint#model)   retries with backoff / Retry-After; breaker per model
          TransientLLMError or CircuitOpen → record why, fall back to the next tier
      structured: parse + validate against the task's schema; repair prompts on the same tier
      result: output + tries (every failed call, retry delay, fallback) + tokens, cost, model_versions

Cancellation: the work runs in an inner task that is cancelled as soon as ctx.cancelled or
cancel(task_id) is seen (checked every cancel_poll_interval_ms); a stream being read is closed
on the way out. Every TaskError leaving `execute` has secrets masked (secrets.scrub_error).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.model import ExecutorCapabilities, ExecutorType
from executors.base import (
    ExecutionContext,
    ExecutorResult,
    ExecutorTask,
    InvalidTaskInput,
    TaskCancelled,
    TaskError,
    admit,
    run_status,
)
from executors.llm.accounting import PriceTable, TaskAccount, Usage, UsageLedger
from executors.llm.cache import CacheLimits, ResponseCache, cache_key
from executors.llm.client import ChatAPI, ChatRequest, ChatResponse
from executors.llm.errors import CircuitOpen, TiersExhausted, TransientLLMError
from executors.llm.parsing import check_schema, parse_with_repair
from executors.llm.resilience import BreakerPolicy, Clock, HealthCheck, Resilience, RetryPolicy, SystemClock
from executors.llm.secrets import Secret, scrub_error
from executors.llm.templates import (
    REPAIR_TEMPLATE_ID,
    REPAIR_TEMPLATE_VERSION,
    Message,
    TemplateLimits,
    TemplateRegistry,
    default_registry,
)

TIERS = ("big", "middle", "small")
COST_ESTIMATE_PROMPT_TOKENS = 1_000      # a task's tokens assumed before any was measured
COST_ESTIMATE_COMPLETION_TOKENS = 500
REASON_CHARS_MAX = 300                   # an error message kept in a result's `tries`


@dataclass(frozen=True)
class LLMSettings:
    request_timeout_s: float = 120.0        # one HTTP call, all of it (a stream included)
    health_timeout_s: float = 5.0
    health_up_ttl_s: float = 30.0           # an "up" answer is trusted this long
    health_down_ttl_s: float = 5.0          # a "down" answer fails tasks fast this long
    repair_attempts_max: int = 2
    running_tasks_max: int = 64
    max_tokens_default: int = 2_048
    max_tokens_max: int = 32_768
    temperature_max: float = 2.0
    stream_default: bool = False
    cancel_poll_interval_ms: int = 20       # how often ctx.cancelled is looked at
    cancel_grace_s: float = 5.0             # wait this long for a cancelled call to close its stream
    progress_interval_chars: int = 1_000    # a progress report per this many streamed chars
    tries_recorded_max: int = 64            # entries of a result's `tries`
    context_window_size: int = 0            # tokens; 0 = not stated
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    templates: TemplateLimits = field(default_factory=TemplateLimits)
    cache: CacheLimits | None = None        # None: no response cache (the default)

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "health_timeout_s", "health_up_ttl_s", "health_down_ttl_s", "cancel_grace_s"):
            if not 0 < getattr(self, name) <= 3_600:
                raise ValueError(f"LLMSettings.{name}: in (0, 3600] s, got {getattr(self, name)!r}")
        for name, low in (("repair_attempts_max", 0), ("running_tasks_max", 1), ("max_tokens_default", 1),
                          ("max_tokens_max", 1), ("cancel_poll_interval_ms", 1), ("progress_interval_chars", 1),
                          ("tries_recorded_max", 1), ("context_window_size", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"LLMSettings.{name}: an int >= {low}, got {value!r}")
        if self.repair_attempts_max > 10:
            raise ValueError(f"LLMSettings.repair_attempts_max: at most 10, got {self.repair_attempts_max}")
        if self.max_tokens_default > self.max_tokens_max:
            raise ValueError("LLMSettings.max_tokens_default: at most max_tokens_max")


@dataclass
class _Run:
    task_id: str
    attempt: int
    type: str
    started_s: float
    tries_recorded_max: int
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    tries: list[dict[str, Any]] = field(default_factory=list)
    tries_dropped: int = 0
    retries: int = 0
    fallbacks: int = 0
    repairs: int = 0
    model_versions: dict[str, str] = field(default_factory=dict)

    def record(self, entry: dict[str, Any]) -> None:
        if len(self.tries) < self.tries_recorded_max:
            self.tries.append({k: v for k, v in entry.items() if v is not None})
        else:
            self.tries_dropped += 1


_PARAMETER_FIELDS = {"temperature", "max_tokens", "stream"}
_CHAT_FIELDS = {"prompt", "messages", "system"} | _PARAMETER_FIELDS
_STRUCTURED_FIELDS = {"instruction", "schema", "data", "system"} | _PARAMETER_FIELDS
_METADATA_FIELDS = ("tier", "template_version")


class LLMAdapter:
    """Implements executors.base.ExecutorAdapter for chat-completion endpoints."""

    def __init__(self, *, executor_type: ExecutorType, api: ChatAPI, tiers: Mapping[str, str],
                 prices: PriceTable | None = None, settings: LLMSettings | None = None,
                 clock: Clock | None = None, rng: random.Random | None = None,
                 templates: TemplateRegistry | None = None, secrets: Sequence[str | Secret] = ()) -> None:
        unknown = set(tiers) - set(TIERS)
        if not tiers or unknown:
            raise ValueError(f"tiers: a mapping of some of {list(TIERS)} to model ids, got {sorted(tiers)}")
        for tier, model in tiers.items():
            if not isinstance(model, str) or not model.strip():
                raise ValueError(f"tiers.{tier}: a non-empty model id, got {model!r}")
        self.executor_type = executor_type
        self.api = api
        self.tiers = {t: tiers[t] for t in TIERS if t in tiers}
        self.prices = prices or PriceTable()
        self.settings = settings or LLMSettings()
        self.clock = clock or SystemClock()
        self.templates = templates or default_registry(self.settings.templates)
        self._secrets = list(secrets)
        self.resilience = Resilience(retry=self.settings.retry, breaker=self.settings.breaker, clock=self.clock,
                                     rng=rng or random.Random())
        self.health = HealthCheck(api.endpoint, lambda: api.probe(timeout_s=self.settings.health_timeout_s),
                                  self.clock, timeout_s=self.settings.health_timeout_s,
                                  up_ttl_s=self.settings.health_up_ttl_s, down_ttl_s=self.settings.health_down_ttl_s)
        self.cache = ResponseCache(self.settings.cache, clock=self.clock) if self.settings.cache else None
        self.ledger = UsageLedger()
        self._handlers: dict[str, Callable[[ExecutorTask, ExecutionContext, _Run, TaskAccount], Awaitable[Any]]] = {
            "chat": self._chat, "structured": self._structured}
        self._running: dict[int, _Run] = {}
        self._run_ids = itertools.count(1)
        self._counts: Counter[str] = Counter()

    # ------------------------------------------------------------------------------ the protocol

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        admit(task, self._handlers, len(self._running), self.settings.running_tasks_max, self._counts)
        handler = self._handlers[task.type]
        run_id = next(self._run_ids)
        run = _Run(task.task_id, task.attempt, task.type, self.clock.monotonic(), self.settings.tries_recorded_max)
        self._running[run_id] = run
        self._counts["started"] += 1
        account = TaskAccount(self.prices)
        try:
            output = await self._until_cancelled(run, ctx, handler(task, ctx, run, account))
        except TaskCancelled as exc:
            self._counts["cancelled"] += 1
            raise scrub_error(exc, self._secrets)
        except asyncio.CancelledError:
            self._counts["cancelled"] += 1
            raise
        except TaskError as exc:
            self._counts["failed"] += 1
            raise scrub_error(exc, self._secrets)
        except Exception as exc:             # a bug: task_error_from in the runtime maps it
            self._counts["failed"] += 1
            raise scrub_error(exc, self._secrets)
        finally:
            del self._running[run_id]
            self.ledger.add_task(account)    # tokens spent by a failed attempt cost money too
        self._counts["succeeded"] += 1
        metrics = {**account.metrics(), "duration_s": round(self.clock.monotonic() - run.started_s, 6),
                   "retries_total": run.retries, "fallbacks_total": run.fallbacks, "repairs_total": run.repairs}
        return ExecutorResult(output=output, metrics=metrics)

    def get_capabilities(self) -> ExecutorCapabilities:
        return ExecutorCapabilities(
            supported_task_types=list(self._handlers),
            input_schema=self.input_schemas(),
            output_schema=self.output_schemas(),
            performance_profile=self.performance_profile(),
            context_window_size=self.settings.context_window_size,
            resumable=False,
        )

    def profile_inputs(self) -> dict[str, list[Any]]:
        """For `coordctl executor profile`: one tiny chat (a paid endpoint spends a few tokens)."""
        return {"chat": [{"prompt": "Say OK.", "max_tokens": 4}]}

    async def get_status(self) -> dict[str, Any]:
        return {
            "executor_type": self.executor_type.value,
            "endpoint": self.api.endpoint,
            "tiers": dict(self.tiers),
            **run_status(self._running.values(), self.clock.monotonic(), self.settings.running_tasks_max,
                         self._counts),
            "usage": self.ledger.snapshot(),
            "resilience": self.resilience.snapshot(),
            "health": self.health.snapshot(),
            "cache": self.cache.snapshot() if self.cache else None,
        }

    async def cancel(self, task_id: str) -> None:
        for run in self._running.values():
            if run.task_id == task_id:
                run.cancel_requested.set()

    async def aclose(self) -> None:
        await self.api.aclose()

    # ------------------------------------------------------------------------ profile and schemas

    def performance_profile(self) -> dict[str, Any]:
        """What the scheduler reads: `cost_per_task` (USD; measured once tasks ran, else an
        estimate from the first tier's price) and the price of each tier per 1M tokens."""
        per_tier = {}
        for tier, model in self.tiers.items():
            price = self.prices.price_of(model)
            per_tier[tier] = {"model": model,
                              "input_usd_per_1m_tokens": price.input_usd_per_1m_tokens if price else None,
                              "output_usd_per_1m_tokens": price.output_usd_per_1m_tokens if price else None}
        measured = self.ledger.cost_per_task_usd
        if measured is not None:
            cost, basis = measured, "measured"
        else:
            price = self.prices.price_of(next(iter(self.tiers.values())))
            cost = price.cost_usd(COST_ESTIMATE_PROMPT_TOKENS, COST_ESTIMATE_COMPLETION_TOKENS) if price else 0.0
            basis = f"estimate: {COST_ESTIMATE_PROMPT_TOKENS} prompt + {COST_ESTIMATE_COMPLETION_TOKENS} completion tokens"
        return {"cost_per_task": round(cost, 9), "cost_per_task_basis": basis, "cost_usd_per_1m_tokens": per_tier,
                "running_tasks_max": self.settings.running_tasks_max}

    def input_schemas(self) -> dict[str, Any]:
        limits = self.settings.templates
        message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
                   "properties": {"role": {"enum": ["system", "user", "assistant"]},
                                  "content": {"type": "string", "maxLength": limits.message_chars_max},
                                  "name": {"type": "string"}}}
        params = {"temperature": {"type": "number", "minimum": 0, "maximum": self.settings.temperature_max},
                  "max_tokens": {"type": "integer", "minimum": 1, "maximum": self.settings.max_tokens_max,
                                 "default": self.settings.max_tokens_default},
                  "stream": {"type": "boolean", "default": self.settings.stream_default},
                  "system": {"type": "string", "maxLength": limits.message_chars_max}}
        return {
            "chat": {"type": "object", "additionalProperties": False,
                     "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
                     "properties": {"prompt": {"type": "string", "minLength": 1,
                                               "maxLength": limits.message_chars_max},
                                    "messages": {"type": "array", "minItems": 1, "maxItems": limits.messages_max,
                                                 "items": message}, **params}},
            "structured": {"type": "object", "additionalProperties": False, "required": ["instruction", "schema"],
                           "properties": {"instruction": {"type": "string", "minLength": 1,
                                                          "maxLength": limits.message_chars_max},
                                          "schema": {"type": "object",
                                                     "description": f"a JSON Schema, at most "
                                                                    f"{limits.schema_bytes_max} bytes"},
                                          "data": {"description": f"any JSON, at most {limits.data_bytes_max} bytes"},
                                          **params}},
        }

    def output_schemas(self) -> dict[str, Any]:
        envelope = {
            "model": {"type": "string"}, "model_id": {"type": "string"}, "tier": {"enum": list(TIERS)},
            "template": {"type": "object", "required": ["id", "version"]},
            "model_versions": {"type": "object", "additionalProperties": {"type": "string"}},
            "usage": {"type": "object"}, "cost_usd": {"type": "number", "minimum": 0},
            "tries": {"type": "array", "items": {"type": "object"}}, "cached": {"type": "boolean"},
            "finish_reason": {"type": ["string", "null"]},
        }
        required = ["model", "model_id", "tier", "template", "model_versions", "usage", "cost_usd", "tries"]
        return {
            "chat": {"type": "object", "required": ["text", *required],
                     "properties": {"text": {"type": "string"}, **envelope}},
            "structured": {"type": "object", "required": ["value", "repairs", *required],
                           "properties": {"value": {"description": "conforms to input.schema"},
                                          "repairs": {"type": "integer", "minimum": 0},
                                          "repair_template": {"type": "object"}, **envelope}},
        }

    # ---------------------------------------------------------------------------------- handlers

    async def _chat(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run, account: TaskAccount) -> Any:
        fields = _fields(task.input, _CHAT_FIELDS, set(), '{"prompt": str} or {"messages": [...]}')
        pin, version = self._metadata(task)
        prompt = self.templates.render("chat", {k: fields[k] for k in ("prompt", "messages", "system") if k in fields},
                                       version=version)
        params, stream = self._parameters(fields)
        await ctx.progress(0.0, "checking the endpoint")
        await self.health.ensure_up()
        response, tier, model = await self._with_fallback(prompt.messages, params, stream, pin, run, ctx, account)
        await ctx.progress(1.0, f"answered by {tier} ({response.model})")
        return {"text": response.text, **self._envelope(prompt.template_ref, response, tier, model, run, account)}

    async def _structured(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run, account: TaskAccount) -> Any:
        fields = _fields(task.input, _STRUCTURED_FIELDS, {"instruction", "schema"},
                         '{"instruction": str, "schema": {...}, "data"?: any}')
        pin, version = self._metadata(task)
        check_schema(fields["schema"])
        prompt = self.templates.render(
            "structured", {k: fields[k] for k in ("instruction", "schema", "data", "system") if k in fields},
            version=version)
        params, stream = self._parameters(fields)
        await ctx.progress(0.0, "checking the endpoint")
        await self.health.ensure_up()
        response, tier, model = await self._with_fallback(prompt.messages, params, stream, pin, run, ctx, account)
        last = [response]

        async def ask(messages: list[Message]) -> str:
            run.repairs += 1
            await ctx.progress(0.5, f"repair prompt {run.repairs} to {tier}")
            last[0] = await self._call_tier(tier, model, messages, params, stream, run, ctx, account)
            return last[0].text

        outcome = await parse_with_repair(response.text, fields["schema"], messages=prompt.messages, ask=ask,
                                          repair_attempts_max=self.settings.repair_attempts_max,
                                          limits=self.settings.templates)
        await ctx.progress(1.0, f"answered by {tier} ({last[0].model})")
        return {"value": outcome.value, "repairs": outcome.repairs,
                "repair_template": {"id": REPAIR_TEMPLATE_ID, "version": REPAIR_TEMPLATE_VERSION},
                **self._envelope(prompt.template_ref, last[0], tier, model, run, account)}

    # ------------------------------------------------------------------------------- the calling

    async def _with_fallback(self, messages: list[Message], params: dict[str, Any], stream: bool, pin: str | None,
                             run: _Run, ctx: ExecutionContext, account: TaskAccount) -> tuple[ChatResponse, str, str]:
        chain = [pin] if pin is not None else list(self.tiers)
        failed: dict[str, str] = {}          # model id → the tier it failed on
        last: TaskError | None = None
        for i, tier in enumerate(chain):
            model = self.tiers[tier]
            if model in failed:
                run.record({"tier": tier, "model": model, "outcome": "skipped",
                            "reason": f"same model as tier {failed[model]}, which failed"})
                continue
            if last is not None:
                run.fallbacks += 1
            try:
                return await self._call_tier(tier, model, messages, params, stream, run, ctx, account), tier, model
            except (TransientLLMError, CircuitOpen) as exc:
                failed[model] = tier
                last = exc
                more = any(self.tiers[t] not in failed for t in chain[i + 1:])
                run.record({"tier": tier, "model": model, "outcome": "fallback" if more else "failed",
                            "error": exc.code, "reason": _clip(exc.message)})
        if pin is not None and last is not None:
            raise last                        # pinned: no other tier is tried
        summary = "; ".join(f"{t['tier']} ({t['model']}): {t.get('reason', t['outcome'])}"
                            for t in run.tries if t.get("outcome") in ("fallback", "failed", "skipped"))
        raise TiersExhausted(f"every tier of the fallback chain {chain} failed: {summary}", tries=list(run.tries))

    async def _call_tier(self, tier: str, model: str, messages: list[Message], params: dict[str, Any], stream: bool,
                         run: _Run, ctx: ExecutionContext, account: TaskAccount) -> ChatResponse:
        key = None
        if self.cache is not None:
            key = cache_key(model, messages, params)
            hit = self.cache.get(key)
            if hit is not None:
                response = ChatResponse.from_json(hit)
                account.add(model, Usage(), cached=True)
                run.model_versions[model] = response.model
                run.record({"tier": tier, "model": model, "outcome": "cache_hit"})
                return response
        request = ChatRequest(model, messages, params, stream)

        def on_failure(attempt: int, exc: TransientLLMError, delay_s: float | None) -> None:
            if delay_s is not None:
                run.retries += 1
            run.record({"tier": tier, "model": model, "attempt": attempt, "outcome": "error", "error": exc.code,
                        "status": exc.status, "retry_in_s": None if delay_s is None else round(delay_s, 3),
                        "reason": _clip(exc.message)})

        on_text = self._progress_of_stream(ctx, params) if stream else None
        await ctx.progress(0.05, f"calling {tier} ({model})")
        response = await self.resilience.call(
            f"{self.api.endpoint}#{model}",
            lambda: self.api.complete(request, timeout_s=self.settings.request_timeout_s, on_text=on_text),
            health=self.health, on_failure=on_failure)
        account.add(model, response.usage)
        run.model_versions[model] = response.model
        run.record({"tier": tier, "model": model, "outcome": "ok", "served_by": response.model})
        if key is not None:
            self.cache.put(key, response.to_json())
        return response

    def _progress_of_stream(self, ctx: ExecutionContext, params: Mapping[str, Any]) -> Callable[[int], Awaitable[None]]:
        expected_chars = 4 * params.get("max_tokens", self.settings.max_tokens_default)
        interval = self.settings.progress_interval_chars
        reported = [0]

        async def on_text(chars: int) -> None:
            if chars - reported[0] >= interval:
                reported[0] = chars
                await ctx.progress(min(0.95, 0.05 + chars / expected_chars), f"{chars} chars streamed")
        return on_text

    async def _until_cancelled(self, run: _Run, ctx: ExecutionContext, work: Awaitable[Any]) -> Any:
        inner = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(run.cancel_requested.wait())
        poll_s = self.settings.cancel_poll_interval_ms / 1000
        try:
            while True:
                if run.cancel_requested.is_set() or ctx.cancelled:
                    break
                done, _ = await asyncio.wait({inner, waiter}, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
                if inner in done:
                    return inner.result()
            inner.cancel()
            await asyncio.wait({inner}, timeout=self.settings.cancel_grace_s)
            raise TaskCancelled(f"{run.type} task {run.task_id!r} attempt {run.attempt} cancelled; "
                                "its model call was stopped")
        finally:
            waiter.cancel()
            if not inner.done():
                inner.cancel()
                await asyncio.wait({inner}, timeout=self.settings.cancel_grace_s)
            if inner.done() and not inner.cancelled():
                inner.exception()           # retrieved: no "never retrieved" warning

    # -------------------------------------------------------------------------------- the result

    def _envelope(self, template: dict[str, Any], response: ChatResponse, tier: str, model: str, run: _Run,
                  account: TaskAccount) -> dict[str, Any]:
        out = {"model": response.model, "model_id": model, "tier": tier, "template": template,
               "model_versions": dict(run.model_versions), "usage": account.usage_output(),
               "cost_usd": round(account.cost_usd, 9), "tries": list(run.tries),
               "cached": bool(account.calls) and account.calls[-1].cached,
               "finish_reason": response.finish_reason}
        if run.tries_dropped:
            out["tries_dropped"] = run.tries_dropped
        return out

    # -------------------------------------------------------------------------------- validation

    def _metadata(self, task: ExecutorTask) -> tuple[str | None, int | None]:
        pin = task.metadata.get("tier") or None
        if pin is not None and pin not in self.tiers:
            raise InvalidTaskInput("metadata.tier", f"one of {list(self.tiers)}, got {pin!r}")
        version_text = task.metadata.get("template_version") or None
        version = None
        if version_text is not None:
            if not str(version_text).isdigit() or int(version_text) < 1:
                raise InvalidTaskInput("metadata.template_version", f"a positive integer, got {version_text!r}")
            version = int(version_text)
        return pin, version

    def _parameters(self, fields: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        params: dict[str, Any] = {}
        temperature = fields.get("temperature")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                    or not 0 <= temperature <= self.settings.temperature_max:
                raise InvalidTaskInput("input.temperature",
                                       f"a number in 0..{self.settings.temperature_max} (temperature_max)")
            params["temperature"] = float(temperature)
        max_tokens = fields.get("max_tokens", self.settings.max_tokens_default)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) \
                or not 1 <= max_tokens <= self.settings.max_tokens_max:
            raise InvalidTaskInput("input.max_tokens", f"an integer in 1..{self.settings.max_tokens_max} "
                                                       f"(max_tokens_max), got {max_tokens!r}")
        params["max_tokens"] = max_tokens
        stream = fields.get("stream", self.settings.stream_default)
        if not isinstance(stream, bool):
            raise InvalidTaskInput("input.stream", f"true or false, got {stream!r}")
        return params, stream


def _fields(value: Any, allowed: set[str], required: set[str], shape: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidTaskInput("input", f"an object {shape}, got {type(value).__name__}")
    for name in sorted(required):
        if name not in value:
            raise InvalidTaskInput(f"input.{name}", f"required field is missing; expected {shape}")
    for name in sorted(map(str, value)):
        if name not in allowed:
            raise InvalidTaskInput(f"input.{name}", f"unknown field; allowed fields are {sorted(allowed)}")
    return value


def _clip(text: str) -> str:
    return text if len(text) <= REASON_CHARS_MAX else text[:REASON_CHARS_MAX] + "…"
