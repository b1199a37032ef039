"""The ``plangate`` command: check, token, explain, customer, plans, credits, usage, gateway,
demo (SPEC §9)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from . import identity
from .__about__ import __version__
from ._gate import Gate
from .config import Config, load_config, parse_duration
from .customers import (
    CustomerNotFound,
    CustomerStore,
    IdempotencyConflict,
    InvalidRecord,
    LegacyPlanRefused,
)
from .engine import Problem
from .errors import ConfigError, StorageError, VersionConflict

DEMO_CONFIG = Path(__file__).parent / "_demo" / "plangate.yaml"
LIST_PAGE = 500  # records asked of the store at a time by ``customer list``
LEDGER_SHOWN = 10  # ledger entries ``credits show`` prints per feature (--json: all it read)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:2] == ["usage", "export"]:  # `usage ID` shows a customer; `usage -- export` too
        words[:2] = ["usage-export"]
    args = parser.parse_args(words)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except InvalidRecord as exc:
        for field, message in exc.errors:
            print(
                f"plangate: {field}: {message}" if field else f"plangate: {message}",
                file=sys.stderr,
            )
        return 1
    except LegacyPlanRefused as exc:
        print(
            f"plangate: plan {exc.plan!r} is a legacy plan: it stays with the customers who "
            "have it; pass --allow-legacy to assign it",
            file=sys.stderr,
        )
        return 1
    except IdempotencyConflict as exc:
        print(f"plangate: idempotency_key: {exc}", file=sys.stderr)
        return 1
    except (CustomerNotFound, VersionConflict, StorageError) as exc:
        print(f"plangate: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        # Python flushes stdout again at exit; point it at /dev/null so that it cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plangate", description="Entitlements for your API.")
    parser.add_argument("--version", action="version", version=f"plangate {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also connect to the config's storage and authenticate (exit 1 if that fails)",
    )
    check.set_defaults(run=_check)

    token = commands.add_parser("token", help="mint a development token with the config's secret")
    token.add_argument("--customer", required=True, help="the customer id to put in the token")
    token.add_argument("--plan", help="the plan claim (optional)")
    token.add_argument("--config", help="the config (default: ./plangate.yaml, else the demo's)")
    token.add_argument("--ttl", default="1h", help="lifetime, such as 15m, 1h or 7d (default 1h)")
    token.set_defaults(run=_token)

    explain = commands.add_parser(
        "explain", help="show the decision for a request, consuming nothing"
    )
    explain.add_argument("--config", required=True)
    explain.add_argument("--token", help="the JWT to decide for (omit: no token)")
    explain.add_argument("request", help='"METHOD /path", such as "POST /v1/reports/7/export"')
    explain.set_defaults(run=_explain)

    _customer_parsers(commands)
    _credits_parsers(commands)

    gateway = commands.add_parser(
        "gateway", help="run the forward-auth service for API gateways (nginx, Envoy, …)"
    )
    gateway.add_argument("--config", required=True)
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8787)
    gateway.add_argument(
        "--log-listen",
        metavar="HOST:PORT",
        help="commit from access logs sent as JSON lines over UDP (syslog or raw)",
    )
    gateway.add_argument(
        "--follow", metavar="FILE", help="commit from a JSON access-log file as it grows"
    )
    gateway.add_argument(
        "--request-from",
        choices=["auto", "original", "forwarded", "path"],
        default="auto",
        help="where /check reads the original request: X-Original-* (nginx), X-Forwarded-* "
        "(Traefik, Caddy, HAProxy), the path after /check (Envoy); auto refuses both at once",
    )
    gateway.add_argument(
        "--access-log", action="store_true", help="log every request the service answers"
    )
    gateway.set_defaults(run=_gateway)

    diff = commands.add_parser(
        "diff",
        help="what changes from one config to another, and whom it touches",
        description="Plans, features, limits, add-ons, routes and settings added, removed and "
        "changed, in words; with --storage, the customers on each changed plan and who "
        "would be over a lowered limit now. Exit status: 0 nothing changes, 1 something "
        "does, 2 an error.",
    )
    diff.add_argument("old", metavar="OLD", help="the config in force")
    diff.add_argument("new", metavar="NEW", help="the config to compare it with")
    diff.add_argument(
        "--storage", metavar="URI", help="read the live store (customers, counters) for impact"
    )
    diff.add_argument(
        "--top", metavar="N", type=_positive, default=10, help="customers shown per limit (10)"
    )
    diff.set_defaults(run=_diff)

    reload = commands.add_parser(
        "reload",
        help="check a config and publish it on the store: every process following the store "
        "loads it",
        description="Checks FILE as `plangate check` does (nothing is published if it fails), "
        "then keeps it in the store and announces it: every process whose config says "
        "`reload: {store: true}` loads this version within a moment, and every process that "
        "starts later starts on it. Exit status: 0 published, 1 an invalid config, 2 the "
        "store failed.",
    )
    reload.add_argument("file", metavar="FILE", help="the config to publish")
    reload.add_argument(
        "--storage", metavar="URI", help="the store to publish on (default: FILE's storage)"
    )
    reload.set_defaults(run=_reload)

    demo = commands.add_parser("demo", help="serve an example API on memory storage")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(run=_demo)
    return parser


def _customer_parsers(commands: Any) -> None:
    config_help = "the config (default: ./plangate.yaml, else the demo's)"
    customer = commands.add_parser("customer", help="show, set and list customer records")
    customer.set_defaults(run=lambda args: _usage(customer))
    actions = customer.add_subparsers(title="commands", metavar="COMMAND")

    show = actions.add_parser("show", help="print a customer's record and entitlements")
    show.add_argument("customer", metavar="ID", help="the customer id")
    show.add_argument("--config", metavar="FILE", help=config_help)
    show.set_defaults(run=_customer_show)

    set_ = actions.add_parser(
        "set", help="assign a plan, add-ons or overrides; what is not given is kept"
    )
    set_.add_argument("customer", metavar="ID", help="the customer id")
    set_.add_argument("--config", metavar="FILE", help=config_help)
    set_.add_argument("--plan", help="the customer's plan from now on")
    set_.add_argument("--trial", action="store_true", help="start the trial of --plan now")
    set_.add_argument(
        "--addon",
        metavar="NAME=QTY",
        type=_addon,
        action="append",
        default=[],
        help="an add-on and its quantity (0 removes it); repeatable",
    )
    set_.add_argument(
        "--override",
        metavar="FEATURE=VALUE",
        type=_override,
        action="append",
        default=[],
        help="a feature's value for this customer: JSON (true, 50, "
        '\'{"limit": 5, "window": "1m"}\', null removes it) or text (unlimited); repeatable',
    )
    set_.add_argument(
        "--allow-legacy",
        action="store_true",
        help="assign a legacy plan to a customer not on it already",
    )
    set_.set_defaults(run=_customer_set)

    list_ = actions.add_parser("list", help="print customer records, one JSON object a line")
    list_.add_argument("--config", metavar="FILE", help=config_help)
    list_.add_argument("--plan", help="only the customers on this plan")
    list_.add_argument(
        "--limit", type=_positive, metavar="N", help="print at most N records (default: all)"
    )
    list_.set_defaults(run=_customer_list)

    plans = commands.add_parser("plans", help="move customers between plans")
    plans.set_defaults(run=lambda args: _usage(plans))
    plan_actions = plans.add_subparsers(title="commands", metavar="COMMAND")
    migrate = plan_actions.add_parser(
        "migrate", help="move every customer on one plan to another (resumable)"
    )
    migrate.add_argument("--config", metavar="FILE", help=config_help)
    migrate.add_argument("--from", dest="from_plan", required=True, metavar="PLAN")
    migrate.add_argument("--to", dest="to_plan", required=True, metavar="PLAN")
    migrate.add_argument(
        "--dry-run", action="store_true", help="count the customers it would move, move none"
    )
    migrate.add_argument(
        "--allow-legacy", action="store_true", help="migrate to a legacy plan all the same"
    )
    migrate.set_defaults(run=_plans_migrate)


def _credits_parsers(commands: Any) -> None:
    config_help = "the config (default: ./plangate.yaml, else the demo's)"
    credits = commands.add_parser("credits", help="grant credits and show balances")
    credits.set_defaults(run=lambda args: _usage(credits))
    actions = credits.add_subparsers(title="commands", metavar="COMMAND")

    grant = actions.add_parser(
        "grant",
        help="add credits to a customer's balance (its debt is paid first)",
        description="Add AMOUNT credits of FEATURE (a kind: credits feature) to the balance of "
        "customer ID and print the grant. A debt is paid first. Without --idempotency-key the "
        "command makes up a key of its own, so one call is one grant; the key is in the "
        "printed grant.",
    )
    grant.add_argument("customer", metavar="ID", help="the customer id")
    grant.add_argument("feature", metavar="FEATURE", help="a credits feature, such as ai_credits")
    grant.add_argument("amount", metavar="AMOUNT", type=_whole, help="whole credits, 1 at least")
    grant.add_argument("--config", metavar="FILE", help=config_help)
    grant.add_argument(
        "--expires",
        metavar="WHEN",
        type=_expiry,
        help="a duration from now (30d, 12h, 2w) or an ISO 8601 time "
        "(2027-01-31T00:00:00Z; UTC unless it says) (default: never)",
    )
    grant.add_argument(
        "--priority", metavar="N", type=_whole, help="0 to 255, lower burns first (default 100)"
    )
    grant.add_argument(
        "--category", metavar="paid|promotional", help="the kind of credits (default paid)"
    )
    grant.add_argument(
        "--idempotency-key",
        metavar="K",
        help="a retry with the same key finds the first grant and adds nothing (default: a new "
        "key each call, so one call is one grant)",
    )
    grant.set_defaults(run=_credits_grant)

    show = actions.add_parser(
        "show", help="print a customer's balances, grants and newest ledger entries"
    )
    show.add_argument("customer", metavar="ID", help="the customer id")
    show.add_argument("--config", metavar="FILE", help=config_help)
    show.add_argument("--feature", metavar="F", help="this credits feature only (default: all)")
    show.add_argument("--json", action="store_true", help="print the balances as JSON")
    show.set_defaults(run=_credits_show)

    usage = commands.add_parser(
        "usage", help="show a customer's meters and credit balances, consuming nothing"
    )
    usage.add_argument("customer", metavar="ID", help="the customer id")
    usage.add_argument("--config", metavar="FILE", help=config_help)
    usage.add_argument(
        "--json", action="store_true", help="print the entitlements endpoint's answer as JSON"
    )
    usage.set_defaults(run=_usage_show)

    export = commands.add_parser(
        "usage-export",
        prog="plangate usage export",
        help="(as `usage export`) send usage not exported yet to billing",
        description="Send each customer's usage that was not exported yet: Stripe meter "
        "events, Zuora's usage upload CSV, or JSON lines. Exactly once: a run after an "
        "interrupted one first sends what that one had not confirmed, with the same "
        "identifiers.",
    )
    export.add_argument("--config", metavar="FILE", help=config_help)
    export.add_argument(
        "--to", required=True, choices=("stripe", "zuora-csv", "jsonl"), help="where to"
    )
    export.add_argument(
        "--since",
        metavar="ISO",
        type=_moment,
        help="from this hour (default: the retention's start)",
    )
    export.add_argument(
        "--until",
        metavar="ISO",
        type=_moment,
        help="up to the end of the last whole hour before "
        "this (default: now, the running hour included)",
    )
    export.add_argument(
        "--out", metavar="FILE", help="zuora-csv, jsonl: write here (default: standard output)"
    )
    export.add_argument(
        "--take-over",
        action="store_true",
        help="start even if an export that crashed still holds this destination (its hold "
        "runs out after a minute); never while another runs",
    )
    export.set_defaults(run=_usage_export)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return name, value


def _addon(text: str) -> tuple[str, int]:
    name, quantity = _pair(text, "NAME=QTY")
    try:
        return name, int(quantity)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the quantity of {name!r} is a whole number, not {quantity!r}"
        ) from None


def _override(text: str) -> tuple[str, Any]:
    feature, raw = _pair(text, "FEATURE=VALUE")
    try:
        return feature, json.loads(raw)
    except ValueError:  # not JSON: a word such as unlimited
        return feature, raw


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return number


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}") from None


def _expiry(text: str) -> timedelta | datetime:
    """A duration from now (``30d``) or an ISO 8601 time, UTC when it names no offset."""
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    iso = text.strip()
    if iso[-1:] in ("Z", "z"):  # what datetime.fromisoformat takes from Python 3.11 only
        iso = iso[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a duration such as 30d or an ISO 8601 time such as 2027-01-31T00:00:00Z, not {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _print_json(value: Any, indent: int | None = 2) -> None:
    print(json.dumps(value, indent=indent, ensure_ascii=False))


class _Store:
    """The customers of the config's store, for one command: opened, then closed."""

    def __init__(self, path: str | None) -> None:
        self.config = _default_config(path)
        self.path = path

    def __enter__(self) -> CustomerStore:
        if self.config.model.storage.startswith("memory://"):
            print(
                "plangate: warning: the config's storage is memory://, so this command has a "
                "store of its own, in its own memory: no server sees its changes, and it sees "
                "none of theirs (set storage: or PLANGATE_STORAGE to the servers' store)",
                file=sys.stderr,
            )
        self.gate = Gate(self.config)
        return self.gate.customers

    def __exit__(self, *exc: object) -> None:
        self.gate.storage.close()


