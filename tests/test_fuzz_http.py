"""2,000 hostile requests over HTTP against a real proxy in front of the fake upstream: no 5xx the
upstream did not cause, no hang, no error logged, and the server still serves afterwards.

The requests come from tests/hostile_requests.py, which `make fuzz` runs with 10,000 against
gunicorn. FUZZ_SEED replays another run (the default seed keeps the suite repeatable). What the
fuzz found is kept below as plain regression tests.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

import guard
import hostile_requests
from apis import API_LIST
from fake_upstream import error_reply, json_reply
from hostile_requests import (ADMIN_TOKEN, UPSTREAM_ERROR_REASON, hostile_requests as generate, routes_of, run,
                              still_serving)
from proxy import _CONTROL_HEADER_KEYS
from wire import MAX_JSON_DEPTH, lone_surrogate_path

STATUS = "X-Computer-Use-Cache"
BYPASS_REASON = "X-Computer-Use-Cache-Bypass-Reason"

FUZZ_REQUESTS = 2000
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "15"))


def test_fuzz__hostile_requests_on_every_route_get_no_5xx_and_no_hang(start_proxy, fake_upstream, caplog):
    proxy = start_proxy(cache_admin_token=ADMIN_TOKEN)
    routes = routes_of(proxy.app)
    hostile = generate(routes, FUZZ_REQUESTS, FUZZ_SEED)

    with caplog.at_level(logging.WARNING, logger="computer_use_cache"):
        report = run(proxy.url, hostile, threads=4)
        problems = report.problems + still_serving(proxy.url)

    assert problems == [], "\n".join(problems[:20]) + f"\n{report.histogram()}\n(seed {FUZZ_SEED})"
    assert report.slowest < hostile_requests.HANG_SECONDS
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    # The fuzz reached every kind of answer it is meant to: refusals, and real misses and hits.
    assert {200, 400, 404, 405} <= set(report.statuses), report.histogram()
    assert {"HIT", "MISS", "BYPASS"} <= set(report.cache_statuses), report.histogram()
    assert len(fake_upstream.requests) > 100


def test_fuzz__every_route_and_method_of_the_app_is_fuzzed(app):
    routes = routes_of(app)
    sent = {(request.method, request.path.split("?")[0]) for request in generate(routes, FUZZ_REQUESTS, FUZZ_SEED)}
    for route in routes:
        for method in route.methods:
            if "<" not in route.rule:
                assert (method, route.rule) in sent, (method, route.rule)
            else:
                prefix = route.rule.split("<")[0]
                assert any(m == method and path.startswith(prefix) for m, path in sent), (method, route.rule)


def test_fuzz__json_routes_are_the_routes_the_server_takes_json_on(app):
    server_json_rules = {rule.rule for rule in app.url_map.iter_rules()
                         if "POST" in rule.methods and guard.is_api_path(rule.rule)}
    assert {route.rule for route in hostile_requests.json_routes(routes_of(app))} == server_json_rules
    assert any("<" in rule for rule in server_json_rules)  # rules with path parameters are among them


def test_fuzz__a_lone_surrogate_goes_into_every_string_of_every_json_route(app):
    routes = routes_of(app)
    swept = [request for request in generate(routes, FUZZ_REQUESTS, FUZZ_SEED) if request.kind == "sweep_surrogate"]
    urls = app.url_map.bind("127.0.0.1")
    for route in hostile_requests.json_routes(routes):
        body = hostile_requests.template_for(route.rule)(hostile_requests.random.Random(0))
        strings = list(hostile_requests.strings_of(body))
        mine = [request for request in swept if request.rule == route.rule]
        assert len(mine) == len(strings), route.rule
        for request in mine:
            # It reaches the route's own view (a plain value in each path parameter), and its
            # body is that route's template with a lone surrogate in it.
            assert urls.match(request.path, method="POST", return_rule=True)[0].rule == route.rule
            sent = json.loads(request.body)
            assert lone_surrogate_path(sent) is not None, request.body[:200]


def test_fuzz__every_header_an_api_or_the_cache_reads_has_hostile_values(app):
    fuzzed = {name.lower() for name in hostile_requests.HEADER_VALUES}
    read = {name.lower() for api in API_LIST for name in (*api.key_headers, *api.client_key_headers)}
    read |= {key.removeprefix("HTTP_").replace("_", "-").lower() for key in _CONTROL_HEADER_KEYS}
    assert {"x-api-key", "anthropic-version", "anthropic-beta", "x-cache-match"} <= read <= fuzzed
    # ... each sent on a Messages route too, where Anthropic's are read.
    swept = [request for request in generate(routes_of(app), FUZZ_REQUESTS, FUZZ_SEED) if request.kind == "sweep_header"]
    on_messages = {name.lower() for request in swept if request.rule.endswith("/messages") for name in request.headers}
    assert fuzzed <= on_messages


# -- what the fuzz found, as regressions ---------------------------------------------------------

MESSAGES_BODY = {"model": "claude-test", "messages": [{"role": "user", "content": "Count me."}]}
HOSTILE_BODIES = {
    "nested_past_the_limit": json.dumps({**MESSAGES_BODY, "system": "@"}).replace(
        '"@"', "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)).encode(),
    "nested_5000": b"[" * 5000 + b"]" * 5000,
    "lone_surrogate": json.dumps(MESSAGES_BODY).replace("Count me.", "Count \\ud800 me.").encode(),
    "nan": json.dumps({**MESSAGES_BODY, "temperature": float("nan")}).encode(),
    "not_utf8": json.dumps(MESSAGES_BODY).encode().replace(b"Count", b"Co\xfcnt"),
    "not_an_object": b"[1, 2]",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_fuzz__count_tokens_refuses_a_malformed_body_in_anthropics_shape_before_the_upstream(
        proxy, fake_upstream, http, name):
    response = http.post(proxy.url + "/v1/messages/count_tokens", data=HOSTILE_BODIES[name],
                         headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
    assert fake_upstream.requests == []


def test_fuzz__an_items_post_route_refuses_a_malformed_body_in_openais_shape(proxy, fake_upstream, http):
    response = http.post(proxy.url + "/v1/responses/resp_1/cancel", data=b'{"reason": "\\udc00"}',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reason"
    assert fake_upstream.requests == []


def test_fuzz__count_tokens_relays_the_upstreams_refusal_of_a_wrong_type(proxy, fake_upstream, http):
    response = http.post(proxy.url + "/v1/messages/count_tokens", json={**MESSAGES_BODY, "messages": 5})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers[BYPASS_REASON] == UPSTREAM_ERROR_REASON


def test_fuzz__an_uncached_route_relays_an_upstream_5xx_as_the_upstreams_error(proxy, fake_upstream, http):
    fake_upstream.enqueue(error_reply(503, "Overloaded", "server_error"),
                          json_reply({"id": "resp_1", "object": "response", "status": "cancelled"}))
    failed = http.post(proxy.url + "/v1/responses/resp_1/cancel", headers={"Content-Type": "application/json"})
    done = http.post(proxy.url + "/v1/responses/resp_1/cancel", headers={"Content-Type": "application/json"})
    assert (failed.status_code, failed.headers[BYPASS_REASON]) == (503, UPSTREAM_ERROR_REASON)
    assert failed.json()["error"]["message"] == "Overloaded"
    assert (done.status_code, done.headers[BYPASS_REASON]) == (200, "this route is not cached")


def test_fuzz__head_on_a_responses_item_is_its_get_without_the_body(proxy, fake_upstream, http):
    created = http.post(proxy.url + "/v1/responses", json={"model": "test/model-a", "input": "Hello."}).json()
    stored = http.head(proxy.url + f"/v1/responses/{created['id']}")
    unknown = http.head(proxy.url + "/v1/responses/resp_unknown")
    action = http.head(proxy.url + f"/v1/responses/{created['id']}/input_items")
    assert (stored.status_code, stored.headers[STATUS], stored.content) == (200, "HIT", b"")
    assert (unknown.status_code, unknown.headers[BYPASS_REASON], unknown.content) == (404, UPSTREAM_ERROR_REASON, b"")
    assert (action.status_code, action.headers[BYPASS_REASON]) == (404, UPSTREAM_ERROR_REASON)
    assert [(call.method, call.path) for call in fake_upstream.requests[1:]] == [
        ("HEAD", "/v1/responses/resp_unknown"), ("HEAD", f"/v1/responses/{created['id']}/input_items")]
