"""Local quota leases, modelled before they are built: N processes x M customers.

    python benchmarks/leases.py              # N from 2 to 64, the lease policies compared
    python benchmarks/leases.py --write      # the same, and rewrites docs/benchmarks.md
    python benchmarks/leases.py --quick      # fewer requests (the test suite's smoke run)

No Redis and no processes: a model of issue 17's leases, to choose their defaults. One
shared store counts, per customer, what is used or leased against its limit (one window
covering the run). N processes receive requests for M customers whose popularity follows a
Zipf law, spread at random over the processes (a load balancer). Most customers are far
from their limit (10 times what they ask for); one in twenty runs out (its limit is 80 % of its
demand): the end of a quota is where leases matter.

A process admits a request from memory while it holds leased units for that customer;
otherwise it makes one store call, which returns its expired or unused units and asks for a
lease of

    size = clamp(rate * horizon, 1, fraction * headroom)

``rate`` being this process's recent request rate for the customer (an exponentially
decaying count, τ = 1 s), ``horizon`` how far ahead a lease is meant to last, ``headroom``
what the store has not counted. The store grants at most the headroom (0: refused). A lease
lives ``ttl`` (500 ms; 1 s for the 1 s horizon): its unused units return at the process's
next call for that customer.

Reported per number of processes and policy:

- **store calls per request**, overall and for the requests of customers far from their
  limit (the issue's target: ≤ 0.1) — today's path makes 1;
- **early refusals**: requests the store refused while units of that customer sat leased,
  unused, in other processes (refused before the limit was truly reached), per 1,000
  requests of the customers that run out.

Exactness is asserted as it runs: the store never counts past a limit, so nothing is ever
admitted past one. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import math
import random
import sys
from dataclasses import dataclass, field

START, END = "<!-- leases -->", "<!-- /leases -->"

ZIPF = 1.1
CUSTOMERS = 1000
RATE = 20_000.0  # requests per second, all processes together
PROCESSES = (2, 4, 8, 16, 32, 64)
TAU = 1.0  # seconds: the rate estimate's memory


@dataclass(frozen=True)
class Policy:
    name: str
    fraction: float  # at most this share of the headroom per lease (0: today's path)
    horizon: float  # seconds of this process's recent rate a lease covers
    ttl: float = 0.5
    near: float = 1.0  # no lease once this share of the limit is counted
    small: int = 0  # no lease for a limit of at most this


POLICIES = (
    Policy("per request (today)", 0.0, 0.0),
    Policy("5 % · 100 ms", 0.05, 0.1),
    Policy("10 % · 100 ms", 0.10, 0.1),
    Policy("10 % · 250 ms", 0.10, 0.25),
    Policy("20 % · 250 ms", 0.20, 0.25),
    Policy("10 % · 1 s", 0.10, 1.0, ttl=1.0),
    # what plangate does (storage/_leases.py): 10 % · 250 ms, none from 95 % of a limit on
    # and none for a limit of at most 1 000
    Policy("built", 0.10, 0.25, near=0.95, small=1000),
)


@dataclass
class Lease:
    units: int
    expires: float


@dataclass
class Result:
    requests: int = 0
    calls: int = 0
    far_requests: int = 0
    far_calls: int = 0
    near_requests: int = 0
    early: int = 0
    refused: int = 0


@dataclass
class Process:
    leases: dict[int, Lease] = field(default_factory=dict)
    seen: dict[int, tuple[float, float]] = field(default_factory=dict)

    def rate(self, customer: int, now: float) -> float:
        count, at = self.seen.get(customer, (0.0, now))
        count = count * math.exp(-(now - at) / TAU) + 1.0
        self.seen[customer] = (count, now)
        return count / TAU


def customers(requests: int, rng: random.Random) -> tuple[list[float], list[int], set[int]]:
    """The Zipf law's cumulative shares, each customer's limit, those who run out."""
    weights = [1.0 / k**ZIPF for k in range(1, CUSTOMERS + 1)]
    total = sum(weights)
    cumulative, running = [], 0.0
    for w in weights:
        running += w / total
        cumulative.append(running)
    near = {c for c in range(CUSTOMERS) if rng.random() < 0.05}
    limits = []
    for c, w in enumerate(weights):
        demand = requests * w / total
        limits.append(max(1, int(0.8 * demand)) if c in near else max(10, int(10 * demand)))
    return cumulative, limits, near


def simulate(n: int, policy: Policy, requests: int, seed: int) -> Result:
    rng = random.Random(seed)
    cumulative, limits, near = customers(requests, random.Random(seed + 1))
    counted = [0] * CUSTOMERS  # used or leased, in the store
    used = [0] * CUSTOMERS
    processes = [Process() for _ in range(n)]
    result = Result()
    now = 0.0
    for _ in range(requests):
        now += rng.expovariate(RATE)
        customer = min(bisect.bisect_left(cumulative, rng.random()), CUSTOMERS - 1)
        process = processes[rng.randrange(n)]
        is_near = customer in near
        result.requests += 1
        if is_near:
            result.near_requests += 1
        else:
            result.far_requests += 1
        rate = process.rate(customer, now)
        lease = process.leases.get(customer)
        if lease is not None and lease.units > 0 and lease.expires > now:
            lease.units -= 1
            used[customer] += 1
            continue
        # one store call: what is left of an old lease goes back, a new one is asked for
        result.calls += 1
        if not is_near:
            result.far_calls += 1
        if lease is not None:
            counted[customer] -= lease.units
            del process.leases[customer]
        headroom = limits[customer] - counted[customer]
        limit = limits[customer]
        if (
            policy.fraction == 0.0
            or limit <= policy.small
            or counted[customer] + 1 >= policy.near * limit
        ):
            size = 1
        else:
            size = max(1, min(round(rate * policy.horizon), int(policy.fraction * headroom)))
        granted = min(size, headroom)
        if granted <= 0:
            result.refused += 1
            if counted[customer] > used[customer]:  # units sit leased, unused, elsewhere
                result.early += 1
            continue
        counted[customer] += granted
        assert counted[customer] <= limits[customer]  # never past a limit
        used[customer] += 1
        if granted > 1:
            process.leases[customer] = Lease(granted - 1, now + policy.ttl)
    assert all(u <= limit for u, limit in zip(used, limits, strict=True))
    return result


def report(rows: dict[tuple[int, str], Result], requests: int) -> str:
    def table(title: str, value: object) -> list[str]:
        lines = [
            title,
            "",
            "| processes | " + " | ".join(p.name for p in POLICIES) + " |",
            "| ---: | " + " | ".join("---:" for _ in POLICIES) + " |",
        ]
        for n in PROCESSES:
            cells = [value(rows[n, p.name]) for p in POLICIES]  # type: ignore[operator]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    return "\n".join(
        [
            f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}: {requests:,} "
            f"requests at {RATE:,.0f} per second in all ({requests / RATE:g} s), "
            f"{CUSTOMERS:,} customers (Zipf {ZIPF}); 1 in 20 runs out (limit 80 % of its "
            "demand), the others have 10× theirs. A policy: the largest share of a "
            "customer's headroom one lease may take · the span of the process's recent "
            "rate it covers; leases live 500 ms (1 s for 10 % · 1 s). *built*: what "
            "plangate does, 10 % · 250 ms with no lease from 95 % of a limit on nor for a "
            "limit of at most 1,000.",
            "",
            *table(
                "Store calls per request, customers far from their limit:",
                lambda r: f"{r.far_calls / max(r.far_requests, 1):.3f}",
            ),
            *table(
                "Store calls per request, all requests:",
                lambda r: f"{r.calls / max(r.requests, 1):.3f}",
            ),
            *table(
                "Early refusals per 1,000 requests of the customers that run out (refused "
                "while units were leased, unused, in other processes):",
                lambda r: f"{1000 * r.early / max(r.near_requests, 1):.1f}",
            ),
        ]
    ).rstrip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 requests, not 200,000")
    parser.add_argument("--write", action="store_true", help="rewrite docs/benchmarks.md")
    args = parser.parse_args()
    requests = 20_000 if args.quick else 200_000
    rows = {
        (n, policy.name): simulate(n, policy, requests, seed=17)
        for n in PROCESSES
        for policy in POLICIES
    }
    text = report(rows, requests)
    print(text)
    if args.write:
        from compare import write_section  # the other benchmarks' writer of their section

        write_section(text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