def _customer_show(args: argparse.Namespace) -> int:
    with _Store(args.config) as customers:
        _print_json(customers.show(args.customer))
    return 0


def _customer_set(args: argparse.Namespace) -> int:
    if args.trial and args.plan is None:
        print("plangate customer set: --trial needs --plan (the plan to try)", file=sys.stderr)
        return 2
    if args.plan is None and not args.addon and not args.override:
        print(
            "plangate customer set: nothing to set: give --plan, --addon or --override",
            file=sys.stderr,
        )
        return 2
    changes: dict[str, Any] = {
        "addons": dict(args.addon),
        "overrides": dict(args.override),
        "trial": args.trial,
        "allow_legacy": args.allow_legacy,
    }
    if args.plan is not None:
        changes["plan"] = args.plan
    with _Store(args.config) as customers:
        _print_json(customers.assign(args.customer, **changes))
    return 0


def _customer_list(args: argparse.Namespace) -> int:
    with _Store(args.config) as customers:
        for record in _records(customers, args.plan, args.limit):
            _print_json(record, indent=None)
    return 0


def _records(
    customers: CustomerStore, plan: str | None, limit: int | None
) -> Iterator[dict[str, Any]]:
    """Every record (on ``plan``), page after page; ``limit`` of them at most."""
    left = limit
    cursor = None
    while True:
        size = LIST_PAGE if left is None else min(left, LIST_PAGE)
        page = customers.list(plan=plan, limit=size, cursor=cursor)
        found = page["customers"] if left is None else page["customers"][:left]
        yield from found
        if left is not None:
            left -= len(found)
            if left <= 0:
                return
        cursor = page["next_cursor"]
        if cursor is None:
            return


