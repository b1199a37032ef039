"""plangate for Django: ``"plangate_django.PlanGateMiddleware"`` in ``MIDDLEWARE``, configured
from ``settings.PLANGATE``, and ``@requires(...)`` per view."""

from __future__ import annotations

from .decorators import requires
from .middleware import PlanGateMiddleware, problem_response

__all__ = ["PlanGateMiddleware", "problem_response", "requires"]
