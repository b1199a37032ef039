"""plangate at the edge, in one command: nginx, ``plangate gateway`` and a demo API.

    python examples/gateway/run.py          # the gateway on http://127.0.0.1:8080

nginx runs the shipped adapters/gateways/nginx/nginx.conf (or nginx-fail-open.conf with
``--fail-open``), plus the demo API of upstream.conf as a second server block: static JSON
answered by nginx itself. ``plangate gateway`` decides with plangate.yaml. Everything binds
127.0.0.1 and lives in a temporary directory; Ctrl-C stops it all. See README.md.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ADAPTER = ROOT / "adapters" / "gateways" / "nginx"
CONFIG = HERE / "plangate.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=8080, help="the gateway (nginx)")
    parser.add_argument("--plangate-port", type=int, default=8787, help="plangate gateway")
    parser.add_argument("--upstream-port", type=int, default=9000, help="the demo API")
    parser.add_argument("--log-port", type=int, default=5514, help="access-log commits (UDP)")
    parser.add_argument("--fail-open", action="store_true", help="use nginx-fail-open.conf")
    return parser.parse_args(argv)


def nginx_config(args: argparse.Namespace) -> str:
    """The shipped config on the chosen ports, with the demo API's server block added."""
    name = "nginx-fail-open.conf" if args.fail_open else "nginx.conf"
    text = (ADAPTER / name).read_text() + "\n"
    # the demo API is a second server in the same http block: before its closing brace
    http, brace, rest = text.rstrip().rpartition("}")
    if not brace or rest:
        sys.exit(f"{ADAPTER / name} does not end with the http block's closing brace")
    upstream = "".join(f"    {line}" if line else line for line in upstream_conf())
    text = f"{http}\n{upstream}{brace}\n"
    for literal, port in {
        "127.0.0.1:8080": args.port,
        "127.0.0.1:8787": args.plangate_port,
        "127.0.0.1:9000": args.upstream_port,
        "127.0.0.1:5514": args.log_port,
    }.items():
        text = text.replace(literal, f"127.0.0.1:{port}")
    return text


def upstream_conf() -> list[str]:
    return (HERE / "upstream.conf").read_text().splitlines(keepends=True)


def find_nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        sys.exit("nginx is not installed (Debian/Ubuntu: apt-get install nginx)")
    return found


def start(command: list[str], ready: str, name: str) -> subprocess.Popen[str]:
    """Start a server and read its log (stderr) until ``ready``; then echo the rest."""
    proc = subprocess.Popen(  # noqa: S603 (fixed commands: this Python, nginx)
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches this script only: it stops them in order
    )
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if ready in line:
            break
    else:
        proc.wait()
        sys.exit(f"{name} did not start:\n{''.join(log)}")
    threading.Thread(target=echo, args=(proc.stderr, name), daemon=True).start()
    return proc


def echo(stream: IO[str], name: str) -> None:
    with stream:
        for line in stream:
            print(f"[{name}] {line}", end="", flush=True)


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def tokens() -> dict[str, str]:
    """Ready-made tokens, as ``plangate token --config examples/gateway/plangate.yaml`` mints."""
    from plangate.cli import mint_token
    from plangate.config import load_config

    config = load_config(CONFIG)
    return {
        "FREE": mint_token(config, "acme", "free", ttl=24 * 3600),
        "PRO": mint_token(config, "globex", "pro", ttl=24 * 3600),
    }


def instructions(url: str, minted: dict[str, str]) -> str:
    return f"""
Tokens (acme on free, globex on pro; valid 24 h):

export FREE={minted["FREE"]}
export PRO={minted["PRO"]}

curl -i {url}/health                                                      # 200, public
curl -i {url}/v1/projects                                                 # 401 problem
curl -i {url}/v1/projects -H "Authorization: Bearer $FREE"                # 200, RateLimit headers
curl -i -X POST {url}/v1/reports/7/export -H "Authorization: Bearer $FREE"  # 402 problem
curl -i -X POST {url}/v1/reports/7/export -H "Authorization: Bearer $PRO"   # 200
curl -i -X POST {url}/v1/completions -H "Authorization: Bearer $FREE"     # 200, 57 tokens charged
curl -s {url}/.plangate/entitlements -H "Authorization: Bearer $FREE"     # ai_tokens used: 57
curl -i {url}/v1/secret -H "Authorization: Bearer $FREE"                  # 403 problem (unmatched)
for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {url}/v1/projects -H "Authorization: Bearer $FREE"; done; echo  # ... 429
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    nginx = find_nginx()
    url = f"http://127.0.0.1:{args.port}"

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # stopped by a supervisor (or a test): clean up
    workdir = Path(tempfile.mkdtemp(prefix="plangate-gateway-example-"))
    service = proxy = None
    try:
        service = start(
            [
                *(sys.executable, "-m", "plangate.cli", "gateway", "--config", str(CONFIG)),
                *("--host", "127.0.0.1", "--port", str(args.plangate_port)),
                *("--log-listen", f"127.0.0.1:{args.log_port}"),
            ],
            "Uvicorn running on",
            "plangate",
        )
        (workdir / "nginx.conf").write_text(nginx_config(args))
        directives = "daemon off;"
        if os.geteuid() == 0:  # keep the workers on this account, as without root
            directives += f" user {pwd.getpwuid(0).pw_name};"
        proxy = start(
            [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", directives],
            "start worker processes",
            "nginx",
        )
        print(instructions(url, tokens()), flush=True)
        print(f"Gateway ready on {url} (Ctrl-C stops nginx, plangate and the demo API)", flush=True)
        # until Ctrl-C, SIGTERM, or one of them exits
        exited = threading.Event()
        for proc in (service, proxy):
            threading.Thread(target=lambda p=proc: (p.wait(), exited.set()), daemon=True).start()
        exited.wait()
        sys.exit("a server exited on its own; stopping")
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop(proxy)  # nginx first: its last access-log lines still reach plangate
        stop(service)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
