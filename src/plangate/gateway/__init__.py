"""``plangate gateway``: the forward-auth service that API gateways ask before they proxy.

``/check`` decides the original request (reserving its meters), ``/commit`` settles the
reservation once the upstream has answered, ``/render`` turns nginx's 403 back into the real
problem, ``/healthz`` says the service is up. A UDP listener (and a file follower) commit from
gateway access logs for gateways that cannot call out after the response. See docs/gateway.md.
"""

from __future__ import annotations

from ._logs import LogCommitter, follow_file, normalize_record
from ._service import GatewayService, serve

__all__ = ["GatewayService", "LogCommitter", "follow_file", "normalize_record", "serve"]
