#!/usr/bin/env python
"""Django's command-line utility for the example project.

Run (from the repository root): python examples/django/manage.py runserver 127.0.0.1:8004
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "projects_api.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