def _plans_migrate(args: argparse.Namespace) -> int:
    with _Store(args.config) as customers:
        result = customers.migrate(
            args.from_plan, args.to_plan, dry_run=args.dry_run, allow_legacy=args.allow_legacy
        )
    _print_json(result)
    return 0


def _credits_grant(args: argparse.Namespace) -> int:
    store = _Store(args.config)
    with store as customers:
        expires = args.expires
        if isinstance(expires, timedelta):
            expires = datetime.fromtimestamp(store.gate.clock(), timezone.utc) + expires
        key = args.idempotency_key
        if key is None:  # one call stays one grant, should the write be sent twice
            key = f"cli-{uuid.uuid4().hex}"
        try:
            grant = customers.grant_credits(
                args.customer,
                args.feature,
                args.amount,
                expires_at=expires,
                priority=args.priority,
                category=args.category,
                idempotency_key=key,
            )
        except InvalidRecord as exc:  # the admin API's header is this command's option
            raise InvalidRecord(
                [
                    ("idempotency_key" if field == "Idempotency-Key" else field, message)
                    for field, message in exc.errors
                ]
            ) from None
        except IdempotencyConflict as exc:
            if not isinstance(args.expires, timedelta):
                raise
            # the expiry is part of the grant a key stands for, and a duration moves with it
            print(
                f"plangate: idempotency_key: {exc}; an --expires duration counts from each "
                "call: to retry a grant, give --expires its expires_at",
                file=sys.stderr,
            )
            return 1
    _print_json(grant)
    return 0


