"""GET /cache/entries (paged, filtered), GET and DELETE /cache/entries/<key>, over real HTTP."""

from __future__ import annotations

import pytest


def ask(openai_client, content: str, model: str = "test/model-a", namespace: str | None = None):
    headers = {"X-Cache-Namespace": namespace} if namespace else {}
    raw = openai_client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": "You drive a browser."},
                               {"role": "user", "content": content}],
        extra_headers=headers)
    return raw.headers["X-Computer-Use-Cache-Key"], raw


def test_entries__newest_first_with_the_documented_fields(openai_client, proxy, http):
    first, _ = ask(openai_client, "Open the settings page and find the privacy tab " * 3)
    second, _ = ask(openai_client, "Click login", model="test/model-b", namespace="proj-1")
    ask(openai_client, "Click login", model="test/model-b", namespace="proj-1")  # a hit

    page = http.get(proxy.url + "/cache/entries").json()

    assert page["object"] == "list" and page["has_more"] is False and page["next_cursor"] is None
    assert [item["key"] for item in page["data"]] == [second, first]
    newest, oldest = page["data"]
    assert set(newest) >= {"key", "model", "namespace", "created_at", "last_hit_at", "hits", "size",
                           "expires_at", "prompt"}
    assert (newest["model"], newest["namespace"], newest["hits"]) == ("test/model-b", "proj-1", 1)
    assert newest["prompt"] == "Click login" and newest["last_hit_at"] is not None
    assert oldest["hits"] == 0 and oldest["namespace"] is None and oldest["last_hit_at"] is None
    assert oldest["prompt"].startswith("Open the settings page") and len(oldest["prompt"]) <= 80
    assert oldest["expires_at"] == pytest.approx(oldest["created_at"] + 2592000)
    assert newest["size"] > 100


def test_entries__filter_by_model_and_namespace(openai_client, proxy, http):
    a, _ = ask(openai_client, "one")
    b, _ = ask(openai_client, "two", model="test/model-b")
    c, _ = ask(openai_client, "three", namespace="run-7")

    def keys(**params):
        return [item["key"] for item in http.get(proxy.url + "/cache/entries", params=params).json()["data"]]

    assert keys(model="test/model-b") == [b]
    assert keys(namespace="run-7") == [c]
    assert keys(namespace="") == [b, a]  # empty: the default namespace
    assert keys(model="test/model-a", namespace="run-7") == [c]
    assert keys(model="nope") == []


def test_entries__paged_with_a_cursor(openai_client, proxy, http):
    made = [ask(openai_client, f"step {number}")[0] for number in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get(proxy.url + "/cache/entries", params=params).json()
        seen += [item["key"] for item in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        assert page["has_more"] is (cursor is not None)
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(made))


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "abc"}, {"limit": "501"},
                                    {"cursor": "not-a-cursor"}])
def test_entries__bad_paging_is_a_400_openai_error(proxy, http, params):
    response = http.get(proxy.url + "/cache/entries", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] in params


def test_entry__shows_the_stored_request_and_response(openai_client, proxy, http):
    key, raw = ask(openai_client, "Where is the cart?", namespace="shop")
    entry = http.get(proxy.url + f"/cache/entries/{key}").json()

    assert entry["key"] == key and entry["namespace"] == "shop" and entry["mode"] == "chat"
    assert entry["request"]["messages"][-1] == {"role": "user", "content": "Where is the cart?"}
    assert entry["request"]["cache_key"] == key
    assert entry["response"] == raw.http_response.json()


def test_entry__delete_then_404_everywhere(openai_client, proxy, http):
    key, _ = ask(openai_client, "Scroll down")
    deleted = http.delete(proxy.url + f"/cache/entries/{key}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert ask(openai_client, "Scroll down")[1].headers["X-Computer-Use-Cache"] == "MISS"

    missing = "0" * 64
    for response in (http.get(proxy.url + f"/cache/entries/{missing}"),
                     http.delete(proxy.url + f"/cache/entries/{missing}")):
        assert response.status_code == 404
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "not_found" and missing in error["message"]


def test_entries__need_the_admin_token_when_one_is_set(start_proxy, http):
    server = start_proxy(cache_admin_token="s3cret-admin")
    key = "0" * 64
    for method, path in [("GET", "/cache/entries"), ("GET", f"/cache/entries/{key}"),
                         ("DELETE", f"/cache/entries/{key}")]:
        refused = http.request(method, server.url + path)
        wrong = http.request(method, server.url + path, headers={"X-Cache-Admin-Token": "nope"})
        allowed = http.request(method, server.url + path,
                               headers={"X-Cache-Admin-Token": "s3cret-admin"})
        assert refused.status_code == 401 and wrong.status_code == 401
        assert refused.json()["error"]["message"] == "Invalid cache admin token."
        assert allowed.status_code in (200, 404)
    bearer = http.get(server.url + "/cache/entries", headers={"Authorization": "Bearer s3cret-admin"})
    assert bearer.status_code == 200


def test_entries__cors_allows_delete_from_a_browser(proxy, http):
    preflight = http.options(proxy.url + "/cache/entries/abc")
    assert "DELETE" in preflight.headers["Access-Control-Allow-Methods"]
