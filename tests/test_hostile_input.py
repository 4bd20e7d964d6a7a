"""Text the store cannot hold: a lone UTF-16 surrogate is refused at the edge, and no counter,
label or log line can be poisoned by one (issue 15)."""

from __future__ import annotations

import json
import logging

import pytest

from cache_store import NewEntry, SQLiteStore, StoreError
from errors import InvalidRequest
from metrics import model_label
from wire import parse_request_json

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
MESSAGES = '[{"role":"user","content":"hi"}]'


def post_text(http, proxy, text: str, path: str = CHAT, **headers):
    return http.post(proxy.url + path, data=text.encode("utf-8"), headers={**JSON, **headers}, timeout=10)


def assert_refused(response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert error["param"] == param
    assert param in error["message"] and "surrogate" in error["message"]


# -- the two failures of the issue ---------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_surrogate__lone_surrogate_in_model_is_400_before_the_upstream(start_proxy, fake_upstream, http,
                                                                      stream):
    # Before: forwarded, answered (and paid) upstream, then storing raised and the client got a 500
    # (a stream lost its store: "stream ... not stored: storing failed").
    proxy = start_proxy(hit_flush_seconds=0)
    text = f'{{"model":"\\ud800","messages":{MESSAGES},"stream":{json.dumps(stream)}}}'
    assert_refused(post_text(http, proxy, text), "model")
    assert fake_upstream.requests == []
    assert proxy.store.stats()["entries"] == 0


ADMIN_READS = ["/cache/stats", "/cache/entries", "/metrics", "/cache/activity", "/healthz"]


def test_surrogate__a_bad_model_never_blocks_stats_entries_or_metrics(start_proxy, fake_upstream, http):
    # Before: the model sat in the per-model counters, the next flush raised, and every route that
    # flushes first (stats, entries, metrics, and their HEAD forms) answered 500 until it was dropped.
    proxy = start_proxy(hit_flush_seconds=0)  # counters are written only when a route flushes
    for stream in ("false", "true"):
        post_text(http, proxy, f'{{"model":"x\\udfff","messages":{MESSAGES},"stream":{stream}}}')
    good = http.post(proxy.url + CHAT, json={"model": "test/model-a", "messages": [{"role": "user",
                                                                                      "content": "ok"}]})
    key = good.headers["X-Computer-Use-Cache-Key"]
    for path in [*ADMIN_READS, f"/cache/entries/{key}"]:
        for method in ("GET", "HEAD"):
            assert http.request(method, proxy.url + path).status_code == 200, (method, path)
    stats = http.get(proxy.url + "/cache/stats").json()
    assert stats["misses"] == 1 and stats["by_model"]["test/model-a"]["misses"] == 1
    assert len(fake_upstream.calls()) == 1


# -- the check at the edge -----------------------------------------------------------------------

@pytest.mark.parametrize("text, param", [
    ('{"model":"m","messages":[{"role":"user","content":"a\\ud800b"}]}', "messages[0].content"),
    ('{"model":"m","messages":[{"role":"user","content":"\\uDFFF"}]}', "messages[0].content"),
    ('{"model":"m","messages":[{"role":"\\udc80","content":"x"}]}', "messages[0].role"),
    ('{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    ('{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","\\ude00\\ud83d"]}', "stop[1]"),
    ('{"model":"m","messages":[{"role":"user","content":"x"}],"metadata":{"\\ud800":"v"}}',
     'metadata["\\ud800"]'),
    ('{"model":"m","messages":[{"role":"user","content":"x"}],"\\ud800":1}', '["\\ud800"]'),
    ('{"model":"m","messages":[{"role":"user","content":"x"}],"metadata":{"a b":"\\ud800\\u0041"}}',
     'metadata["a b"]'),
    # Past 64 escapes the bytes are searched by a regex instead of escape by escape.
    ('{"model":"m","messages":[{"role":"user","content":"' + "\\n" * 100 + '\\udbff"}]}', "messages[0].content"),
])
def test_surrogate__the_error_names_the_field(text, param):
    with pytest.raises(InvalidRequest) as refused:
        parse_request_json(text.encode())
    assert refused.value.param == param
    assert refused.value.code == "invalid_json" and refused.value.status == 400


@pytest.mark.parametrize("text", [
    '{"model":"m","messages":[{"role":"user","content":"\\ud83d\\ude00"}]}',
    '{"model":"m","messages":[{"role":"user","content":"\\uD83D\\uDE00 and \\uD800\\uDC00"}]}',
    '{"model":"m","messages":[{"role":"user","content":"a literal \\\\ud800, not an escape"}]}',
    '{"model":"m","messages":[{"role":"user","content":"\\u00e9\\u4e2d"}],"\\ud83d\\ude00":1}',
    '{"model":"m","messages":[{"role":"user","content":"' + "\\n" * 100 + '\\\\ud800 \\uD83D\\uDE00"}]}',
])
def test_surrogate__pairs_and_lookalikes_are_accepted(text):
    assert parse_request_json(text.encode()) == json.loads(text)


def test_surrogate__paired_escapes_are_cached_and_the_completion_route_refuses_too(proxy, fake_upstream, http):
    paired = f'{{"model":"test/model-a","messages":[{{"role":"user","content":"\\ud83d\\ude00"}}]}}'
    first, second = post_text(http, proxy, paired), post_text(http, proxy, paired)
    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert second.json()["choices"][0]["message"]["content"] == "echo: \U0001F600"
    assert_refused(post_text(http, proxy, '{"model":"m","prompt":["ok","\\ud800"]}', "/v1/completions"),
                   "prompt[1]")
    assert len(fake_upstream.requests) == 1


def test_surrogate__the_known_hit_lane_cannot_skip_the_check(proxy, fake_upstream, http):
    # The lane answers bytes it has seen admitted; refused bytes are never admitted, however often
    # they come, and cache-control headers (which skip the lane) change nothing.
    text = '{"model":"test/model-a","messages":[{"role":"user","content":"\\ud800"}]}'
    for headers in ({}, {}, {"X-Cache-TTL": "60"}, {}):
        assert_refused(post_text(http, proxy, text, **headers), "messages[0].content")
    assert fake_upstream.requests == []


def test_surrogate__large_clean_bodies_skip_the_walk():
    # A screenshot-sized body without a surrogate escape is never walked.
    from wire import lone_surrogate_path

    assert lone_surrogate_path({"a": ["\ud800"]}) == "a[0]"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "A" * 400_000}]})
    assert parse_request_json(body.encode())["model"] == "m"