def _credits_show(args: argparse.Namespace) -> int:
    with _Store(args.config) as customers:
        shown = customers.credits(args.customer, feature=args.feature)
    if args.json:
        _print_json(shown)
        return 0
    if not shown:
        print("the config has no credits feature")
        return 0
    blocks = [_credits_lines(name, view) for name, view in shown.items()]
    print("\n\n".join("\n".join(lines) for lines in blocks))
    return 0


def _credits_lines(feature: str, view: dict[str, Any]) -> list[str]:
    """One feature of ``credits show``: its balance, grants and newest ledger entries."""
    balance = f"{feature}: balance {view['balance']}"
    if view["debt"]:
        balance += f" (in debt: {view['debt']})"
    lines = [balance]
    grants = [
        (
            g["id"],
            g["source"],
            g["category"],
            g["priority"],
            f"{g['remaining']}/{g['amount']}",
            _moment_text(g["expires_at"]),
        )
        for g in view["grants"]
    ]
    if grants:
        header = ("grant", "source", "category", "priority", "remaining/amount", "expires")
        lines += _table(header, grants)
    else:
        lines.append("no grants")
    entries = view["ledger"]
    if entries:
        shown = entries[:LEDGER_SHOWN]
        more = " (--json has more)" if len(entries) > len(shown) or view["next_cursor"] else ""
        lines += ["", f"newest ledger entries{more}:"]
        lines += _table(
            ("at", "kind", "amount", "grant", "ref"),
            [
                (_moment_text(e["at"]), e["kind"], e["amount"], e["grant"] or "-", e["ref"] or "-")
                for e in shown
            ],
        )
    return lines


