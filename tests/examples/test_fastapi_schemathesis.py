"""schemathesis drives the FastAPI example from its own OpenAPI schema: every response is one
the schema documents (plangate's 401/402/429 problems included), and none is a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from plangate.testing import bearer
from tests.support import load_module

EXAMPLE = Path(__file__).parents[2] / "examples" / "fastapi"


#: what the schema promises, response by response; not schemathesis's guesses about which
#: requests "should" succeed (a 402 for a free customer is the point of the product)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]

app = load_module(EXAMPLE / "app.py", "fastapi_example_st").app
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("plan", [None, "free", "pro"])
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_is_documented_and_none_is_a_500(case, plan):
    headers = bearer(EXAMPLE / "plangate.yaml", "acme", plan) if plan else {}
    case.call_and_validate(headers=headers, checks=CHECKS)
