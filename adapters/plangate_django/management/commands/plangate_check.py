"""``python manage.py plangate_check``: check ``settings.PLANGATE["CONFIG"]``, as ``plangate check``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from plangate.config import load_config
from plangate.errors import ConfigError

from ...middleware import settings_of


class Command(BaseCommand):
    help = "Validate the plangate config named by settings.PLANGATE['CONFIG']."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", nargs="?", help="another config file to check instead")

    def handle(self, *args: Any, **options: Any) -> None:
        source = options.get("file") or settings_of()["CONFIG"]
        try:
            config = load_config(source)
        except ConfigError as exc:
            raise CommandError(f"\n{exc}") from None
        m = config.model
        self.stdout.write(
            f"{source}: ok — {len(m.features)} features, {len(m.plans)} plans, "
            f"{len(m.routes)} routes"
        )
        for note in config.notes:
            self.stdout.write(f"note: {note}")
