"""The forward-auth service's protocol: /check in its three request styles, /commit, /render,
commits from access logs. In process; tests/gateways/test_<gateway>.py run real gateways."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from starlette.testclient import TestClient

from plangate.cli import main
from plangate.engine import PROBLEM_BASE
from plangate.gateway import GatewayService, LogCommitter, follow_file, normalize_record
from tests.gateways.support import gateway_config
from tests.support import bearer

PROBLEM = "application/problem+json"


def service(**kwargs) -> GatewayService:
    return GatewayService(gateway_config(), **kwargs)


def nginx(method: str, uri: str, *, customer="acme", plan="free") -> dict[str, str]:
    return {"X-Original-Method": method, "X-Original-URI": uri, **bearer(customer, plan)}


def forwarded(method: str, uri: str, *, customer="acme", plan="free") -> dict[str, str]:
    return {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **bearer(customer, plan)}


def used(client: TestClient, meter: str, customer: str = "acme") -> int:
    body = client.get("/entitlements", headers=bearer(customer)).json()
    return body["meters"][meter]["limits"][0]["used"]


# /check ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style",
    [
        pytest.param(
            lambda c: c.get("/check", headers=nginx("GET", "/v1/projects?page=2")), id="nginx"
        ),
        pytest.param(
            lambda c: c.get("/check", headers=forwarded("GET", "/v1/projects")), id="forwarded"
        ),
        pytest.param(
            lambda c: c.get("/check/v1/projects", headers=bearer("acme", "free")), id="envoy"
        ),
    ],
)
def test_an_allowed_request_is_200_with_customer_plan_reservation_and_quota(style):
    with TestClient(service()) as client:
        response = style(client)
        assert response.status_code == 200
        assert response.headers["x-plangate-customer"] == "acme"
        assert response.headers["x-plangate-plan"] == "free"
        assert len(response.headers["x-plangate-reservation"]) == 32  # 128 random bits, hex
        assert response.headers["ratelimit-policy"] == '"api_calls-1m";q=5;w=60'
        assert response.headers["ratelimit"].startswith('"api_calls-1m";r=4;')
        assert used(client, "api_calls") == 1


def test_the_original_method_decides_which_rule_applies():
    with TestClient(service()) as client:
        assert (
            client.get("/check", headers=forwarded("POST", "/v1/reports/7/export")).status_code
            == 402
        )
        assert (
            client.post("/check/v1/reports/7/export", headers=bearer("acme", "free")).status_code
            == 402
        )
        assert (
            client.get("/check/v1/reports/7/export", headers=bearer("acme", "free")).status_code
            == 200
        )


def test_the_path_is_decoded_and_its_dot_segments_resolved():
    with TestClient(service()) as client:
        # /v1/../health is /health, a public route: no token needed, nothing reserved
        response = client.get(
            "/check", headers={"X-Original-Method": "GET", "X-Original-URI": "/v1/%2e%2e/health"}
        )
        assert response.status_code == 200
        assert "x-plangate-reservation" not in response.headers


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("//v1/projects", 401),  # a path, not the host "v1" and the path "/projects"
        ("/v1//projects", 401),
        ("/v1/x/..%2F..%2Fhealth", 200),  # decoded, then resolved: /health
        ("http://gateway.example/v1/projects?x=1", 401),  # an absolute URI: its path
        ("/health/.", 200),
    ],
)
def test_the_original_path_is_read_as_the_upstream_will_see_it(uri, expected):
    with TestClient(service()) as client:
        response = client.get("/check", headers={"X-Original-Method": "GET", "X-Original-URI": uri})
    assert response.status_code == expected


def test_the_path_after_check_is_decoded_once():
    with TestClient(service()) as client:
        # %252F is an encoded "%2F": the upstream sees "..%2F..", not a path back to /health
        response = client.get("/check/v1/projects/..%252F..%252Fhealth")
    assert response.status_code == 401


def test_normalized_paths_keep_a_trailing_slash():
    from plangate.gateway._service import normalize_path

    assert normalize_path("/health/.") == "/health/"
    assert normalize_path("/a/b/..") == "/a/"
    assert normalize_path("//a//b") == "/a/b"
    assert normalize_path("/%2e%2e/x") == "/x"


def test_nginx_upstream_status_lists_take_the_last_status():
    with TestClient(service()) as client:
        rid = _reserve(client)
        assert (
            client.post("/commit", json={"reservation": rid, "status": "502, 200"}).status_code
            == 200
        )
        assert used(client, "api_calls") == 1  # the 200 counted: not refunded


def test_a_public_route_is_allowed_without_identity():
    with TestClient(service()) as client:
        response = client.get("/check/health")
    assert response.status_code == 200
    assert "x-plangate-customer" not in response.headers


def test_a_spoofed_customer_header_is_ignored():
    with TestClient(service()) as client:
        headers = {
            "X-Original-Method": "GET",
            "X-Original-URI": "/v1/projects",
            "X-Plangate-Customer": "acme",
        }
        response = client.get("/check", headers=headers)
    assert response.status_code == 401
    assert response.headers["x-plangate-status"] == "401"


def test_a_denial_is_the_real_problem_response_with_headers_for_gateways():
    with TestClient(service()) as client:
        response = client.get("/check", headers=forwarded("POST", "/v1/reports/7/export"))
    assert response.status_code == 402
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "feature-not-in-plan"
    assert response.headers["x-plangate-status"] == "402"
    assert response.headers["x-plangate-reason"] == "feature-not-in-plan"
    assert json.loads(response.headers["x-plangate-problem"]) == response.json()


def test_a_used_up_quota_is_429_with_retry_after():
    with TestClient(service()) as client:
        for _ in range(5):
            assert client.get("/check/v1/projects", headers=bearer()).status_code == 200
        refused = client.get("/check/v1/projects", headers=bearer())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["violated-policies"] == ["api_calls-1m"]
    assert refused.headers["x-plangate-reason"] == "quota-exceeded"


def test_nginx_403_mode_and_render_give_back_the_real_problem():
    with TestClient(service()) as client:
        for _ in range(5):
            client.get("/check/v1/projects", headers=bearer())
        denied = client.get("/check/v1/projects?deny=403", headers=bearer())
        assert denied.status_code == 403
        assert client.get("/check/v1/projects?deny=403").status_code == 401  # 401 stays 401
        rendered = client.get(
            "/render",
            headers={
                "X-Plangate-Problem": denied.headers["x-plangate-problem"],
                "X-Plangate-Retry-After": denied.headers["retry-after"],
            },
        )
        assert rendered.status_code == 429
        assert rendered.headers["content-type"] == PROBLEM
        assert rendered.headers["retry-after"] == denied.headers["retry-after"]
        assert rendered.json()["type"] == PROBLEM_BASE + "quota-exceeded"
        assert (
            client.get("/render", headers={"X-Plangate-Problem": '{"type":"evil"}'}).status_code
            == 400
        )


def test_a_customer_id_that_is_not_a_header_token_is_percent_encoded():
    with TestClient(service()) as client:
        response = client.get("/check/v1/projects", headers=bearer("Ünïcode Org"))
    assert response.headers["x-plangate-customer"] == "%C3%9Cn%C3%AFcode%20Org"


# /commit ---------------------------------------------------------------------------------


def _reserve(client: TestClient, uri: str = "/v1/projects", method: str = "GET") -> str:
    response = client.get("/check", headers=forwarded(method, uri))
    assert response.status_code == 200
    return response.headers["x-plangate-reservation"]


def test_a_commit_with_the_usage_header_charges_it():
    with TestClient(service()) as client:
        rid = _reserve(client, "/v1/completions", "POST")
        assert used(client, "ai_tokens") == 100  # the estimate
        body = {"reservation": rid, "status": 200, "headers": {"X-Usage-Tokens": "1234"}}
        assert client.post("/commit", json=body).json()["outcome"] == "settled"
        assert used(client, "ai_tokens") == 1234


def test_a_commit_with_usage_by_meter_charges_it():
    with TestClient(service()) as client:
        rid = _reserve(client, "/v1/completions", "POST")
        client.post("/commit", json={"reservation": rid, "status": 201, "usage": {"ai_tokens": 7}})
        assert used(client, "ai_tokens") == 7


def test_an_upstream_error_refunds():
    with TestClient(service()) as client:
        rid = _reserve(client)
        assert client.post("/commit", json={"reservation": rid, "status": 502}).status_code == 200
        assert used(client, "api_calls") == 0


def test_a_commit_is_idempotent():
    with TestClient(service()) as client:
        rid = _reserve(client)
        first = client.post("/commit", json={"reservation": rid, "status": 500})
        again = client.post("/commit", json={"reservation": rid, "status": 500})
        assert first.json()["outcome"] == "settled"
        assert again.status_code == 200
        assert again.json()["outcome"] == "already-settled"
        assert used(client, "api_calls") == 0  # refunded once, not twice


def test_a_commit_for_an_unknown_or_expired_reservation_is_404_and_changes_nothing():
    with TestClient(service(reservation_ttl=0)) as client:
        rid = _reserve(client)
        response = client.post("/commit", json={"reservation": rid, "status": 500})
        assert response.status_code == 404
        assert used(client, "api_calls") == 1  # the estimate stands


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"status": 200}, "'reservation' must be the id from X-Plangate-Reservation"),
        (
            {"reservation": "r", "status": 999},
            "'status' must be the upstream's HTTP status (100-599)",
        ),
        ({"reservation": "r", "status": 200, "usage": {"ai_tokens": -1}}, "'usage' maps meters"),
        ({"reservation": "r", "status": 200, "headers": ["X"]}, "'headers' maps response header"),
    ],
)
def test_a_bad_commit_is_400_saying_why(body, message):
    with TestClient(service()) as client:
        response = client.post("/commit", json=body)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(message)


def test_a_commit_that_is_not_json_is_400():
    with TestClient(service()) as client:
        assert client.post("/commit", content=b"reservation=1").status_code == 400


def test_the_commit_token_is_required_when_set():
    with TestClient(service(commit_token="s3cret-commit-token")) as client:
        rid = _reserve(client)
        body = {"reservation": rid, "status": 500}
        assert client.post("/commit", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/commit", json=body, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-commit-token"}
        assert client.post("/commit", json=body, headers=right).status_code == 200


# access logs -----------------------------------------------------------------------------


def test_an_access_log_datagram_over_udp_commits():
    async def run() -> tuple[int, int]:
        gate = service()
        committer = LogCommitter(gate)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: committer, local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        decision = await gate.decide("POST", "/v1/completions", bearer()["authorization"][7:])
        line = {
            "reservation": decision.reservation_id,
            "status": "200",
            "headers": {"X-Usage-Tokens": "321"},
        }
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(
                b"<190>Nov 25 00:00:00 gw nginx: " + json.dumps(line).encode(), ("127.0.0.1", port)
            )
        try:
            async with gate._settling:
                await asyncio.wait_for(gate._settling.wait_for(lambda: gate.settled >= 1), 10)
        finally:
            transport.close()
        body = await gate.gate.entitlements(bearer()["authorization"][7:])
        assert isinstance(body, dict)
        return gate.settled, body["meters"]["ai_tokens"]["limits"][0]["used"]

    assert asyncio.run(run()) == (1, 321)


def test_a_followed_log_file_commits(tmp_path):
    path = tmp_path / "access.json"

    async def run() -> int:
        gate = service()
        committer = LogCommitter(gate)
        task = asyncio.create_task(follow_file(str(path), committer, poll=0.01, from_start=True))
        decision = await gate.decide("GET", "/v1/projects", bearer()["authorization"][7:])
        entry = {"reservation": decision.reservation_id, "status": 503}
        path.write_text(json.dumps(entry) + "\n")
        try:
            async with gate._settling:
                await asyncio.wait_for(gate._settling.wait_for(lambda: gate.settled >= 1), 10)
        finally:
            task.cancel()
        body = await gate.gate.entitlements(bearer()["authorization"][7:])
        assert isinstance(body, dict)
        return body["meters"]["api_calls"]["limits"][0]["used"]

    assert asyncio.run(run()) == 0  # the 503 refunded


def test_a_followed_log_file_is_read_from_its_end_and_across_rotation(tmp_path):
    path = tmp_path / "access.json"
    path.write_text(json.dumps({"reservation": "from-before", "status": 200}) + "\n")

    async def run() -> list[str]:
        gate = service()
        seen: list[str] = []
        committer = LogCommitter(gate)
        committer.feed = lambda text: seen.extend(  # type: ignore[method-assign]
            json.loads(line)["reservation"] for line in text.splitlines()
        )
        opened = asyncio.Event()
        task = asyncio.create_task(follow_file(str(path), committer, poll=0.01, opened=opened))
        try:
            await opened.wait()  # the follower has opened the file, at its end
            with path.open("a") as log:
                log.write(json.dumps({"reservation": "old-1", "status": 200}) + "\n")
            path.rename(tmp_path / "access.json.1")  # rotated, then one more old line
            with (tmp_path / "access.json.1").open("a") as log:
                log.write(json.dumps({"reservation": "old-2", "status": 200}) + "\n")
            path.write_text(json.dumps({"reservation": "new-1", "status": 200}) + "\n")
            for _ in range(500):  # bounded: the follower polls the file system
                if "new-1" in seen:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
        return seen

    assert asyncio.run(run()) == ["old-1", "old-2", "new-1"]


def test_log_formats_of_nginx_caddy_and_traefik_become_commit_records():
    nginx_line = {"reservation": "r1", "status": "200", "headers": {"X-Usage-Tokens": ""}}
    assert normalize_record(nginx_line) == {"reservation": "r1", "status": "200", "headers": {}}
    assert normalize_record({"reservation": "-", "status": "200"}) is None  # no reservation
    caddy = {
        "request": {"headers": {"X-Plangate-Reservation": ["r2"], "User-Agent": ["curl"]}},
        "status": 200,
        "resp_headers": {"X-Usage-Tokens": ["55"], "Content-Type": ["application/json"]},
    }
    assert normalize_record(caddy) == {
        "reservation": "r2",
        "status": 200,
        "headers": {"X-Usage-Tokens": "55", "Content-Type": "application/json"},
    }
    traefik = {
        "DownstreamStatus": 200,
        "OriginStatus": 200,
        "request_X-Plangate-Reservation": "r3",
        "downstream_X-Usage-Tokens": "9",
    }
    assert normalize_record(traefik) == {
        "reservation": "r3",
        "status": 200,
        "headers": {"X-Usage-Tokens": "9"},
    }
    assert normalize_record({"msg": "something else"}) is None
    denied = {"DownstreamStatus": 401, "OriginStatus": 0, "request_X-Plangate-Reservation": "r4"}
    assert normalize_record(denied) is None  # refused before the upstream: not ours to settle


# /healthz, the command -------------------------------------------------------------------


def test_healthz_counts_and_waits_for_settled_commits():
    with TestClient(service()) as client:
        assert client.get("/healthz").json() == {"status": "ok", "pending": 0, "settled": 0}
        rid = _reserve(client)
        client.post("/commit", json={"reservation": rid, "status": 200, "usage": {}})
        assert client.get("/healthz?settled=1&wait=5").json()["settled"] == 1


def test_the_gateway_command_checks_its_log_listen_argument(capsys, tmp_path):
    assert main(["gateway", "--config", "x.yaml", "--log-listen", "5514"]) == 2
    assert "--log-listen HOST:PORT" in capsys.readouterr().err


def test_a_check_with_both_header_styles_is_refused_in_auto_mode():
    # Traefik and Caddy pass the client's headers on: a client's X-Original-URI must not
    # turn a metered request into a public one.
    headers = {
        **forwarded("POST", "/v1/completions"),
        "X-Original-URI": "/health",
        "X-Original-Method": "GET",
    }
    with TestClient(service()) as client:
        assert client.get("/check", headers=headers).status_code == 400


def test_an_explicit_style_reads_only_its_own_headers():
    headers = {
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Uri": "/v1/completions",
        "X-Original-URI": "/health",
    }
    with TestClient(service(request_from="forwarded")) as client:
        assert client.get("/check", headers=headers).status_code == 401  # metered: needs a token
    with TestClient(service(request_from="original")) as client:
        assert client.get("/check", headers={"X-Forwarded-Uri": "/health"}).status_code == 400


@pytest.mark.parametrize("status", ["²", "٣", "1²"])
def test_a_commit_status_in_other_digits_is_400_not_500(status):
    with TestClient(service()) as client:
        response = client.post("/commit", json={"reservation": "r", "status": status})
    assert response.status_code == 400


def test_healthz_wait_in_other_digits_is_not_a_500():
    with TestClient(service()) as client:
        assert client.get("/healthz?settled=1&wait=²").status_code == 200


def test_customer_ids_that_differ_stay_different_in_the_header():
    from plangate.gateway._service import header_value

    assert header_value("org/1") != header_value("org%2F1")


# the periodic usage export (billing.export) ------------------------------------------------


def test_the_gateway_exports_usage_every_period(tmp_path):
    """``billing.export`` runs while the service does: the usage of allowed checks lands in
    a JSON lines file of its directory; a run with nothing to send writes no file."""
    import threading

    settings = {
        **gateway_config(),
        "billing": {"export": {"every": "1s", "to": "jsonl", "path": str(tmp_path)}},
    }
    gateway = GatewayService(settings)
    assert gateway.export is not None
    reports, sent = [], threading.Event()

    def heard(report):
        reports.append(report)
        if report.sent:
            sent.set()

    gateway.export.on_report = heard
    with TestClient(gateway) as client:
        for _ in range(3):
            assert client.get("/check", headers=nginx("GET", "/v1/projects")).status_code == 200
        assert sent.wait(30)
    files = list(tmp_path.glob("plangate-usage-jsonl-*.jsonl"))
    assert len(files) == 1  # runs that found nothing left no file
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [(e["customer"], e["meter"], e["value"]) for e in lines] == [("acme", "api_calls", 3)]
