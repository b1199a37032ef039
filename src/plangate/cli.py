"""The ``plangate`` command: check, token, explain, demo (SPEC §9)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import identity
from .__about__ import __version__
from ._gate import Gate
from .config import Config, load_config, parse_duration
from .errors import ConfigError, StorageError

DEMO_CONFIG = Path(__file__).parent / "_demo" / "plangate.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
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

    demo = commands.add_parser("demo", help="serve an example API on memory storage")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(run=_demo)
    return parser


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


def _gateway(args: argparse.Namespace) -> int:
    import logging
    import os

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


def _demo(args: argparse.Namespace) -> int:
    import uvicorn

    from ._demo.app import create_app

    config = load_config(DEMO_CONFIG)
    base = f"http://{args.host}:{args.port}"
    print("plangate demo — an example API on memory storage, config:", DEMO_CONFIG)
    print()
    for customer, plan in (
        ("acme-free", "free"),
        ("acme-pro", "pro"),
        ("acme-enterprise", "enterprise"),
    ):
        token = mint_token(config, customer, plan, ttl=86400)
        print(f"# {plan}: customer {customer}")
        print(f"export TOKEN_{plan.upper()}={token}")
    print()
    print("# try them:")
    print(f"curl -i {base}/health")
    print(
        f'curl -i -X POST {base}/v1/reports/42/export -H "Authorization: Bearer $TOKEN_FREE"        # 402'
    )
    print(
        f'curl -i -X POST {base}/v1/reports/42/export -H "Authorization: Bearer $TOKEN_PRO"         # 200'
    )
    print(
        f'for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w "%{{http_code}}\\n" {base}/v1/projects -H "Authorization: Bearer $TOKEN_PRO"; done   # 5/10s, then 429'
    )
    print(
        f'curl -i -X POST {base}/v1/completions -H "Authorization: Bearer $TOKEN_ENTERPRISE" -d \'{{"prompt": "write a haiku"}}\''
    )
    print(f'curl -s {base}/.plangate/entitlements -H "Authorization: Bearer $TOKEN_PRO"')
    print()
    sys.stdout.flush()
    uvicorn.run(create_app(DEMO_CONFIG), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
