"""Config reloads in the metrics: ``plangate_config_reloads_total`` by result, the last
reload's failure as a gauge and the version serving as ``plangate_config_info``, checked
against ``gate.reload()`` of a config file rewritten in between."""

from __future__ import annotations

from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from plangate import Gate, MemoryStorage
from plangate._reload import version_of
from plangate.metrics import instrument
from tests.observability.test_metrics import samples
from tests.support import config

BROKEN = b"version: 1\nplans: [\n"


def with_limit(limit: int) -> bytes:
    settings = config()
    settings["plans"]["free"]["features"]["api_calls"]["limit"] = limit
    return yaml.safe_dump(settings).encode()


class Page:
    """The registry's metrics as scraped now."""

    def __init__(self, registry: CollectorRegistry) -> None:
        text = generate_latest(registry).decode()
        reloads = samples(text, "plangate_config_reloads_total")
        self.ok = reloads[(("result", "ok"),)]
        self.errors = reloads[(("result", "error"),)]
        self.failing = samples(text, "plangate_config_last_reload_error")[()]
        self.versions = {
            dict(labels)["version"]: value
            for labels, value in samples(text, "plangate_config_info").items()
        }


def test_reloads_are_counted_by_result_and_the_version_serving_is_shown(tmp_path: Path) -> None:
    path = tmp_path / "plangate.yaml"
    path.write_bytes(with_limit(5))
    gate = Gate(str(path), storage=MemoryStorage())
    registry = CollectorRegistry()
    instrument(gate, registry)
    first = version_of(with_limit(5))
    page = Page(registry)
    assert (page.ok, page.errors, page.failing) == (0, 0, 0)
    assert page.versions == {first: 1}

    assert not gate.reload().changed  # the same bytes: nothing to count
    page = Page(registry)
    assert (page.ok, page.errors) == (0, 0)

    path.write_bytes(with_limit(6))
    assert gate.reload().changed
    second = version_of(with_limit(6))
    page = Page(registry)
    assert (page.ok, page.errors, page.failing) == (1, 0, 0)
    assert page.versions == {second: 1}  # the version replaced is gone: one series

    path.write_bytes(BROKEN)
    assert gate.reload().error is not None
    assert gate.reload().error is not None  # each attempt that fails counts
    page = Page(registry)
    assert (page.ok, page.errors, page.failing) == (1, 2, 1)
    assert page.versions == {second: 1}  # the version before the error still serves


def test_the_failure_gauge_goes_back_to_0_once_a_reload_succeeds_or_finds_the_version_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plangate.yaml"
    path.write_bytes(with_limit(5))
    gate = Gate(str(path), storage=MemoryStorage())
    registry = CollectorRegistry()
    instrument(gate, registry)

    path.write_bytes(BROKEN)
    gate.reload()
    assert Page(registry).failing == 1
    path.write_bytes(with_limit(5))  # the edit undone: the file is the version serving
    assert not gate.reload().changed
    page = Page(registry)
    assert (page.ok, page.errors, page.failing) == (0, 1, 0)

    path.write_bytes(BROKEN)
    gate.reload()
    assert Page(registry).failing == 1
    path.write_bytes(with_limit(7))
    assert gate.reload().changed
    page = Page(registry)
    assert (page.ok, page.errors, page.failing) == (1, 2, 0)
    assert page.versions == {version_of(with_limit(7)): 1}


def test_a_reload_with_the_bytes_given_is_counted_as_well() -> None:
    gate = Gate(config(), storage=MemoryStorage())  # a config object: version ""
    registry = CollectorRegistry()
    instrument(gate, registry)
    assert Page(registry).versions == {"": 1}
    assert gate.reload(with_limit(8)).changed
    page = Page(registry)
    assert page.ok == 1
    assert page.versions == {version_of(with_limit(8)): 1}
    assert gate.reload(BROKEN).error is not None
    assert Page(registry).errors == 1


def test_a_credits_feature_a_reload_adds_shows_from_0() -> None:
    gate = Gate(config(), storage=MemoryStorage())
    registry = CollectorRegistry()
    instrument(gate, registry)
    burned = "plangate_credits_burned_total"
    assert samples(generate_latest(registry).decode(), burned) == {}
    settings = config()
    settings["features"]["ai_credits"] = {"kind": "credits"}
    assert gate.reload(yaml.safe_dump(settings).encode()).changed
    text = generate_latest(registry).decode()
    for what in ("granted", "burned", "refunded"):
        assert samples(text, f"plangate_credits_{what}_total") == {(("feature", "ai_credits"),): 0}
