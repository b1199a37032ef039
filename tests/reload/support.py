"""Config files for the reload tests: the same API, with the limit and the settings given."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from plangate import Gate
from plangate._reload import ReloadOutcome

SECRET = "a-secret-for-the-reload-tests-long-enough-for-hs256"


def config_text(
    limit: int = 3,
    *,
    window: str = "1h",
    storage: str = "memory://",
    reload: str = "{}",
    extra: str = "",
) -> str:
    return f"""\
version: 1
storage: "{storage}"
identity:
  jwt:
    algorithms: [HS256]
    secret: {SECRET}
    customer_claim: sub
    plan_claim: plan
features:
  api_calls: {{kind: metered, unit: call}}
plans:
  free:
    features:
      api_calls: {{limit: {limit}, window: {window}}}
default_plan: free
routes:
  - {{match: "GET /v1/{{rest:path}}", meters: {{api_calls: 1}}}}
admin: {{token: an-admin-token}}
reload: {reload}
{extra}"""


BROKEN = """\
version: 1
identity:
  jwt:
    algorithms: [HS256]
    secret: short
    customer_claim: sub
features:
  api_calls: {kind: metered, unit: call}
plans:
  free:
    features:
      api_calls: {limit: -5, window: 1h}
"""


def limit_of(gate: Any) -> int:
    """The free plan's api_calls limit in the config a gate serves."""
    return int(gate.config.catalog.plans["free"].meters["api_calls"].limits[0].limit)


def write(path: Path, text: str) -> None:
    """Replace ``path`` whole, as an editor saving with a rename does: a reader never sees
    half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Reloads:
    """The outcomes of a gate's reloads, awaited as events."""

    def __init__(self, gate: Gate | Any) -> None:
        self.outcomes: list[ReloadOutcome] = []
        self._changed = threading.Condition()
        gate.reload_listeners.append(self._heard)

    def _heard(self, outcome: ReloadOutcome) -> None:
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    def wait(
        self,
        count: int = 1,
        timeout: float = 15.0,
        *,
        changed: bool | None = None,
        failed: bool | None = None,
        version: str | None = None,
    ) -> None:
        def enough() -> bool:
            seen = [
                o
                for o in self.outcomes
                if (changed is None or o.changed == changed)
                and (failed is None or (o.error is not None) == failed)
                and (version is None or (o.version == version and o.error is None))
            ]
            return len(seen) >= count

        with self._changed:
            assert self._changed.wait_for(enough, timeout), f"reloads seen: {self.outcomes}"
