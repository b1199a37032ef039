"""``plangate_customer_change_lag_seconds``: each customer change another process publishes
on Redis, once heard by this one, is one observation (a real redis-server; the "other
process" is a gate with connections of its own)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from plangate.metrics import LAG_BUCKETS, instrument
from tests.customers.test_changes import WAIT, gate_on, plan_of, subscribed
from tests.observability.test_metrics import samples
from tests.servers import RedisServer

pytestmark = pytest.mark.redis


def lag(registry: CollectorRegistry) -> tuple[float, dict[str, float]]:
    """The histogram's count and its buckets' counts (by ``le``)."""
    text = generate_latest(registry).decode()
    count = samples(text, "plangate_customer_change_lag_seconds_count")[()]
    buckets = {
        dict(labels)["le"]: value
        for labels, value in samples(text, "plangate_customer_change_lag_seconds_bucket").items()
    }
    return count, buckets


def test_each_change_heard_from_another_process_is_observed(redis_server: RedisServer) -> None:
    writer, reader = gate_on(redis_server.url), gate_on(redis_server.url)
    try:
        registry = CollectorRegistry()
        instrument(reader, registry)
        count, buckets = lag(registry)
        assert count == 0
        assert len(buckets) == len(LAG_BUCKETS) + 1  # from 1 ms to 10 s, and +Inf
        assert min(float(le) for le in buckets) == 0.001
        assert max(float(le) for le in buckets if le != "+Inf") == 10.0

        writer.storage.delete_customer("lagging")  # whatever another test left there
        writer.customers.assign("lagging", plan="free")
        assert plan_of(reader, "lagging") == "free"  # cached: the reader subscribes
        subscribed(reader)
        before, _ = lag(registry)

        for plan in ("pro", "enterprise"):
            seen = reader.customers.version("lagging")
            writer.customers.assign("lagging", plan=plan)
            # heard: the lag is observed before the cached record is dropped
            assert reader.customers.wait_version("lagging", seen + 1, WAIT)
        count, buckets = lag(registry)
        assert count == before + 2
        assert buckets["+Inf"] == count
        assert plan_of(reader, "lagging") == "enterprise"
    finally:
        writer.storage.close()
        reader.storage.close()
