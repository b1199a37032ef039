"""The admin HTTP API: customer records, credit grants and plan migrations, behind a bearer
token.

``AdminAPI(gate)`` is an ASGI app to mount (``Mount("/admin", app=AdminAPI(gate))``);
``plangate gateway`` serves it under ``/admin/``; ``from_environment`` builds it for
``uvicorn --factory`` beside a WSGI project. Provisioning itself is ``gate.customers``'s
(plangate.customers): this package only speaks HTTP for it. See docs/admin.md.
"""

from __future__ import annotations

from ._app import AdminAPI, from_environment
from ._problems import TITLES, AdminError

__all__ = ["TITLES", "AdminAPI", "AdminError", "from_environment"]
