"""The API that tests/storage runs under uvicorn processes: the test API behind plangate,
configured from ``PLANGATE_TEST_CONFIG`` (a YAML path) and ``PLANGATE_STORAGE``."""

from __future__ import annotations

import os

from plangate.asgi import PlanGateMiddleware
from tests.middleware.apps import asgi_app

app = PlanGateMiddleware(asgi_app(), os.environ["PLANGATE_TEST_CONFIG"])
