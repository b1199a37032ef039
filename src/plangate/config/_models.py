"""The pydantic models of ``plangate.yaml`` (SPEC §2).

The models check the shape of the file. What depends on other sections (a plan naming a
feature, a route naming a meter) is checked by ``_catalog.build_catalog``, which also turns
plan entitlements into typed objects.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

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


def _not_a_boolean(value: Any) -> Any:
    # pydantic reads true as 1 in a number field: `limit: true` would be a quota of one.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


# Quotas travel in RateLimit headers as Structured Fields integers: at most 15 digits.
MAX_AMOUNT = 10**15 - 1


def fits_a_header(value: int) -> int:
    if value > MAX_AMOUNT:
        raise ValueError(
            f"{value} is too large: at most {MAX_AMOUNT} (quota headers carry 15 digits)"
        )
    return value


Number = Annotated[int, BeforeValidator(_not_a_boolean)]
Seconds = Annotated[float, BeforeValidator(_not_a_boolean)]
Amount = Annotated[int, BeforeValidator(_not_a_boolean), AfterValidator(fits_a_header)]

# Framing and hop-by-hop headers (RFC 9110 §7.6.1, RFC 9112): plangate removes the usage
# header from the response, and must never remove one of these.
FRAMING_HEADERS = frozenset(
    {
        "connection", "content-length", "host", "keep-alive", "proxy-connection", "te",
        "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
OWN_HEADERS = frozenset(
    {
        "ratelimit", "ratelimit-policy", "retry-after", "www-authenticate",
        "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
    }
)  # fmt: skip
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_CLAIM = re.compile(r"[^.]+(\.[^.]+)*")


class JwtConfig(Model):
    algorithms: list[str]
    secret: str | None = None
    public_key: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | list[str] | None = None
    leeway: Seconds = Field(default=0, ge=0, le=3600, allow_inf_nan=False)
    customer_claim: str
    plan_claim: str | None = None
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    jwks_cache_seconds: Number = Field(default=300, ge=1)
    max_token_bytes: Number = Field(default=8192, gt=0)

    @field_validator("customer_claim", "plan_claim")
    @classmethod
    def _claim_path(cls, value: str | None) -> str | None:
        if value is not None and not _CLAIM.fullmatch(value):
            raise ValueError(
                f"expected a claim name, or a dotted path to a nested claim (org.id), got {value!r}"
            )
        return value

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
    trial_days: Number | None = Field(default=None, ge=0)
    features: dict[str, EntitlementValue] = Field(default_factory=dict)


class AddonConfig(Model):
    features: dict[str, EntitlementValue]


class HeaderCost(Model):
    response_header: str
    estimate: Amount = Field(ge=0)
    expose: bool = False

    @field_validator("response_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"not a header name: {value!r}")
        if value.lower() in FRAMING_HEADERS:
            raise ValueError(
                f"{value} frames the response or the connection: plangate removes the usage "
                "header from the response, so usage needs a header of its own (X-Usage-Tokens)"
            )
        if value.lower() in OWN_HEADERS:
            raise ValueError(f"{value} is a header plangate writes; name a header of the app's")
        return value


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


class DecisionLogConfig(Model):
    """One JSON line per decision logged (``decision_log:``)."""

    #: ``stdout``, ``stderr`` or a file (appended to)
    to: str = Field(default="stdout", min_length=1)
    #: the share of allowed decisions logged (0: none, 1: all)
    sample: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    #: every refusal (and shadow refusal) logged
    refusals: bool = True


class ReloadConfig(Model):
    """How a running process picks up a changed config (``reload:``)."""

    #: watch the file the config was loaded from and reload when it changes (default: yes,
    #: unless ``store`` is on); needs ``watchfiles`` (the ``reload`` extra)
    watch: bool | None = None
    #: SIGHUP reloads (the file, or the store's published config when ``store`` is on)
    signal: bool = True
    #: follow the config published on the store with ``plangate reload FILE``: every
    #: process on the store loads the same version, at start and whenever one is published
    store: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ReloadConfig:
        if self.store and self.watch:
            raise ValueError(
                "watch and store: a process follows its file or the store's published "
                "config, not both (with store, the file is what it starts from until a "
                "config is published)"
            )
        return self


class AdminConfig(Model):
    token: str | None = None


class StripeConfig(Model):
    webhook_secret: str | None = None
    customer_from: str = "metadata.customer_id"
    prices: dict[str, Any] = Field(default_factory=dict)
    #: the secret key plangate calls Stripe's API with (a Checkout session's line items)
    api_key: str | None = None
    api_base: str = "https://api.stripe.com"
    #: meter → the ``event_name`` of the Stripe meter its usage is exported to
    meters: dict[str, str] = Field(default_factory=dict)


class ZuoraMeterConfig(Model):
    """How one meter's usage appears in Zuora's usage upload."""

    uom: str = Field(min_length=1)
    #: the CHARGE_ID column (a charge number, e.g. C-00000001); None: Zuora matches the
    #: subscription's charge by the unit of measure
    charge: str | None = None


class ZuoraConfig(Model):
    username: str | None = None
    password: str | None = None
    customer_from: str = "CrmId"
    rate_plans: dict[str, Any] = Field(default_factory=dict)
    #: Zuora's callout HMAC option instead of (or beside) Basic: the key, and the header the
    #: template puts the signature of the body in (HMAC-SHA256, base64 or hex)
    hmac_secret: str | None = None
    hmac_header: str = "X-Zuora-Signature"
    #: meter → its unit of measure (and charge) in Zuora's usage upload
    meters: dict[str, ZuoraMeterConfig] = Field(default_factory=dict)

    @field_validator("meters", mode="before")
    @classmethod
    def _uom_alone(cls, value: Any) -> Any:
        # `api_calls: API_CALL` is short for `api_calls: {uom: API_CALL}`
        if isinstance(value, dict):
            return {k: {"uom": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


Provider = Literal["stripe", "zuora"]
_PROVIDERS: tuple[Provider, ...] = ("stripe", "zuora")


Destination = Literal["stripe", "zuora-csv", "jsonl"]


class ExportConfig(Model):
    """The gateway's periodic usage export (``plangate usage export`` on a timer)."""

    every: str
    to: Destination = "stripe"
    #: zuora-csv and jsonl: the directory each run writes its file into
    path: str | None = None

    @field_validator("every")
    @classmethod
    def _every(cls, value: str) -> str:
        if parse_duration(value) < 1:
            raise ValueError(f"export every {value}: at least 1s")
        return value


