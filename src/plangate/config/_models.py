"""The pydantic models of ``plangate.yaml`` (SPEC §2).

The models check the shape of the file. What depends on other sections (a plan naming a
feature, a route naming a meter) is checked by ``_catalog.build_catalog``, which also turns
plan entitlements into typed objects.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._durations import parse_duration

_HS = {"HS256", "HS384", "HS512"}
_ASYMMETRIC = {
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES256K", "ES384", "ES512", "EdDSA",
}  # fmt: skip
ALGORITHMS = frozenset(_HS | _ASYMMETRIC)

# What a plan gives a feature, or what a route charges a meter, depends on another section:
# the catalog builder reads these values, so that its messages can name the exact key.
EntitlementValue = Any


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JwtConfig(Model):
    algorithms: list[str]
    secret: str | None = None
    public_key: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | list[str] | None = None
    leeway: float = Field(default=0, ge=0)
    customer_claim: str
    plan_claim: str | None = None
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    jwks_cache_seconds: int = Field(default=300, ge=1)
    max_token_bytes: int = Field(default=8192, gt=0)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one algorithm, such as [HS256] or [RS256]")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' is refused: unsigned tokens would let anyone in")
            if alg not in ALGORITHMS:
                raise ValueError(
                    f"unknown algorithm {alg!r}; known: {', '.join(sorted(ALGORITHMS))}"
                )
        return value

    @model_validator(mode="after")
    def _one_key_matching_the_algorithms(self) -> JwtConfig:
        given = [k for k in ("secret", "public_key", "jwks_url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of secret, public_key or jwks_url"
                + (f" (found {', '.join(given)})" if given else "")
            )
        hs = [a for a in self.algorithms if a in _HS]
        if self.secret and len(hs) != len(self.algorithms):
            raise ValueError(
                "a secret verifies only HS256/HS384/HS512; "
                f"remove {', '.join(a for a in self.algorithms if a not in _HS)}"
            )
        if not self.secret and hs:
            raise ValueError(
                f"{', '.join(hs)} needs a secret; a public key or JWKS verifies "
                "RS*, PS*, ES* and EdDSA only"
            )
        return self


class IdentityConfig(Model):
    jwt: JwtConfig
    token_from: str = "header:Authorization"  # noqa: S105 - a header name

    @field_validator("token_from")
    @classmethod
    def _source(cls, value: str) -> str:
        if not re.fullmatch(r"(header|cookie):[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
            raise ValueError(f"expected header:NAME or cookie:NAME, got {value!r}")
        return value


StorageErrorPolicy = Literal["local", "allow", "deny"]


class FeatureConfig(Model):
    kind: Literal["boolean", "config", "metered", "credits"]
    unit: str | None = None
    name: str | None = None
    description: str | None = None
    on_storage_error: StorageErrorPolicy | None = None

    @model_validator(mode="after")
    def _policy_for_counted_kinds(self) -> FeatureConfig:
        if self.on_storage_error is not None and self.kind not in ("metered", "credits"):
            raise ValueError(
                "on_storage_error applies to metered and credits features: a "
                f"{self.kind} feature is decided from the customer's cached state"
            )
        return self


class PlanConfig(Model):
    extends: str | None = None
    legacy: bool = False
    trial_days: int | None = Field(default=None, ge=0)
    features: dict[str, EntitlementValue] = Field(default_factory=dict)


class AddonConfig(Model):
    features: dict[str, EntitlementValue]


class HeaderCost(Model):
    response_header: str
    estimate: int = Field(ge=0)
    expose: bool = False


class RouteConfig(Model):
    match: str
    public: bool = False
    feature: str | None = None
    meters: dict[str, Any] = Field(default_factory=dict)
    count: Literal["success", "always"] = "success"
    mode: Literal["enforce", "shadow"] = "enforce"

    @model_validator(mode="after")
    def _public_means_nothing_else(self) -> RouteConfig:
        if self.public and (self.feature or self.meters):
            raise ValueError("a public route has no identity, so it cannot have feature or meters")
        return self


class ResponsesConfig(Model):
    upgrade_url: str | None = None
    legacy_headers: bool = False


class AdminConfig(Model):
    token: str | None = None


class StripeConfig(Model):
    webhook_secret: str | None = None
    customer_from: str = "metadata.customer_id"
    prices: dict[str, Any] = Field(default_factory=dict)


class ZuoraConfig(Model):
    username: str | None = None
    password: str | None = None
    customer_from: str = "AccountNumber"
    rate_plans: dict[str, Any] = Field(default_factory=dict)


Provider = Literal["stripe", "zuora"]
_PROVIDERS: tuple[Provider, ...] = ("stripe", "zuora")


class BillingConfig(Model):
    precedence: list[Provider] = Field(default_factory=lambda: list(_PROVIDERS))
    stripe: StripeConfig | None = None
    zuora: ZuoraConfig | None = None


class ConfigModel(Model):
    """The whole file, as written."""

    version: Literal[1]
    storage: str = "memory://"
    identity: IdentityConfig
    features: dict[str, FeatureConfig] = Field(default_factory=dict)
    plans: dict[str, PlanConfig] = Field(default_factory=dict)
    addons: dict[str, AddonConfig] = Field(default_factory=dict)
    default_plan: str | None = None
    routes: list[RouteConfig] = Field(default_factory=list)
    unmatched: Literal["allow", "deny"] = "allow"
    mode: Literal["enforce", "shadow"] = "enforce"
    on_storage_error: StorageErrorPolicy = "local"
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    billing: BillingConfig | None = None

    @field_validator("storage")
    @classmethod
    def check_storage(cls, value: str) -> str:
        from ..storage import check_storage_uri  # storage imports the engine, which imports us

        check_storage_uri(value)
        return value


Period = Literal["hour", "day", "week", "month", "year"]


class LimitSpec(Model):
    """One limit of a metered entitlement: ``{limit, window}`` or ``{limit, period}``."""

    limit: int = Field(ge=0)
    window: str | None = None
    period: Period | None = None
    overage: str | None = None
    rate: float | None = Field(default=None, gt=0)

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _window_or_period(self) -> LimitSpec:
        if (self.window is None) == (self.period is None):
            raise ValueError("give either window (e.g. 1d, sliding) or period (e.g. month)")
        if (self.overage is None) != (self.rate is None):
            raise ValueError("overage and rate go together: overage: <credits feature>, rate: N")
        return self


class CreditGrantSpec(Model):
    grant: int = Field(ge=0)
    period: Period


class AddonGrantSpec(Model):
    add: int = Field(gt=0)