# -- counters and the store, independently of the edge ------------------------------------------

def test_store__a_counter_sqlite_cannot_hold_never_blocks_the_others(tmp_path, caplog):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0)
    store.put(NewEntry("k1", "chat", "good", "{}", "{}"))
    store.record_request("MISS", "bad\ud800", route="/v1/chat/completions", key="k1")
    store.record_request("MISS", "good", route="/v1/chat/completions", key="k1")
    store.record_hit("k1")
    store.record_hit("k\udfff")  # keys are hex digests: this row alone is left out
    with caplog.at_level(logging.WARNING, logger="computer_use_cache"):
        stats = store.stats()
    assert stats["misses"] == 2 and stats["hits"] == 1
    assert stats["by_model"]["good"]["misses"] == 1
    assert stats["by_model"]["bad\\ud800"]["misses"] == 1  # counted, under its JSON escape
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert "left out 1 counter rows SQLite cannot store (UnicodeEncodeError)" in caplog.text
    assert store.activity(0)["recent"][0]["model"] == "good"
    store.record_request("BYPASS", "good", seconds=10**30)  # too large for SQLite: that row only
    store.record_request("BYPASS", "good")
    assert store.stats()["by_model"]["good"]["bypasses"] == 2
    assert len(store.activity(0)["recent"]) == 3
    store.close()


def test_store__an_entry_sqlite_cannot_hold_is_a_store_error(tmp_path):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0)
    with pytest.raises(StoreError):
        store.put(NewEntry("k1", "chat", "m\ud800", "{}", "{}"))
    assert store.put(NewEntry("k2", "chat", "m", "{}", "{}")) == "stored"
    assert store.stats()["entries"] == 1
    store.close()


def test_metrics__model_label_is_always_storable_text():
    assert model_label("x\ud800y") == "x\\ud800y"
    assert model_label("東京") == "東京"
    assert model_label(42) == "unknown"


def test_cli_import__a_line_with_a_lone_surrogate_is_reported_and_the_rest_imported(start_proxy, http,
                                                                                    tmp_path):
    # The version before this refusal cached such requests (escaped), so its exports hold them.
    from cache_policy import canonical_json, hash_canonical
    from test_cli import flask_cache, good_lines

    request = {"mode": "chat", "model": "test/model-a", "messages": [{"role": "user", "content": "x\ud800"}]}
    canonical = canonical_json(request)
    key = hash_canonical(canonical)
    old = {"key": key, "mode": "chat", "model": "test/model-a", "namespace": None,
           # Stored as its JSON escape (the old proxy's _storable), exported as such.
           "request_json": (canonical[:-1] + f',"cache_key":"{key}"}}').encode("utf-8", "backslashreplace").decode(),
           "response_json": json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": []}),
           "created_at": 1.0, "updated_at": 1.0, "expires_at": None}
    raw = {**old, "model": "test/model-a\udfff"}  # a hand-made line: the surrogate in the line itself
    source = tmp_path / "old.jsonl"
    lines = [json.dumps(old), json.dumps(raw), good_lines(http, start_proxy(), tmp_path)[0]]
    source.write_text("\n".join(lines) + "\n")

    result = flask_cache("import", str(source), db_path=str(tmp_path / "target.sqlite3"))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "line 1: request_json holds a lone UTF-16 surrogate at messages[0].content" in result.stderr
    assert "line 2: model holds a lone UTF-16 surrogate" in result.stderr
    assert "imported 1, already present 0, invalid 2" in result.stderr
