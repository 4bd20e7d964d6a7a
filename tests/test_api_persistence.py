"""Entries outlive the process: an original server's database keeps hitting, a restart keeps the
cache, and the TTL (with an injected clock) expires and replaces entries, all over real HTTP."""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import ProxyServer
from helpers import FakeClock, chat_body, completion_body
from test_cache_policy import original_key
from test_cache_store import create_original_database

CHAT = "/v1/chat/completions"
ORIGINAL_COLUMNS = [
    ("cache_key", "TEXT", 0, 1), ("mode", "TEXT", 1, 0), ("model", "TEXT", 1, 0),
    ("request_json", "TEXT", 1, 0), ("response_json", "TEXT", 1, 0), ("created_at", "REAL", 1, 0),
    ("updated_at", "REAL", 1, 0), ("last_hit_at", "REAL", 0, 0), ("hits", "INTEGER", 1, 0),
]


def original_row(mode: str, body: dict, response: dict, created_at: float, hits: int = 0) -> tuple:
    """A row as the original server wrote it: request_json is the canonical payload plus cache_key."""
    key = original_key(mode, body)
    payload = {"mode": mode, **body, "cache_key": key}
    request_json = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    response_json = json.dumps(response, ensure_ascii=False)
    return (key, mode, body["model"], request_json, response_json, created_at, created_at, None, hits)


def test_original_database__keeps_hitting(start_proxy, fake_upstream, http, tmp_path):
    chat = chat_body("Öffne die Einstellungen")
    legacy = completion_body("Say hello")
    chat_answer = {"id": "chatcmpl-from-2025", "object": "chat.completion", "created": 1735689600,
                   "model": "test/model-a", "choices": [{"index": 0, "message": {
                       "role": "assistant", "content": "Gespeichert"}, "finish_reason": "stop"}]}
    legacy_answer = {"id": "cmpl-old", "object": "text_completion", "created": 1735689600,
                     "model": "test/model-a", "choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}]}
    rows = [original_row("chat", chat, chat_answer, 1735689600.0, hits=5),
            original_row("completion", legacy, legacy_answer, 1735689601.0)]
    path = tmp_path / "original.sqlite3"
    create_original_database(path, rows)

    proxy = start_proxy(cache_db_path=str(path), cache_ttl_seconds=0)
    response = http.post(proxy.url + CHAT, json=chat)
    assert response.headers["X-Code-Model-Cache"] == "HIT"
    assert response.headers["X-Computer-Use-Cache-Key"] == rows[0][0]
    assert response.json() == chat_answer
    legacy_response = http.post(proxy.url + "/completions", json=legacy)
    assert legacy_response.headers["X-Computer-Use-Cache"] == "HIT"
    assert legacy_response.json() == legacy_answer
    assert fake_upstream.requests == []

    stats = http.get(proxy.url + "/cache/stats").json()
    assert (stats["entries"], stats["hits"]) == (2, 7)
    proxy.stop()

    db = sqlite3.connect(path)
    columns = [(row[1], row[2], row[3], row[5]) for row in db.execute("PRAGMA table_info(completions)")]
    # Later migrations may add columns; the original's come first and keep their definitions.
    assert columns[:len(ORIGINAL_COLUMNS)] == ORIGINAL_COLUMNS
    stored = db.execute("SELECT * FROM completions ORDER BY created_at").fetchall()
    db.close()
    for before, after in zip(rows, stored):
        assert after[:7] == before[:7]  # key, mode, model, request, response, created, updated
        assert after[7] is not None and after[8] == before[8] + 1


def test_original_database__expired_entries_follow_the_ttl(start_proxy, fake_upstream, http, tmp_path):
    body = chat_body()
    path = tmp_path / "original.sqlite3"
    create_original_database(path, [original_row("chat", body, {"id": "ancient", "choices": [{}]}, 1000.0)])
    proxy = start_proxy(cache_db_path=str(path), cache_ttl_seconds=3600)
    response = http.post(proxy.url + CHAT, json=body)
    assert response.headers["X-Computer-Use-Cache"] == "MISS"
    assert response.headers["X-Computer-Use-Cache-Store"] == "stored"
    assert response.json()["id"] != "ancient"


def test_persistence__restart_on_the_same_file_hits(start_proxy, fake_upstream, http):
    first = start_proxy()
    miss = http.post(first.url + CHAT, json=chat_body())
    http.post(first.url + CHAT, json=chat_body())  # a hit, counted in memory until shutdown
    first.stop()
    second = start_proxy()
    hit = http.post(second.url + CHAT, json=chat_body())
    assert (miss.headers["X-Computer-Use-Cache"], hit.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert hit.json() == miss.json()
    assert len(fake_upstream.calls()) == 1
    assert http.get(second.url + "/cache/stats").json()["hits"] == 2


@pytest.fixture
def clocked_proxy(start_proxy):
    """A proxy whose store reads an injected clock, so TTL tests move time by hand."""

    def start(ttl_seconds: int) -> tuple[ProxyServer, FakeClock]:
        clock = FakeClock()
        return start_proxy(store_options={"clock": clock}, cache_ttl_seconds=ttl_seconds), clock

    return start


def created_at(proxy) -> float:
    db = sqlite3.connect(proxy.store.path)
    try:
        return db.execute("SELECT created_at FROM completions").fetchone()[0]
    finally:
        db.close()


def test_ttl__expired_entry_is_a_miss_and_replaced(clocked_proxy, fake_upstream, http):
    proxy, clock = clocked_proxy(ttl_seconds=60)
    first = http.post(proxy.url + CHAT, json=chat_body())
    stored_at = created_at(proxy)
    clock.advance(60)
    assert http.post(proxy.url + CHAT, json=chat_body()).headers["X-Computer-Use-Cache"] == "HIT"
    clock.advance(1)
    expired = http.post(proxy.url + CHAT, json=chat_body())
    assert expired.headers["X-Computer-Use-Cache"] == "MISS"
    assert expired.headers["X-Computer-Use-Cache-Store"] == "stored"
    assert expired.json()["id"] != first.json()["id"]
    assert created_at(proxy) == clock.now == stored_at + 61
    fresh = http.post(proxy.url + CHAT, json=chat_body())
    assert fresh.headers["X-Computer-Use-Cache"] == "HIT"
    assert fresh.json() == expired.json()


def test_ttl__zero_never_expires(clocked_proxy, fake_upstream, http):
    proxy, clock = clocked_proxy(ttl_seconds=0)
    http.post(proxy.url + CHAT, json=chat_body())
    clock.advance(100 * 365 * 86400)
    assert http.post(proxy.url + CHAT, json=chat_body()).headers["X-Computer-Use-Cache"] == "HIT"
