"""Loading valid configs: the reference example, flattened plans, interpolation, overrides."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plangate.config import (
    Config,
    CreditGrant,
    Limit,
    MeterCost,
    load_config,
)
from plangate.errors import ConfigError
from tests.support import REFERENCE, SHARED_REFERENCE

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
HEAD = f"""\
version: 1
identity:
  jwt:
    algorithms: [HS256]
    secret: {SECRET}
    customer_claim: org_id
"""


def _example() -> Path:
    return REFERENCE


EXAMPLE = _example()


@pytest.fixture(scope="module")
def example() -> Config:
    return load_config(str(EXAMPLE), env={})


def _write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "plangate.yaml"
    path.write_text(HEAD + body, encoding="utf-8")
    return str(path)


def _minimal() -> dict[str, object]:
    return {
        "version": 1,
        "identity": {
            "jwt": {"algorithms": ["HS256"], "secret": SECRET, "customer_claim": "org_id"}
        },
    }


# the reference example -----------------------------------------------------------------


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason="no ../shared beside this checkout")
def test_the_copy_of_the_reference_example_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == SHARED_REFERENCE.read_text(encoding="utf-8")


def test_reference_example_exists() -> None:
    assert EXAMPLE.is_file(), f"the reference example is missing: {EXAMPLE}"


def test_reference_example_loads(example: Config) -> None:
    m = example.model
    assert (len(m.features), len(m.plans), len(m.routes)) == (5, 4, 4)


def test_loaded_config_remembers_its_source(example: Config) -> None:
    assert example.source == str(EXAMPLE)


def test_reference_example_storage_defaults_to_memory(example: Config) -> None:
    assert example.model.storage == "memory://"


def test_reference_example_secret_has_a_default(example: Config) -> None:
    assert example.model.identity.jwt.secret == "dev-secret-change-me"


def test_reference_example_empty_plain_default_is_null(example: Config) -> None:
    assert example.model.admin.token is None


def test_reference_example_reads_its_secret_from_env() -> None:
    config = load_config(str(EXAMPLE), env={"PLANGATE_JWT_SECRET": SECRET})
    assert config.model.identity.jwt.secret == SECRET


def test_reference_example_default_plan_is_free(example: Config) -> None:
    assert example.catalog.default_plan == "free"


# flattened plans -----------------------------------------------------------------------


def test_free_plan_config_value(example: Config) -> None:
    assert dict(example.catalog.plans["free"].values) == {"max_projects": 3}


def test_free_plan_sliding_window_limit(example: Config) -> None:
    assert example.catalog.plans["free"].meters["api_calls"].limits == (
        Limit("api_calls", 100, "api_calls-1d", window=86400),
    )


def test_free_plan_calendar_period_limit(example: Config) -> None:
    assert example.catalog.plans["free"].meters["ai_tokens"].limits == (
        Limit("ai_tokens", 20000, "ai_tokens-month", period="month"),
    )


def test_free_plan_does_not_grant_what_it_omits(example: Config) -> None:
    assert not example.catalog.plans["free"].grants("export_reports")


def test_pro_overrides_free_max_projects(example: Config) -> None:
    assert example.catalog.plans["pro"].values["max_projects"] == 50


def test_pro_api_calls_has_two_limits_that_must_all_hold(example: Config) -> None:
    assert example.catalog.plans["pro"].meters["api_calls"].limits == (
        Limit("api_calls", 20, "api_calls-1s", window=1),
        Limit("api_calls", 10000, "api_calls-1d", window=86400),
    )


def test_pro_ai_tokens_names_its_overage(example: Config) -> None:
    grant = example.catalog.plans["pro"].meters["ai_tokens"]
    assert (grant.overage, grant.rate) == ("ai_credits", 0.001)


def test_pro_grants_credits_each_period(example: Config) -> None:
    assert example.catalog.plans["pro"].credits == {"ai_credits": CreditGrant(100, "month")}


def test_pro_trial_days(example: Config) -> None:
    assert example.catalog.plans["pro"].trial_days == 14


def test_enterprise_inherits_export_reports_from_pro(example: Config) -> None:
    assert example.catalog.plans["enterprise"].values["export_reports"] is True


def test_enterprise_inherits_credits_from_pro(example: Config) -> None:
    assert example.catalog.plans["enterprise"].credits["ai_credits"] == CreditGrant(100, "month")


def test_enterprise_unlimited_config_value_is_infinity(example: Config) -> None:
    assert example.catalog.plans["enterprise"].values["max_projects"] == math.inf


def test_enterprise_unlimited_meters_have_no_limits(example: Config) -> None:
    meters = example.catalog.plans["enterprise"].meters
    assert meters["api_calls"].unlimited
    assert meters["ai_tokens"].unlimited


def test_pro_2023_is_legacy(example: Config) -> None:
    assert example.catalog.plans["pro-2023"].legacy


def test_pro_2023_api_calls_is_5000_per_day(example: Config) -> None:
    assert example.catalog.plans["pro-2023"].meters["api_calls"].limits == (
        Limit("api_calls", 5000, "api_calls-1d", window=86400),
    )


def test_pro_2023_inherits_the_rest_of_pro(example: Config) -> None:
    legacy, pro = example.catalog.plans["pro-2023"], example.catalog.plans["pro"]
    assert legacy.values == pro.values
    assert legacy.meters["ai_tokens"] == pro.meters["ai_tokens"]


def test_false_removes_an_inherited_feature(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "features:\n"
        "  export_reports: {kind: boolean}\n"
        "plans:\n"
        "  pro:\n"
        "    features: {export_reports: true}\n"
        "  restricted:\n"
        "    extends: pro\n"
        "    features: {export_reports: false}\n",
    )
    plans = load_config(path, env={}).catalog.plans
    assert plans["pro"].grants("export_reports")
    assert not plans["restricted"].grants("export_reports")


# routes of the example -----------------------------------------------------------------


def test_reference_example_rules_in_order(example: Config) -> None:
    assert [rule.match for rule in example.catalog.rules] == [
        "GET /health",
        "POST /v1/reports/{report_id}/export",
        "POST /v1/completions",
        "/v1/{rest:path}",
    ]


def test_reference_example_public_route(example: Config) -> None:
    health = example.catalog.rules[0]
    assert health.public
    assert health.meters == ()


def test_reference_example_header_cost(example: Config) -> None:
    assert example.catalog.rules[2].meters == (
        MeterCost("api_calls", 1),
        MeterCost("ai_tokens", 1000, header="x-usage-tokens", expose=False),
    )


def test_reference_example_router_finds_export(example: Config) -> None:
    assert example.catalog.router.match("POST", "/v1/reports/42/export") == (
        1,
        {"report_id": "42"},
    )


# ${VAR} interpolation ------------------------------------------------------------------


def test_variable_is_replaced_from_env(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses:\n  upgrade_url: ${URL}\n")
    config = load_config(path, env={"URL": "https://example.com/pricing"})
    assert config.model.responses.upgrade_url == "https://example.com/pricing"


def test_variable_inside_text_is_replaced(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses:\n  upgrade_url: https://${HOST}/pricing\n")
    config = load_config(path, env={"HOST": "example.com"})
    assert config.model.responses.upgrade_url == "https://example.com/pricing"


def test_default_is_used_when_variable_is_unset(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses:\n  upgrade_url: ${URL:-https://example.com/}\n")
    assert load_config(path, env={}).model.responses.upgrade_url == "https://example.com/"


def test_environment_value_wins_over_default(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses:\n  upgrade_url: ${URL:-https://example.com/}\n")
    config = load_config(path, env={"URL": "https://example.org/"})
    assert config.model.responses.upgrade_url == "https://example.org/"


def test_default_is_used_when_variable_is_empty(tmp_path: Path) -> None:
    path = _write(tmp_path, "storage: ${STORE:-memory://}\n")
    assert load_config(path, env={"STORE": ""}).model.storage == "memory://"


_PROJECTS = "features:\n  max_projects: {kind: config}\nplans:\n  free:\n    features:\n"


def test_plain_scalar_default_becomes_an_int(tmp_path: Path) -> None:
    path = _write(tmp_path, _PROJECTS + "      max_projects: ${N:-100}\n")
    value = load_config(path, env={}).catalog.plans["free"].values["max_projects"]
    assert value == 100
    assert type(value) is int


def test_plain_scalar_variable_becomes_an_int(tmp_path: Path) -> None:
    path = _write(tmp_path, _PROJECTS + "      max_projects: ${N:-100}\n")
    assert load_config(path, env={"N": "250"}).catalog.plans["free"].values["max_projects"] == 250


def test_quoted_scalar_stays_a_string(tmp_path: Path) -> None:
    path = _write(tmp_path, _PROJECTS + '      max_projects: "${N:-100}"\n')
    assert load_config(path, env={}).catalog.plans["free"].values["max_projects"] == "100"


def test_double_dollar_is_a_literal_dollar(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses:\n  upgrade_url: https://example.com/pay?amount=$$5\n")
    assert load_config(path, env={}).model.responses.upgrade_url == (
        "https://example.com/pay?amount=$5"
    )


def test_escaped_variable_is_not_interpolated(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses:\n  upgrade_url: https://example.com/$${URL}\n")
    config = load_config(path, env={"URL": "replaced"})
    assert config.model.responses.upgrade_url == "https://example.com/${URL}"


def test_explicit_env_ignores_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLANGATE_TEST_URL", "https://example.com/")
    path = _write(tmp_path, "responses:\n  upgrade_url: ${PLANGATE_TEST_URL}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        f"{path}:8: responses.upgrade_url: environment variable PLANGATE_TEST_URL is not set"
    )


def test_without_env_the_process_environment_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLANGATE_TEST_URL", "https://example.com/")
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = _write(tmp_path, "responses:\n  upgrade_url: ${PLANGATE_TEST_URL}\n")
    assert load_config(path).model.responses.upgrade_url == "https://example.com/"


_FLOW = "features:\n  api_calls: {kind: metered}\nplans:\n  free:\n    features:\n"


def test_variable_in_a_flow_mapping_is_replaced(tmp_path: Path) -> None:
    path = _write(tmp_path, _FLOW + "      api_calls: {limit: ${FREE_CALLS:-100}, window: 1d}\n")
    limits = load_config(path, env={}).catalog.plans["free"].meters["api_calls"].limits
    assert limits == (Limit("api_calls", 100, "api_calls-1d", window=86400),)


def test_variable_in_a_flow_mapping_comes_from_env(tmp_path: Path) -> None:
    path = _write(tmp_path, _FLOW + "      api_calls: {limit: ${FREE_CALLS:-100}, window: 1d}\n")
    meters = load_config(path, env={"FREE_CALLS": "7"}).catalog.plans["free"].meters
    assert meters["api_calls"].limits[0].limit == 7


def test_flow_syntax_in_a_default_stays_in_the_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses: {upgrade_url: ${URL:-https://a.example/?a=1,b[]=2}}\n")
    assert load_config(path, env={}).model.responses.upgrade_url == "https://a.example/?a=1,b[]=2"


def test_variable_value_never_becomes_yaml_structure(tmp_path: Path) -> None:
    path = _write(tmp_path, "responses: {upgrade_url: ${URL}}\n")
    config = load_config(path, env={"URL": "https://a.example/, legacy_headers: true"})
    assert (config.model.responses.upgrade_url, config.model.responses.legacy_headers) == (
        "https://a.example/, legacy_headers: true",
        False,
    )


def test_variable_in_a_flow_sequence_is_replaced(tmp_path: Path) -> None:
    path = _write(tmp_path, "billing: {precedence: [${FIRST:-zuora}, stripe]}\n")
    assert load_config(path, env={}).model.billing.precedence == ["zuora", "stripe"]  # type: ignore[union-attr]


def test_variable_reference_in_a_key_stays_as_written(tmp_path: Path) -> None:
    path = _write(tmp_path, "features:\n  ${X}: {kind: boolean}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"X": "export"})
    assert [issue.path for issue in caught.value.issues] == ["features.${X}"]


# YAML merge keys, anchors and aliases ---------------------------------------------------

_DAILY = "features:\n  api_calls: {kind: metered}\nplans:\n  free:\n    features:\n      api_calls: &daily {limit: 100, window: 1d}\n  pro:\n    features:\n"


def test_merge_key_copies_an_anchored_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, _DAILY + "      api_calls: {<<: *daily}\n")
    assert load_config(path, env={}).catalog.plans["pro"].meters["api_calls"].limits == (
        Limit("api_calls", 100, "api_calls-1d", window=86400),
    )


def test_key_beside_a_merge_key_overrides_the_merged_one(tmp_path: Path) -> None:
    path = _write(tmp_path, _DAILY + "      api_calls: {<<: *daily, limit: 5000}\n")
    assert load_config(path, env={}).catalog.plans["pro"].meters["api_calls"].limits == (
        Limit("api_calls", 5000, "api_calls-1d", window=86400),
    )


def test_an_alias_of_a_merged_mapping_reads_it_again_without_duplicates(tmp_path: Path) -> None:
    body = _DAILY + "      api_calls: &pro {<<: *daily, limit: 5000}\n  team:\n    features:\n"
    path = _write(tmp_path, body + "      api_calls: *pro\n")
    assert load_config(path, env={}).catalog.plans["team"].meters["api_calls"].limits == (
        Limit("api_calls", 5000, "api_calls-1d", window=86400),
    )


def test_aliases_within_the_budget_are_expanded(tmp_path: Path) -> None:
    plans = "".join(f"  p{i}:\n    features:\n      api_calls: *daily\n" for i in range(200))
    path = _write(tmp_path, _DAILY + "      api_calls: {limit: 1, window: 1s}\n" + plans)
    assert len(load_config(path, env={}).catalog.plans) == 202


_BROKEN = st.text(st.sampled_from(list("\x00\t\n :-{}[],&*!|>'\"#%@`$<=?\\\ufeff\u2028ab1")))


@settings(max_examples=300, deadline=None)
@given(at=st.integers(0, 2000), cut=st.integers(0, 40), insert=_BROKEN)
def test_any_edit_of_the_reference_file_loads_or_is_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, at: int, cut: int, insert: str
) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    at %= len(text)
    path = tmp_path_factory.mktemp("edit") / "plangate.yaml"
    path.write_text(text[:at] + insert + text[at + cut :], encoding="utf-8")
    with contextlib.suppress(ConfigError):
        load_config(str(path), env={})


# PLANGATE_STORAGE ----------------------------------------------------------------------


def test_plangate_storage_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "storage: memory://\n")
    config = load_config(path, env={"PLANGATE_STORAGE": "redis://cache:6379/0"})
    assert config.model.storage == "redis://cache:6379/0"


def test_plangate_storage_fills_the_reference_example() -> None:
    config = load_config(str(EXAMPLE), env={"PLANGATE_STORAGE": "rediss://cache:6380/1"})
    assert config.model.storage == "rediss://cache:6380/1"


def test_empty_plangate_storage_keeps_the_file_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "storage: memory://\n")
    assert load_config(path, env={"PLANGATE_STORAGE": ""}).model.storage == "memory://"


def test_invalid_plangate_storage_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "storage: memory://\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"PLANGATE_STORAGE": "ftp://cache"})
    assert str(caught.value) == (
        f"{path}: storage: PLANGATE_STORAGE: unknown storage 'ftp://cache'; use memory://, "
        "redis://host:port/db, rediss://…, redis+cluster://host:port[,host:port] or "
        "redis+sentinel://host:port/service"
    )


def test_storage_defaults_to_memory(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, ""), env={}).model.storage == "memory://"


# load_config from an object -------------------------------------------------------------


def test_load_config_from_a_dict() -> None:
    config = load_config(_minimal(), env={})
    assert config.model.identity.jwt.customer_claim == "org_id"
    assert config.source is None


def test_dict_model_error_has_no_line_number() -> None:
    data = {**_minimal(), "version": 2}
    with pytest.raises(ConfigError) as caught:
        load_config(data, env={})
    assert str(caught.value) == "<config>: version: Input should be 1"


def test_dict_reference_error_has_no_line_number() -> None:
    data = {**_minimal(), "plans": {"free": {}, "pro": {"extends": "premium"}}}
    with pytest.raises(ConfigError) as caught:
        load_config(data, env={})
    assert (
        str(caught.value)
        == "<config>: plans.pro.extends: unknown plan 'premium' (known: free, pro)"
    )


def test_load_config_returns_a_loaded_config_unchanged(example: Config) -> None:
    assert load_config(example) is example


# notes: declared, validated, not enforced yet -------------------------------------------


def test_reference_example_notes_the_webhooks_it_leaves_off(example: Config) -> None:
    # its secrets come from the environment, empty by default (${STRIPE_WEBHOOK_SECRET:-})
    assert [str(note).replace(str(EXAMPLE), "{file}") for note in example.notes] == [
        "{file}:83: billing.stripe.webhook_secret: empty: /webhooks/stripe answers 404 until it is set",
        "{file}:90: billing.zuora: username or password empty (and no hmac_secret): /webhooks/zuora answers 404 until they are set",
    ]


def test_credits_and_overage_are_enforced_so_not_noted(example: Config) -> None:
    assert example.catalog.credit_scales == {"ai_credits": 1000}  # rate 0.001: in 1/1000s
    assert not [note for note in example.notes if "credit" in note.message]


def test_trials_and_addons_are_enforced_so_not_noted(tmp_path: Path) -> None:
    body = (
        "features:\n  api_calls: {kind: metered}\n"
        "plans:\n  pro:\n    trial_days: 14\n    features:\n"
        "      api_calls: {limit: 10, window: 1m}\n"
        "addons:\n  extra_calls:\n    features:\n      api_calls: {add: 5}\n"
    )
    config = load_config(_write(tmp_path, body), env={})
    assert config.catalog.plans["pro"].trial_days == 14
    assert config.catalog.addons["extra_calls"]
    assert config.notes == ()


def test_a_rule_that_earlier_rules_shadow_is_noted(tmp_path: Path) -> None:
    body = (
        "features:\n  api_calls: {kind: metered}\nroutes:\n"
        "  - match: /v1/{rest:path}\n    meters: {api_calls: 1}\n"
        "  - match: GET /v1/projects\n    meters: {api_calls: 2}\n"
    )
    path = _write(tmp_path, body)
    assert [str(note) for note in load_config(path, env={}).notes] == [
        f"{path}:12: routes[1].match: this rule never applies: routes[0] (/v1/{{rest:path}}) "
        "comes first and matches every request it matches"
    ]


def test_a_rule_shadowed_by_two_earlier_rules_names_both(tmp_path: Path) -> None:
    body = "routes:\n  - match: GET /a\n  - match: POST /a\n  - match: GET|POST /a\n"
    (note,) = load_config(_write(tmp_path, body), env={}).notes
    assert note.message == (
        "this rule never applies: routes[0] (GET /a) and routes[1] (POST /a) come first and "
        "match every request it matches"
    )


def test_an_admin_token_loads_without_notes(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "admin:\n  token: an-admin-token\n"), env={})
    assert config.model.admin.token == "an-admin-token"
    assert config.notes == ()


def test_redis_storage_loads_without_notes(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "storage: redis://cache:6379/0\n"), env={})
    assert config.model.storage == "redis://cache:6379/0"
    assert config.notes == ()


def test_minimal_config_has_no_notes(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, ""), env={}).notes == ()


def test_keys_are_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "version: 1\n"
        "identity:\n"
        "  jwt: {algorithms: [HS256], secret: a-test-secret-that-is-long-enough-for-hs256, customer_claim: org_id}\n"
        "features:\n"
        "  on: {kind: boolean}\n"
        "  404: {kind: boolean}\n"
    )
    assert set(load_config(path, env={}).model.features) == {"on", "404"}