def _usage_show(args: argparse.Namespace) -> int:
    from ._drivers import drive
    from .identity import Identity

    store = _Store(args.config)
    with store as customers:
        gate = store.gate
        flow = gate.engine.entitlements(Identity(args.customer, None, {}), gate.clock())
        answer = drive(flow, gate.storage, customers)
    if isinstance(answer, Problem):
        print(f"plangate: {answer.detail}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(answer)
        return 0
    print("\n".join(_usage_lines(answer)))
    return 0


def _moment(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time, such as 2026-12-01 or 2026-12-01T10:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # no zone: UTC, as Stripe's times
    return moment.timestamp()


def _usage_export(args: argparse.Namespace) -> int:
    from .billing import Destination, ExportBusy, ExportInterrupted, UsageExport, destination
    from .storage import open_storage

    config = _default_config(args.config)
    if config.model.storage.startswith("memory://"):
        print(
            "plangate usage export: the config's storage is memory://: this command would "
            "see no usage of any server (set storage: or PLANGATE_STORAGE)",
            file=sys.stderr,
        )
        return 1
    with contextlib.ExitStack() as stack:
        out: IO[str] = sys.stdout
        if args.out:
            out = stack.enter_context(open(args.out, "a", encoding="utf-8", newline=""))
        storage = open_storage(config.model.storage)
        stack.callback(storage.close)
        try:
            target: Destination = destination(config, args.to, out)
        except ValueError as exc:
            print(f"plangate usage export: {exc}", file=sys.stderr)
            return 2
        try:
            report = UsageExport(storage, config, target).run(
                args.since, args.until, take_over=args.take_over
            )
        except (ExportBusy, ExportInterrupted) as exc:
            print(f"plangate usage export: {exc}", file=sys.stderr)
            return 1
    # the report goes where the events do not
    shown = sys.stderr if args.to != "stripe" and not args.out else sys.stdout
    print("\n".join(report.lines()), file=shown)
    return 1 if report.rejected else 0


def _usage_lines(answer: dict[str, Any]) -> list[str]:
    """``usage``: the customer's plan, then a table of its meters and one of its credits."""
    head = f"customer {answer['customer']}, plan {answer['plan']}"
    if answer["trial_ends_at"]:
        head += f" (trial until {_moment_text(answer['trial_ends_at'])})"
    lines = [head, ""]
    meters = [
        (
            name,
            limit["policy"],
            f"{limit['used']}/{limit['limit']}",
            limit["remaining"],
            _reset_text(limit["reset"]),
        )
        for name, meter in answer["meters"].items()
        for limit in meter["limits"]
    ]
    if meters:
        lines += _table(("meter", "policy", "used/limit", "remaining", "reset"), meters)
    else:
        lines.append("no meters")
    credits = [
        (
            name,
            "unknown" if view["balance"] is None else view["balance"],
            f"{view['grant']} a {view['period']}" if view["grant"] is not None else "-",
        )
        for name, view in answer["credits"].items()
    ]
    lines.append("")
    if credits:
        lines += _table(("credits", "balance", "plan grant"), credits)
    else:
        lines.append("no credits")
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    cells = [list(header), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _moment_text(iso: str | None) -> str:
    """An ISO time of the store, to the second, in UTC; ``never`` for none."""
    if iso is None:
        return "never"
    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _reset_text(seconds: int) -> str:
    """``in 3d 4h``: the two largest units of the time to a reset; ``-`` for nothing used."""
    if seconds <= 0:
        return "-"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            count, seconds = divmod(seconds, size)
            parts.append(f"{count}{unit}")
    return "in " + " ".join(parts[:2])


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    m = config.model
    print(
        f"{args.file}: ok — {len(m.features)} features, {len(m.plans)} plans, "
        f"{len(m.routes)} routes"
    )
    for note in config.notes:
        print(f"note: {note}")
    if args.connect:
        return _connect(m.storage)
    return 0


def _connect(uri: str) -> int:
    from .storage import open_storage

    storage = open_storage(uri)
    try:
        answered = storage.check_connection()
    except StorageError as exc:
        print(f"plangate check: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(f"connected to {answered}" if answered else f"{uri}: nothing to connect to")
    return 0


def _default_config(path: str | None) -> Config:
    if path:
        return load_config(path)
    here = Path("plangate.yaml")
    return load_config(here if here.exists() else DEMO_CONFIG)


def mint_token(config: Config, customer: str, plan: str | None = None, ttl: float = 3600) -> str:
    """A development token signed with the config's HS secret (``plangate token``)."""
    return identity.mint_token(config.model.identity.jwt, customer, plan, ttl)


def _token(args: argparse.Namespace) -> int:
    config = _default_config(args.config)
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"plangate token: --ttl: {exc}", file=sys.stderr)
        return 2
    if ttl < 1:
        print("plangate token: --ttl: a token lives at least 1s", file=sys.stderr)
        return 2
    try:
        print(mint_token(config, args.customer, args.plan, ttl))
    except ValueError as exc:
        print(f"plangate token: {exc}", file=sys.stderr)
        return 2
    return 0


def _explain(args: argparse.Namespace) -> int:
    method, _, path = args.request.strip().partition(" ")
    if not path.startswith("/"):
        print('plangate explain: give the request as "METHOD /path"', file=sys.stderr)
        return 2
    gate = Gate(args.config)
    decision = gate.check(method.upper(), path, args.token, consume=False)
    print(f"{method.upper()} {path}")
    for reason in decision.reasons or ():
        print(f"  - {reason}")
    if decision.problem is not None and not decision.shadowed:
        print(f"decision: DENY {decision.problem.status} {decision.problem.name}")
    else:
        print("decision: ALLOW")
    return 0


def _reload(args: argparse.Namespace) -> int:
    from ._reload import SECRET_ENV, signature, version_of
    from .config import load_config_bytes
    from .storage import open_storage
    from .storage._registry import masked

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    config = load_config_bytes(data, args.file)  # a ConfigError: printed, exit 1
    uri = args.storage or config.model.storage
    if uri.startswith("memory:"):
        print(
            f"plangate reload: {uri} lives in each process: publish on a shared store "
            "(redis://…); a process on memory storage reloads its file by itself or on SIGHUP",
            file=sys.stderr,
        )
        return 2
    version = version_of(data)
    secret = os.environ.get(SECRET_ENV)
    try:
        storage = open_storage(uri)
    except (ConfigError, ValueError) as exc:
        print(f"plangate reload: {exc}", file=sys.stderr)
        return 2
    try:
        storage.publish_config(data, version, signature(data, secret) if secret else "")
    except StorageError as exc:
        print(f"plangate reload: {exc}", file=sys.stderr)
        return 2
    finally:
        storage.close()
    signed = f", signed with {SECRET_ENV}" if secret else ""
    print(f"{args.file}: published version {version} on {masked(uri)}{signed}")
    if not config.model.reload.store:
        print(
            "note: this config does not say reload: {store: true}: processes loading it stop "
            "following the store"
        )
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .config._diff import diff

    try:
        old, new = load_config(args.old), load_config(args.new)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    changes = diff(old, new)
    if not changes:
        print(f"{args.old} → {args.new}: nothing changes")
        return 0
    section = ""
    for change in changes:
        if change.section != section:
            section = change.section
            print(section)
        print(f"  {change.sign} {change.name}: {change.text}")
    if args.storage:
        try:
            lines = _impact(changes, new, args.storage, args.top)
        except (StorageError, ConfigError, ValueError) as exc:
            print(f"plangate diff: {exc}", file=sys.stderr)
            return 2
        from .storage._registry import masked

        print(f"impact ({masked(args.storage)}, now)")
        print("\n".join(f"  {line}" for line in lines))
    return 1


def _impact(changes: Sequence[Any], new: Config, uri: str, top: int) -> list[str]:
    """Customers (with a record) on each changed plan, and those over a lowered limit of it
    now, from the store's live counters: each customer's limit as the new config gives it
    (its add-ons, overrides and trial included)."""
    from .engine import Decision, Engine, Peek
    from .identity import Identity
    from .storage import ResilientStorage, open_storage

    plans = sorted({c.name.split(": ")[0] for c in changes if c.section == "plans"})
    lowered: dict[str, list[Any]] = {}
    for change in changes:
        if change.binds is not None:
            lowered.setdefault(change.binds[0], []).extend(change.binds[1])
    opened = open_storage(uri)
    # the store itself: a failure is an error here, never a count kept in this process
    storage = opened.inner if isinstance(opened, ResilientStorage) else opened
    engine = Engine(new, new_id=lambda: "diff")
    now = time.time()
    lines = []
    try:
        for plan in plans:
            records = list(_plan_records(storage, plan))
            lines.append(f"{plan}: {len(records):,} customers with a record on it")
            for limit in lowered.get(plan, []):
                over = []
                for record in records:
                    probe = Decision(None, {}, engine.kinds)
                    resolved = engine._plan(probe, Identity(record.customer, None, {}), record, now)
                    grant = resolved.meters.get(limit.meter) if resolved is not None else None
                    theirs = next(
                        (x for x in grant.limits if x.policy == limit.policy), None
                    ) if grant is not None else None  # fmt: skip
                    if resolved is None or theirs is None or theirs.shadow:
                        continue  # not on it now, or an override changed it
                    charge = engine.build_charge(
                        [(limit.meter, 0)], record.customer, resolved, record.billing_anchor, now
                    )
                    counters = tuple(
                        c for c, lim in zip(charge.counters, charge.limits, strict=True)
                        if lim is not None and lim.policy == limit.policy
                    )  # fmt: skip
                    (state,) = storage.peek(Peek(counters, now))
                    if state.used > theirs.limit:
                        over.append((state.used, theirs.limit, record.customer))
                over.sort(key=lambda item: (-item[0], item[2]))
                shown = ", ".join(f"{c} {used:,}/{cap:,}" for used, cap, c in over[:top])
                more = f" (and {len(over) - top:,} more)" if len(over) > top else ""
                lines.append(
                    f"  {limit.policy} at {limit.limit:,}: {len(over):,} over it now"
                    + (f": {shown}{more}" if over else "")
                )
    finally:
        opened.close()
    return lines


def _plan_records(storage: Any, plan: str) -> Iterator[Any]:
    """Every record on ``plan``, raw from the store."""
    cursor = None
    while True:
        page = storage.list_customers(plan=plan, limit=LIST_PAGE, cursor=cursor)
        yield from page.records
        cursor = page.cursor
        if cursor is None:
            return


def _gateway(args: argparse.Namespace) -> int:
    import logging

    from .gateway import GatewayService, serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    listen = None
    if args.log_listen:
        host, _, port = args.log_listen.rpartition(":")
        if not host or not port.isdigit():
            print(
                "plangate gateway: --log-listen HOST:PORT, such as 127.0.0.1:5514", file=sys.stderr
            )
            return 2
        listen = (host, int(port))
    token = os.environ.get("PLANGATE_COMMIT_TOKEN") or None
    service = GatewayService(args.config, commit_token=token, request_from=args.request_from)
    serve(
        service,
        args.host,
        args.port,
        log_listen=listen,
        follow=args.follow,
        access_log=args.access_log,
    )
    return 0


def demo_lines(base: str, config: Config | None = None) -> list[str]:
    """What ``plangate demo`` prints for the API at ``base``: tokens, then curl lines."""
    config = config or load_config(DEMO_CONFIG)
    bearer = '-H "Authorization: Bearer $TOKEN_{}"'
    export = f"curl -i -X POST {base}/v1/reports/42/export"
    lines = [f"plangate demo — an example API on memory storage, config: {DEMO_CONFIG}", ""]
    for customer, plan in (
        ("acme-free", "free"),
        ("acme-pro", "pro"),
        ("acme-enterprise", "enterprise"),
    ):
        token = mint_token(config, customer, plan, ttl=86400)
        lines += [f"# {plan}: customer {customer}", f"export TOKEN_{plan.upper()}={token}"]
    lines += [
        "# the admin API (admin.token; PLANGATE_ADMIN_TOKEN sets another)",
        f"export ADMIN_TOKEN={config.model.admin.token}",
        "",
        "# try them:",
        f"curl -i {base}/health",
        f"{export} {bearer.format('FREE')}        # 402",
        f"{export} {bearer.format('PRO')}         # 200",
        f'for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w "%{{http_code}}\\n" '
        f"{base}/v1/projects {bearer.format('PRO')}; done   # 5/10s, then 429",
        f"curl -i -X POST {base}/v1/completions {bearer.format('ENTERPRISE')} "
        """-d '{"prompt": "write a haiku"}'""",
        f"curl -s {base}/.plangate/entitlements {bearer.format('PRO')}",
        "",
        "# AI images on credits: pro includes 30 a month and an image costs 10;",
        "# then a top-up of 100 through the admin API, and the image is served again:",
        f'for i in 1 2 3 4; do curl -s -o /dev/null -w "%{{http_code}}\n" -X POST '
        f"{base}/v1/images {bearer.format('PRO')}; done   # 3 images, then 402",
        f"curl -s -X POST {base}/admin/customers/acme-pro/credits "
        '-H "Authorization: Bearer $ADMIN_TOKEN" -H "Idempotency-Key: demo-top-up" '
        "-H 'Content-Type: application/json' "
        """-d '{"feature": "ai_credits", "amount": 100}'   # 201, the grant""",
        f"curl -i -X POST {base}/v1/images {bearer.format('PRO')}   # 200 now",
        "",
        "# upgrade the free customer to pro, live (the admin API), then export again:",
        f"curl -s -X PATCH {base}/admin/customers/acme-free "
        '-H "Authorization: Bearer $ADMIN_TOKEN" '
        "-H 'Content-Type: application/merge-patch+json' "
        """-d '{"plan": "pro"}'   # 200, the record on pro""",
        f"{export} {bearer.format('FREE')}        # 200 now",
        "",
    ]
    return lines


def _demo(args: argparse.Namespace) -> int:
    import uvicorn

    from ._demo.app import create_app

    print("\n".join(demo_lines(f"http://{args.host}:{args.port}")))
    sys.stdout.flush()
    uvicorn.run(create_app(DEMO_CONFIG), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