class BillingConfig(Model):
    precedence: list[Provider] = Field(default_factory=lambda: list(_PROVIDERS))
    stripe: StripeConfig | None = None
    zuora: ZuoraConfig | None = None
    #: how long hourly usage aggregates are kept (Stripe takes usage up to 35 days back)
    retention: str = "35d"
    export: ExportConfig | None = None

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        seconds = parse_duration(value)
        if not 3600 <= seconds <= MAX_WINDOW:
            raise ValueError(f"retention {value}: from 1h to 3650d")
        return value


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
    cors_preflight: Literal["pass", "decide"] = "pass"
    on_storage_error: StorageErrorPolicy = "local"
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    decision_log: DecisionLogConfig | None = None
    billing: BillingConfig | None = None
    reload: ReloadConfig = Field(default_factory=ReloadConfig)

    @field_validator("storage")
    @classmethod
    def check_storage(cls, value: str) -> str:
        from ..storage import check_storage_uri  # storage imports the engine, which imports us

        check_storage_uri(value)
        return value


Period = Literal["hour", "day", "week", "month", "year"]
MAX_WINDOW = 3650 * 86400  # a sliding window's seconds, as `w` and as Redis key expiries


class LimitSpec(Model):
    """One limit of a metered entitlement: ``{limit, window}`` or ``{limit, period}``."""

    limit: Amount = Field(ge=0)
    window: str | None = None
    period: Period | None = None
    overage: str | None = None
    rate: Seconds | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: ``shadow``: counted and logged, never refused (a new limit tried on live traffic)
    mode: Literal["enforce", "shadow"] = "enforce"

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) > MAX_WINDOW:
            raise ValueError(f"the window {value} is longer than 10 years (3650d)")
        return value

    @model_validator(mode="after")
    def _window_or_period(self) -> LimitSpec:
        if (self.window is None) == (self.period is None):
            raise ValueError("give either window (e.g. 1d, sliding) or period (e.g. month)")
        if (self.overage is None) != (self.rate is None):
            raise ValueError("overage and rate go together: overage: <credits feature>, rate: N")
        return self


class CreditGrantSpec(Model):
    grant: Amount = Field(ge=0)
    period: Period


class AddonGrantSpec(Model):
    add: Amount = Field(gt=0)
