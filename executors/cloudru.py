"""The Cloud.ru Foundation Models executor: `LLMAdapter` (executors/llm/adapter.py) over the
OpenAI-compatible FM API with the `openai` client.

    adapter = CloudRuAdapter()                                # key from CLOUDRU_API_KEY
    adapter = CloudRuAdapter(CloudRuConfig(preset="qwen", base_url=..., cache=CacheLimits()))

Model tiers big / middle / small; presets (model ids configurable, `CloudRuModels`):

    glm47   GLM-4.7            GLM-4.7-FlashX   GLM-4.7-Flash
    flash   GLM-4.7-Flash      GLM-4.7-Flash    GLM-4.7-Flash     (free tier)
    qwen    Qwen3-Coder-480B   GLM-4.7-FlashX   GLM-4.7-Flash

A task falls back big → middle → small when a tier fails with a retryable error (after its
retries) or its circuit is open; metadata {"tier": "middle"} pins a task to one tier. Task types:
`chat` ({"prompt"} or {"messages"} → {"text"}) and `structured` ({"instruction", "schema",
"data"?} → {"value"} validated against the schema, with repair prompts). Every result records
the template, the models tried and why, tokens, cost and `model_versions`.

The API key comes from the environment (CLOUDRU_API_KEY) or `api_key=`; it is held in a
`Secret` and masked out of every error. A missing key fails at construction, naming the
variable. Environment overrides (all optional): CLOUDRU_BASE_URL, CLOUDRU_PRESET,
CLOUDRU_MODEL_BIG / _MIDDLE / _SMALL.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.model import ExecutorType
from executors.llm.accounting import FREE, ModelPrice, PriceTable
from executors.llm.adapter import TIERS, LLMAdapter, LLMSettings
from executors.llm.cache import CacheLimits
from executors.llm.client import ChatAPI, OpenAIChatAPI
from executors.llm.errors import MissingApiKey
from executors.llm.resilience import Clock
from executors.llm.secrets import Secret

CLOUDRU_BASE_URL_DEFAULT = "https://foundation-models.api.cloud.ru/v1"
CLOUDRU_API_KEY_ENV = "CLOUDRU_API_KEY"
CLOUDRU_BASE_URL_ENV = "CLOUDRU_BASE_URL"
CLOUDRU_PRESET_ENV = "CLOUDRU_PRESET"
CLOUDRU_MODEL_ENV = {"big": "CLOUDRU_MODEL_BIG", "middle": "CLOUDRU_MODEL_MIDDLE", "small": "CLOUDRU_MODEL_SMALL"}


@dataclass(frozen=True)
class CloudRuModels:
    """Full model ids on the FM API; override when Cloud.ru names them differently."""

    glm47: str = "zai-org/GLM-4.7"
    glm47_flashx: str = "zai-org/GLM-4.7-FlashX"
    glm47_flash: str = "zai-org/GLM-4.7-Flash"
    qwen3_coder: str = "Qwen/Qwen3-Coder-480B-A35B-Instruct"


PRESETS: dict[str, tuple[str, str, str]] = {       # big, middle, small: fields of CloudRuModels
    "glm47": ("glm47", "glm47_flashx", "glm47_flash"),
    "flash": ("glm47_flash", "glm47_flash", "glm47_flash"),
    "qwen": ("qwen3_coder", "glm47_flashx", "glm47_flash"),
}


def preset_tiers(preset: str, models: CloudRuModels | None = None,
                 overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """tier → model id for a preset, with per-tier overrides."""
    if preset not in PRESETS:
        raise ValueError(f"preset: one of {sorted(PRESETS)}, got {preset!r}")
    models = models or CloudRuModels()
    tiers = {tier: getattr(models, name) for tier, name in zip(TIERS, PRESETS[preset])}
    for tier, model in (overrides or {}).items():
        if tier not in TIERS:
            raise ValueError(f"tier_models.{tier}: not a tier; tiers are {list(TIERS)}")
        tiers[tier] = model
    return tiers


def default_prices(models: CloudRuModels | None = None) -> PriceTable:
    """USD per 1M tokens (input, output). PLACEHOLDERS of the right order of magnitude, except
    GLM-4.7-Flash, which is free: set the real numbers from the Cloud.ru price list through
    CloudRuConfig.prices before relying on costs."""
    m = models or CloudRuModels()
    return PriceTable({
        m.glm47: ModelPrice(0.60, 2.20),
        m.glm47_flashx: ModelPrice(0.07, 0.40),
        m.glm47_flash: FREE,
        m.qwen3_coder: ModelPrice(0.40, 1.60),
    })


@dataclass(frozen=True)
class CloudRuConfig:
    base_url: str = CLOUDRU_BASE_URL_DEFAULT
    preset: str = "glm47"
    models: CloudRuModels = field(default_factory=CloudRuModels)
    tier_models: Mapping[str, str] = field(default_factory=dict)     # per-tier overrides of the preset
    prices: PriceTable | None = None                                 # None: default_prices(models)
    settings: LLMSettings = field(default_factory=LLMSettings)
    cache: CacheLimits | None = None                                 # None: no response cache

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("https://", "http://")):
            raise ValueError(f"base_url: an http(s) URL, got {self.base_url!r}")
        preset_tiers(self.preset, self.models, self.tier_models)     # validates preset and tiers

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> CloudRuConfig:
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        if env.get(CLOUDRU_BASE_URL_ENV):
            kwargs["base_url"] = env[CLOUDRU_BASE_URL_ENV]
        if env.get(CLOUDRU_PRESET_ENV):
            kwargs["preset"] = env[CLOUDRU_PRESET_ENV]
        tier_models = {tier: env[name] for tier, name in CLOUDRU_MODEL_ENV.items() if env.get(name)}
        if tier_models:
            kwargs["tier_models"] = tier_models
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def tiers(self) -> dict[str, str]:
        return preset_tiers(self.preset, self.models, self.tier_models)


def api_key_from(env: Mapping[str, str], api_key: str | Secret | None = None) -> Secret:
    if isinstance(api_key, Secret):
        return api_key
    value = api_key if api_key is not None else env.get(CLOUDRU_API_KEY_ENV, "")
    if not value or not value.strip():
        raise MissingApiKey(f"{CLOUDRU_API_KEY_ENV} is not set: export the Cloud.ru Foundation Models API key "
                            f"in {CLOUDRU_API_KEY_ENV} (or pass api_key=)")
    return Secret(value.strip())


class CloudRuAdapter(LLMAdapter):
    """ExecutorAdapter of type "cloudru". `api` replaces the HTTP client (tests pass
    executors.llm.fake.FakeChatAPI); `http_client` is handed to openai.AsyncOpenAI."""

    def __init__(self, config: CloudRuConfig | None = None, *, env: Mapping[str, str] | None = None,
                 api_key: str | Secret | None = None, api: ChatAPI | None = None, http_client: Any = None,
                 clock: Clock | None = None, rng: random.Random | None = None) -> None:
        env = os.environ if env is None else env
        config = config or CloudRuConfig.from_env(env)
        self.config = config
        secrets: list[Secret] = []
        if api is None:
            key = api_key_from(env, api_key)
            secrets.append(key)
            api = OpenAIChatAPI(config.base_url, api_key=key, http_client=http_client,
                                clock_unix_s=clock.time if clock is not None else time.time)
        elif api_key is not None:
            secrets.append(api_key_from(env, api_key))
        settings = config.settings if config.cache is None else replace(config.settings, cache=config.cache)
        super().__init__(executor_type=ExecutorType.CLOUDRU, api=api, tiers=config.tiers,
                         prices=config.prices or default_prices(config.models), settings=settings,
                         clock=clock, rng=rng, secrets=secrets)

    def __repr__(self) -> str:
        return f"CloudRuAdapter(base_url={self.config.base_url!r}, preset={self.config.preset!r})"
