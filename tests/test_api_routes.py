"""Every route of the issue's table over real HTTP: aliases, models, info routes, admin, CORS, errors."""

from __future__ import annotations

import pytest

from fake_upstream import error_reply, raw_reply
from helpers import chat_body, completion_body
from test_cache_policy import original_key

CHAT_ROUTES = ["/v1/chat/completions", "/chat/completions", "/api/v1/chat/completions", "/api/chat/completions"]
COMPLETION_ROUTES = ["/v1/completions", "/completions", "/api/v1/completions"]
MODEL_ROUTES = ["/v1/models", "/models", "/api/v1/models"]
# The original's values come first; later features only append (DELETE for /cache/entries,
# the per-request Cache-Control / X-Cache-* headers).
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Cache-Bypass, X-Cache-Admin-Token",
}


def assert_cors(headers) -> None:
    assert headers["Access-Control-Allow-Origin"] == CORS["Access-Control-Allow-Origin"]
    methods = [m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")]
    assert set(CORS["Access-Control-Allow-Methods"].split(", ")) <= set(methods)
    assert headers["Access-Control-Allow-Headers"].startswith(CORS["Access-Control-Allow-Headers"])


def assert_openai_error(response, status: int, type: str | None = None, code: str | None = None,
                        message: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if type is not None:
        assert error["type"] == type
    if code is not None:
        assert error["code"] == code
    if message is not None:
        assert error["message"] == message
    return error


@pytest.mark.parametrize("routes, body, mode", [
    (CHAT_ROUTES, chat_body(), "chat"),
    (COMPLETION_ROUTES, completion_body(), "completion"),
], ids=["chat", "completion"])
def test_completion_routes__aliases_share_one_key(proxy, fake_upstream, http, routes, body, mode):
    expected = original_key(mode, body)
    first = http.post(proxy.url + routes[0], json=body)
    assert (first.status_code, first.headers["X-Computer-Use-Cache"]) == (200, "MISS")
    for route in routes:
        response = http.post(proxy.url + route, json=body)
        assert response.status_code == 200
        assert response.headers["X-Computer-Use-Cache"] == "HIT", route
        assert response.headers["X-Computer-Use-Cache-Key"] == expected
        assert response.json() == first.json()
    assert len(fake_upstream.calls("/completions")) == 1
    assert fake_upstream.requests[0].path == "/v1" + ("/chat/completions" if mode == "chat" else "/completions")


def test_completion_routes__modes_never_share_a_key(proxy, fake_upstream, http):
    # The same fields sent to a chat route and a completion route are different requests.
    body = {"model": "test/model-a", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}
    chat = http.post(proxy.url + "/v1/chat/completions", json=body)
    completion = http.post(proxy.url + "/v1/completions", json=body)
    assert chat.headers["X-Computer-Use-Cache"] == completion.headers["X-Computer-Use-Cache"] == "MISS"
    assert chat.headers["X-Computer-Use-Cache-Key"] != completion.headers["X-Computer-Use-Cache-Key"]
    assert completion.headers["X-Computer-Use-Cache-Key"] == original_key("completion", body)
    assert completion.json()["object"] == "text_completion"


@pytest.mark.parametrize("route", MODEL_ROUTES)
def test_models_routes__proxied_never_cached(proxy, fake_upstream, http, route):
    for _ in range(2):
        response = http.get(proxy.url + route)
        assert response.status_code == 200
        assert response.json()["data"][0]["id"] == "test/model-a"
        for prefix in ("X-Computer-Use-Cache", "X-Code-Model-Cache"):
            assert response.headers[prefix] == "BYPASS"
            assert response.headers[f"{prefix}-Bypass-Reason"] == "model lists are not cached"
    assert [(r.method, r.path) for r in fake_upstream.requests] == [("GET", "/v1/models")] * 2


def test_models_routes__upstream_error_passes_through(start_proxy, fake_upstream, http):
    # The fake answers 404 with an OpenAI error for a path it does not serve.
    proxy = start_proxy(upstream_base_url=fake_upstream.base_url + "/elsewhere", upstream_api_key="")
    response = http.get(proxy.url + "/v1/models", headers={"Authorization": "Bearer sk-client"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Unknown path: GET /v1/elsewhere/models"
    assert response.headers["X-Computer-Use-Cache-Bypass-Reason"] == "model lists are not cached"
    assert fake_upstream.requests[-1].headers["authorization"] == "Bearer sk-client"


def test_models_routes__unreachable_upstream_is_502(proxy, fake_upstream, http):
    fake_upstream.stop()
    response = http.get(proxy.url + "/v1/models")
    assert_openai_error(response, 502, "upstream_error", "upstream_request_failed")


def test_root__original_shape(proxy, http):
    response = http.get(proxy.url + "/")
    assert response.json() == {
        "name": "computer-use-cache", "status": "ok", "upstream_base_url": proxy_upstream(proxy),
        "endpoints": ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/models",
                      "/cache/stats"],
    }


def proxy_upstream(proxy) -> str:
    return proxy.app.extensions["computer_use_cache"].settings.upstream_base_url


def test_healthz__original_shape(proxy, http):
    body = http.get(proxy.url + "/healthz").json()
    assert body["ok"] is True
    assert body["upstream_base_url"] == proxy_upstream(proxy)
    stats = http.get(proxy.url + "/cache/stats").json()
    # db_bytes is the file's size at that moment; background maintenance may have moved it.
    assert {**body["cache"], "db_bytes": None} == {**stats, "db_bytes": None}


def test_healthz__unusable_database_is_503(start_proxy, http, tmp_path):
    (tmp_path / "blocker").write_text("")
    proxy = start_proxy(cache_db_path=str(tmp_path / "blocker" / "cache.sqlite3"))
    response = http.get(proxy.url + "/healthz")
    assert response.status_code == 503
    assert response.json()["ok"] is False
    assert_openai_error(http.get(proxy.url + "/cache/stats"), 503, "server_error")
    assert_openai_error(http.post(proxy.url + "/cache/clear"), 503, "server_error")


def test_completions__unusable_database_still_answers(start_proxy, http, tmp_path):
    (tmp_path / "blocker").write_text("")
    # Coalescing keeps its lock file next to the database; it is left out here (see issue 4).
    proxy = start_proxy(cache_db_path=str(tmp_path / "blocker" / "cache.sqlite3"), cache_coalesce=False)
    for _ in range(2):
        answer = http.post(proxy.url + "/v1/chat/completions", json=chat_body())
        assert answer.status_code == 200
        assert answer.headers["X-Computer-Use-Cache"] == "BYPASS"
        assert answer.headers["X-Computer-Use-Cache-Bypass-Reason"].startswith("cache unavailable: ")


def test_cache_stats__original_fields_count_entries_and_hits(start_proxy, http, tmp_path):
    proxy = start_proxy(cache_ttl_seconds=600)
    stats = http.get(proxy.url + "/cache/stats").json()
    assert {"entries", "hits", "last_updated_at", "db_path", "ttl_seconds"} <= set(stats)
    assert (stats["entries"], stats["hits"], stats["last_updated_at"]) == (0, 0, None)
    assert (stats["db_path"], stats["ttl_seconds"]) == (str(tmp_path / "cache.sqlite3"), 600)
    http.post(proxy.url + "/v1/chat/completions", json=chat_body("a"))
    http.post(proxy.url + "/v1/chat/completions", json=chat_body("b"))
    for _ in range(3):
        http.post(proxy.url + "/v1/chat/completions", json=chat_body("a"))
    stats = http.get(proxy.url + "/cache/stats").json()
    assert (stats["entries"], stats["hits"]) == (2, 3)
    assert isinstance(stats["last_updated_at"], float)


def test_cache_clear__without_token_deletes_everything(proxy, fake_upstream, http):
    http.post(proxy.url + "/v1/chat/completions", json=chat_body("a"))
    http.post(proxy.url + "/v1/completions", json=completion_body())
    response = http.post(proxy.url + "/cache/clear")
    assert (response.status_code, response.json()) == (200, {"ok": True, "deleted": 2})
    assert http.get(proxy.url + "/cache/stats").json()["entries"] == 0
    again = http.post(proxy.url + "/v1/chat/completions", json=chat_body("a"))
    assert again.headers["X-Computer-Use-Cache"] == "MISS"


@pytest.mark.parametrize("headers", [
    {"X-Cache-Admin-Token": "admin-secret"},
    {"Authorization": "Bearer admin-secret"},
    {"Authorization": "bearer admin-secret"},
], ids=["header", "bearer", "bearer-lowercase"])
def test_cache_clear__with_admin_token(start_proxy, http, headers):
    proxy = start_proxy(cache_admin_token="admin-secret")
    http.post(proxy.url + "/v1/chat/completions", json=chat_body())
    response = http.post(proxy.url + "/cache/clear", headers=headers)
    assert (response.status_code, response.json()) == (200, {"ok": True, "deleted": 1})


@pytest.mark.parametrize("headers", [
    {}, {"X-Cache-Admin-Token": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-secret"},
    {"X-Cache-Admin-Token": "admin-secret-and-more"},
], ids=["none", "wrong-header", "wrong-bearer", "not-bearer", "longer"])
def test_cache_clear__wrong_admin_token_is_401(start_proxy, http, headers):
    proxy = start_proxy(cache_admin_token="admin-secret")
    http.post(proxy.url + "/v1/chat/completions", json=chat_body())
    response = http.post(proxy.url + "/cache/clear", headers=headers)
    assert_openai_error(response, 401, "authentication_error", "invalid_api_key", "Invalid cache admin token.")
    assert http.get(proxy.url + "/cache/stats").json()["entries"] == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/cache/clear", "/nowhere"])
def test_options__preflight_answers_with_cors(proxy, fake_upstream, http, path):
    response = http.options(proxy.url + path, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-cache-bypass"})
    assert response.status_code in (200, 204)
    assert_cors(response.headers)
    assert fake_upstream.requests == []


def test_cors__on_every_response(proxy, fake_upstream, http):
    fake_upstream.enqueue(error_reply(429))
    responses = [
        http.get(proxy.url + "/"), http.get(proxy.url + "/healthz"), http.get(proxy.url + "/cache/stats"),
        http.get(proxy.url + "/v1/models"), http.post(proxy.url + "/cache/clear"),
        http.post(proxy.url + "/v1/chat/completions", json=chat_body("error")),
        http.post(proxy.url + "/v1/chat/completions", json=chat_body()),
        http.post(proxy.url + "/v1/chat/completions", json=chat_body()),
        http.post(proxy.url + "/v1/chat/completions", data="not json"),
        http.get(proxy.url + "/nowhere"), http.get(proxy.url + "/v1/chat/completions"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 429, 200, 200, 400, 404, 405]
    for response in responses:
        assert_cors(response.headers)


def test_cors__allow_origin_setting(start_proxy, http):
    proxy = start_proxy(cors_allow_origin="https://app.example")
    assert http.get(proxy.url + "/").headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert http.options(proxy.url + "/v1/chat/completions").headers[
        "Access-Control-Allow-Origin"] == "https://app.example"


def test_cors__exposes_the_cache_headers_to_browsers(proxy, http):
    exposed = http.get(proxy.url + "/").headers["Access-Control-Expose-Headers"]
    assert "X-Computer-Use-Cache" in exposed and "X-Code-Model-Cache-Bypass-Reason" in exposed


@pytest.mark.parametrize("method, path", [
    ("GET", "/nowhere"), ("POST", "/v2/chat/completions"), ("GET", "/v1/embeddings/x"),
])
def test_unknown_route__404_openai_error(proxy, fake_upstream, http, method, path):
    assert_openai_error(http.request(method, proxy.url + path), 404, "invalid_request_error")
    assert fake_upstream.requests == []


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"), ("POST", "/v1/models"),
    ("DELETE", "/cache/stats"), ("GET", "/cache/clear"), ("POST", "/healthz"),
])
def test_wrong_method__405_openai_error(proxy, fake_upstream, http, method, path):
    assert_openai_error(http.request(method, proxy.url + path), 405, "invalid_request_error")
    assert fake_upstream.requests == []


def test_upstream_error__non_json_content_type_passes_through(proxy, fake_upstream, http):
    fake_upstream.enqueue(raw_reply("<html>bad gateway</html>", status=503, content_type="text/html"))
    response = http.post(proxy.url + "/v1/chat/completions", json=chat_body())
    assert (response.status_code, response.text) == (503, "<html>bad gateway</html>")
    assert response.headers["Content-Type"].startswith("text/html")
