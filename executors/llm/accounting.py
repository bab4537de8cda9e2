"""Tokens and cost: per call (from the API's `usage`), per task (`TaskAccount`, into the
result's metrics) and per executor (`UsageLedger`, into get_status and the performance
profile the scheduler's cost-optimized policy reads).

Prices come from a `PriceTable`: per model, USD per 1M input (prompt) and per 1M output
(completion) tokens. A model missing from the table costs `default` (zero unless set) and is
counted in `unpriced_calls_total`, so a forgotten price shows up instead of silently reading 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TOKENS_PER_PRICE_UNIT = 1_000_000
CALLS_RECORDED_MAX = 256          # calls kept in one TaskAccount (counted beyond that, not listed)
MODELS_TRACKED_MAX = 256          # models kept in the ledger


@dataclass(frozen=True)
class ModelPrice:
    input_usd_per_1m_tokens: float
    output_usd_per_1m_tokens: float

    def __post_init__(self) -> None:
        for name in ("input_usd_per_1m_tokens", "output_usd_per_1m_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10_000:
                raise ValueError(f"ModelPrice.{name}: a number in 0..10000 USD, got {value!r}")

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_1m_tokens
                + completion_tokens * self.output_usd_per_1m_tokens) / TOKENS_PER_PRICE_UNIT


FREE = ModelPrice(0.0, 0.0)


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    default: ModelPrice | None = None     # None: an unknown model costs 0 and is counted unpriced

    def price_of(self, model: str) -> ModelPrice | None:
        return self.prices.get(model, self.default)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Mapping[str, float]]) -> PriceTable:
        """From {"model": {"input": usd_per_1m, "output": usd_per_1m}} (e.g. parsed config)."""
        prices = {}
        for model, row in table.items():
            unknown = set(row) - {"input", "output"}
            if unknown:
                raise ValueError(f"prices.{model}: unknown keys {sorted(unknown)}; allowed: input, output")
            prices[model] = ModelPrice(float(row.get("input", 0.0)), float(row.get("output", 0.0)))
        return cls(prices)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reported: bool = True                 # False: the API sent no usage (counted, not guessed)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_api(cls, usage: Any) -> Usage:
        """From the API's `usage` object or dict; missing → reported=False with zero tokens."""
        if usage is None:
            return cls(0, 0, reported=False)
        get = usage.get if isinstance(usage, Mapping) else (lambda name, d=None: getattr(usage, name, d))
        prompt, completion = get("prompt_tokens", 0) or 0, get("completion_tokens", 0) or 0
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion)):
            return cls(0, 0, reported=False)
        return cls(prompt, completion)


@dataclass(frozen=True)
class CallRecord:
    model: str
    usage: Usage
    cost_usd: float
    cached: bool = False


class TaskAccount:
    """The calls of one task attempt."""

    def __init__(self, prices: PriceTable) -> None:
        self._prices = prices
        self.calls: list[CallRecord] = []
        self.calls_total = 0
        self.tokens_prompt_total = 0
        self.tokens_completion_total = 0
        self.cost_usd = 0.0
        self.cache_hits_total = 0
        self.usage_missing_calls_total = 0
        self.unpriced_calls_total = 0

    def add(self, model: str, usage: Usage, *, cached: bool = False) -> CallRecord:
        """One model call. A cache hit costs nothing and uses no tokens (it called no model)."""
        if cached:
            record = CallRecord(model, Usage(0, 0), 0.0, cached=True)
            self.cache_hits_total += 1
        else:
            price = self._prices.price_of(model)
            if price is None:
                self.unpriced_calls_total += 1
            cost = price.cost_usd(usage.prompt_tokens, usage.completion_tokens) if price else 0.0
            record = CallRecord(model, usage, cost)
            self.calls_total += 1
            self.tokens_prompt_total += usage.prompt_tokens
            self.tokens_completion_total += usage.completion_tokens
            self.cost_usd += cost
            if not usage.reported:
                self.usage_missing_calls_total += 1
        if len(self.calls) < CALLS_RECORDED_MAX:
            self.calls.append(record)
        return record

    def metrics(self) -> dict[str, float]:
        return {
            "llm_calls_total": self.calls_total,
            "tokens_prompt_total": self.tokens_prompt_total,
            "tokens_completion_total": self.tokens_completion_total,
            "tokens_total": self.tokens_prompt_total + self.tokens_completion_total,
            "cost_usd": round(self.cost_usd, 9),
            "cache_hits_total": self.cache_hits_total,
            "usage_missing_calls_total": self.usage_missing_calls_total,
        }

    def usage_output(self) -> dict[str, Any]:
        return {"prompt_tokens": self.tokens_prompt_total, "completion_tokens": self.tokens_completion_total,
                "calls": self.calls_total, "cache_hits": self.cache_hits_total,
                "usage_missing_calls": self.usage_missing_calls_total}


class UsageLedger:
    """Accumulated over an executor's life: per model and in total."""

    def __init__(self) -> None:
        self.tasks_total = 0
        self.cost_usd_total = 0.0
        self.tokens_prompt_total = 0
        self.tokens_completion_total = 0
        self.unpriced_calls_total = 0
        self.by_model: dict[str, dict[str, float]] = {}

    def add_task(self, account: TaskAccount) -> None:
        self.tasks_total += 1
        self.cost_usd_total += account.cost_usd
        self.tokens_prompt_total += account.tokens_prompt_total
        self.tokens_completion_total += account.tokens_completion_total
        self.unpriced_calls_total += account.unpriced_calls_total
        for call in account.calls:
            if call.model not in self.by_model and len(self.by_model) >= MODELS_TRACKED_MAX:
                continue
            row = self.by_model.setdefault(call.model, {"calls_total": 0, "cache_hits_total": 0,
                                                        "tokens_prompt_total": 0, "tokens_completion_total": 0,
                                                        "cost_usd": 0.0})
            row["cache_hits_total" if call.cached else "calls_total"] += 1
            row["tokens_prompt_total"] += call.usage.prompt_tokens
            row["tokens_completion_total"] += call.usage.completion_tokens
            row["cost_usd"] += call.cost_usd

    @property
    def cost_per_task_usd(self) -> float | None:
        return self.cost_usd_total / self.tasks_total if self.tasks_total else None

    def snapshot(self) -> dict[str, Any]:
        return {"tasks_total": self.tasks_total, "cost_usd_total": round(self.cost_usd_total, 9),
                "cost_per_task_usd": None if self.cost_per_task_usd is None else round(self.cost_per_task_usd, 9),
                "tokens_prompt_total": self.tokens_prompt_total,
                "tokens_completion_total": self.tokens_completion_total,
                "unpriced_calls_total": self.unpriced_calls_total,
                "by_model": {m: dict(r) for m, r in sorted(self.by_model.items())}}
