"""Settings of the example project: no database, no templates, plangate in MIDDLEWARE."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-plangate-example-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

# "plangate_django" adds `python manage.py plangate_check`.
INSTALLED_APPS = ["plangate_django"]
# First, so that a refused request costs nothing else.
MIDDLEWARE = ["plangate_django.PlanGateMiddleware"]
ROOT_URLCONF = "projects_api.urls"
DATABASES: dict[str, dict[str, str]] = {}
TIME_ZONE = "UTC"
USE_TZ = True

# STORAGE would override the config's storage: URI; PLANGATE_STORAGE in the environment does too.
PLANGATE = {"CONFIG": BASE_DIR / "plangate.yaml"}
