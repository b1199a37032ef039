from __future__ import annotations

from django.apps import AppConfig


class PlanGateConfig(AppConfig):
    """Add ``"plangate_django"`` to ``INSTALLED_APPS`` for ``manage.py plangate_check``."""

    name = "plangate_django"
    verbose_name = "plangate"
