"""A bounded store: LRU eviction over CACHE_MAX_ENTRIES / CACHE_MAX_BYTES, background purging of
expired entries, and space handed back to the file system (incremental vacuum)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import requests

from cache_store import NewEntry, SQLiteStore
from store_schema import MIGRATIONS
from conftest import ProxyServer
from helpers import chat_body


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def post(server: ProxyServer, content: str) -> requests.Response:
    response = requests.post(server.url + "/v1/chat/completions", json=chat_body(content))
    assert response.status_code == 200
    return response


def status(server: ProxyServer, content: str) -> str:
    return post(server, content).headers["X-Computer-Use-Cache"]


# -- eviction ------------------------------------------------------------------------------------


def test_eviction__least_recently_used_go_first_and_recent_hits_survive(start_clocked_proxy, clock,
                                                                         fake_upstream):
    server = start_clocked_proxy(cache_max_entries=3)
    for name in ("A", "B", "C"):
        assert status(server, name) == "MISS"
        clock.advance(1)
    assert status(server, "A") == "HIT"  # A is now the most recently used
    clock.advance(1)
    assert status(server, "D") == "MISS"  # one over the bound: B, the least recently used, goes

    assert wait_until(lambda: server.store.entry_count() == 3)
    assert [status(server, name) for name in ("A", "C", "D")] == ["HIT", "HIT", "HIT"]
    assert status(server, "B") == "MISS"
    assert len(fake_upstream.calls()) == 5


def filled_then_bounded(tmp_path, clock, on_write) -> SQLiteStore:
    """A store holding A, B, C (A the oldest) and bounded to two entries, whose eviction only the
    test runs: filled while unbounded, no background maintainer or flusher was started."""
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), maintenance_seconds=0, hit_flush_seconds=0,
                        clock=clock, on_write=on_write)
    for key in ("A", "B", "C"):
        store.put(NewEntry(key, "chat", "m", "{}", '{"id": "x"}'))
        clock.advance(1)
    store.max_entries = 2
    return store


def test_eviction__an_entry_hit_after_the_evictions_flush_is_not_taken_for_the_oldest(tmp_path, clock):
    """Eviction writes the hit counters first, then deletes; a hit that lands in between (a busy
    worker) is still only in memory, and its entry must not go as if it had never been hit."""
    armed: list[str] = []

    def hit_just_before_the_delete(db) -> None:
        if armed:
            store.record_hit(armed.pop())

    store = filled_then_bounded(tmp_path, clock, hit_just_before_the_delete)
    armed.append("A")
    assert store.evict() == 1
    assert store.get("A") is not None and store.get("B") is None
    store.close()


def test_eviction__an_entry_whose_hit_another_flush_is_still_writing_is_not_taken_for_the_oldest(
        tmp_path, clock):
    """A flush (the background flusher's) can have taken a hit out of memory and be waiting for
    the write lock while eviction picks its victims: that hit is in neither the table nor memory
    yet, and must count all the same."""
    armed: list[str] = []
    flushes: list[threading.Thread] = []

    def flush_waiting_behind_the_evictions_write(db) -> None:
        if not armed:
            return
        store.record_hit(armed.pop())
        flushes.append(threading.Thread(target=store.flush))
        flushes[0].start()
        # It has taken the hit out of memory; now it waits for this write's lock.
        assert wait_until(lambda: not store._pending_hits)

    store = filled_then_bounded(tmp_path, clock, flush_waiting_behind_the_evictions_write)
    armed.append("A")
    assert store.evict() == 1
    flushes[0].join(timeout=10)
    assert store.get("B") is None
    assert store.get("A").hits == 1
    store.close()


def test_eviction__fill_far_beyond_the_bound(start_clocked_proxy, clock):
    server = start_clocked_proxy(cache_max_entries=5)
    for number in range(20):
        post(server, f"step {number}")
        clock.advance(1)
    assert wait_until(lambda: server.store.entry_count() == 5)
    survivors = {item["prompt"] for item in server.store.list_entries(limit=50)}
    assert survivors == {f"step {number}" for number in range(15, 20)}


def test_eviction__max_bytes_keeps_the_total_under_the_bound(start_clocked_proxy, clock):
    server = start_clocked_proxy()
    post(server, "first")
    one_entry = server.store.stats()["stored_bytes"]
    server.store.max_bytes = int(one_entry * 3.5)  # room for three entries of this size
    for name in ("secnd", "third", "forth", "fifth"):
        clock.advance(1)
        post(server, name)

    assert wait_until(lambda: server.store.entry_count() == 3)
    assert server.store.stats()["stored_bytes"] <= server.store.max_bytes
    assert {item["prompt"] for item in server.store.list_entries()} == {"third", "forth", "fifth"}


def test_eviction__unbounded_by_default(start_clocked_proxy):
    server = start_clocked_proxy()
    for number in range(5):
        post(server, f"q{number}")
    assert server.store.evict() == 0
    assert server.store.entry_count() == 5


def test_eviction__uses_the_recency_index(tmp_path):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"))
    plan = store._db().execute(
        "EXPLAIN QUERY PLAN SELECT cache_key FROM completions "
        "ORDER BY coalesce(last_hit_at, updated_at) LIMIT 10").fetchall()
    store.close()
    assert "idx_completions_recency" in " ".join(str(row) for row in plan)


# -- purge and vacuum ----------------------------------------------------------------------------


def test_purge__expired_entries_go_in_the_background_and_the_file_shrinks(start_clocked_proxy, clock):
    server = start_clocked_proxy(cache_ttl_seconds=100, cache_purge_interval_seconds=0.1)
    big = "lorem ipsum " * 2000  # ~24 KB each way
    for number in range(40):
        post(server, f"{number} {big}")
    assert status(server, "kept") == "MISS"
    server.store._db().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    full_size = os.path.getsize(server.store.path)
    assert full_size > 1_000_000

    clock.advance(90)
    assert status(server, "kept") == "HIT"  # a hit does not extend the TTL (the original's rule)
    clock.advance(20)  # every entry is now 110 s old
    assert status(server, "late") == "MISS"

    assert wait_until(lambda: server.store.entry_count() == 1)
    assert [item["prompt"] for item in server.store.list_entries()] == ["late"]
    assert wait_until(lambda: os.path.getsize(server.store.path) < full_size / 4)
    assert server.store.auto_vacuum_mode() == 2  # INCREMENTAL


def test_purge__own_ttl_entries_are_purged_too(tmp_path, clock):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), ttl_seconds=0, clock=clock,
                        maintenance_seconds=0)
    entry = NewEntry("k" * 64, "chat", "m", '{"mode":"chat"}', '{"id":"x"}')
    store.put(entry, ttl_seconds=10)
    store.put(NewEntry("j" * 64, "chat", "m", '{"mode":"chat"}', '{"id":"y"}'))
    clock.advance(11)
    report = store.maintain()
    store.close()
    assert report.purged == 1
    assert store.entry("j" * 64) is not None and store.entry("k" * 64) is None
    store.close()


def original_database(path: str, key: str, request_json: str, response_json: str) -> None:
    """A file as the original server left it: its table, WAL, no auto-vacuum, no migrations."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    MIGRATIONS[0][2](db)
    db.execute("INSERT INTO completions VALUES (?, 'chat', 'test/model-a', ?, ?, ?, ?, NULL, 0)",
               (key, request_json, response_json, time.time(), time.time()))
    filler = "x" * 4000
    db.executemany(
        "INSERT INTO completions VALUES (?, 'chat', 'old', '{}', ?, 1.0, 1.0, NULL, 0)",
        [(f"{n:064x}", filler) for n in range(200)])
    db.close()


def test_vacuum__the_original_servers_database_is_converted_safely(tmp_path, fake_upstream,
                                                                     start_proxy):
    from cache_policy import canonical_json, hash_canonical

    body = chat_body("from the original")
    canonical = canonical_json({**body, "mode": "chat"})
    key = hash_canonical(canonical)
    stored = '{"id":"chatcmpl-original","object":"chat.completion","choices":[]}'
    path = str(tmp_path / "cache.sqlite3")
    original_database(path, key, canonical[:-1] + f',"cache_key":"{key}"}}', stored)

    server = start_proxy(cache_ttl_seconds=0, cache_purge_interval_seconds=0.1)
    hit = requests.post(server.url + "/v1/chat/completions", json=body)
    assert hit.headers["X-Computer-Use-Cache"] == "HIT" and hit.text == stored

    assert wait_until(lambda: server.store.auto_vacuum_mode() == 2)
    assert server.store.entry_count() == 201
    server.store.max_entries = 1
    server.store.maintain()
    again = requests.post(server.url + "/v1/chat/completions", json=body)
    assert again.headers["X-Computer-Use-Cache"] == "HIT" and again.text == stored
    assert server.store.entry_count() == 1
    assert fake_upstream.calls() == []
