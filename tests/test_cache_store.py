"""The store contract, shared by every backend, and the SQLite specifics (original schema, migrations).

Each backend's tests subclass ``StoreContract`` and override the ``make_store`` fixture
(requests-cache's BaseStorageTest pattern): ``TestSQLiteStore`` and ``TestRedisStore`` run every
contract test. The rest of the contract (namespaces, listing, export, bounds, near matching) is in
test_store_contract.py, parametrized over both backends.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

import pytest

from cache_store import CHECKPOINT_AFTER_BYTES, MAX_BATCH_BYTES, WAL_SIZE_LIMIT_BYTES
import cache_store
from cache_store import NearRecord, NewEntry, SQLiteStore, StoreError
from helpers import FakeClock, holds_in_forked_child
from store_schema import MIGRATIONS


def entry(key: str = "k1", response: dict | None = None, model: str = "test/model-a") -> NewEntry:
    response = response or {"id": f"resp-{key}", "choices": [{"index": 0}]}
    return NewEntry(key, "chat", model, json.dumps({"mode": "chat", "cache_key": key}), json.dumps(response))


class StoreContract:
    """What any store must do. Subclasses provide ``make_store(ttl_seconds, clock)``."""

    @pytest.fixture
    def clock(self):
        return FakeClock()

    @pytest.fixture
    def store(self, make_store, clock):
        return make_store(ttl_seconds=0, clock=clock)

    @pytest.fixture
    def make_store(self):  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def test_store__get_missing_is_none(self, store):
        assert store.get("absent") is None

    def test_store__put_then_get_returns_the_text_unchanged(self, store, clock):
        text = '{"id": "x",  "choices": [{"index": 0}], "note": "東京"}'
        assert store.put(NewEntry("k", "chat", "m", "{}", text)) == "stored"
        got = store.get("k")
        assert (got.key, got.mode, got.model, got.response_json) == ("k", "chat", "m", text)
        assert got.created_at == got.updated_at == clock.now

    def test_store__put_live_key_is_updated_and_keeps_created_at(self, store, clock):
        store.put(entry("k", {"id": "first", "choices": [1]}))
        created = store.get("k").created_at
        clock.advance(10)
        assert store.put(entry("k", {"id": "second", "choices": [1]})) == "updated"
        got = store.get("k")
        assert json.loads(got.response_json)["id"] == "second"
        assert got.created_at == created
        assert got.updated_at == clock.now

    def test_store__expired_entry_is_a_miss_and_is_replaced(self, make_store, clock):
        store = make_store(ttl_seconds=100, clock=clock)
        store.put(entry("k"))
        first_created = clock.now
        clock.advance(100)
        assert store.get("k") is not None  # exactly at the TTL: still live (now - created > ttl expires)
        clock.advance(1)
        assert store.get("k") is None
        assert store.put(entry("k", {"id": "fresh", "choices": [1]})) == "stored"
        got = store.get("k")
        assert got.created_at == clock.now != first_created
        assert json.loads(got.response_json)["id"] == "fresh"

    def test_store__ttl_zero_never_expires(self, store, clock):
        store.put(entry("k"))
        clock.advance(10 * 365 * 86400)
        assert store.get("k") is not None

    def test_store__record_hit_counts_after_flush(self, store):
        store.put(entry("k"))
        store.record_hit("k")
        store.record_hit("k")
        store.flush()
        assert store.get("k").hits == 2
        assert store.stats()["hits"] == 2

    def test_store__delete(self, store):
        store.put(entry("k"))
        assert store.delete("k") is True
        assert store.delete("k") is False
        assert store.get("k") is None

    def test_store__clear_returns_rows_removed(self, store):
        for key in ("a", "b", "c"):
            store.put(entry(key))
        assert store.clear() == 3
        assert store.stats()["entries"] == 0
        assert store.clear() == 0

    def test_store__stats_shape(self, store, clock):
        empty = store.stats()
        assert {"entries", "hits", "last_updated_at", "db_path", "ttl_seconds"} <= set(empty)
        assert (empty["entries"], empty["hits"], empty["last_updated_at"]) == (0, 0, None)
        store.put(entry("a"))
        clock.advance(5)
        store.put(entry("b"))
        stats = store.stats()
        assert stats["entries"] == 2
        assert stats["last_updated_at"] == clock.now

    def test_store__close_keeps_pending_hits(self, make_store, clock):
        store = make_store(ttl_seconds=0, clock=clock)
        store.put(entry("k"))
        store.record_hit("k")
        store.close()
        reopened = make_store(ttl_seconds=0, clock=clock)
        assert reopened.get("k").hits == 1


    # -- the near-matching index (NearRecord, near_candidates) --------------------------------

    def test_near_candidates__newest_first_limited_and_only_live(self, make_store, clock):
        store = make_store(ttl_seconds=100, clock=clock)
        for number in range(5):
            store.put(entry(f"k{number}"), near=NearRecord("g1", b"print%d" % number))
            clock.advance(1)
        store.put(entry("other"), near=NearRecord("g2", b"x"))
        store.put(entry("short"), ttl_seconds=2, near=NearRecord("g1", b"short"))
        store.put(entry("plain"))  # stored without near matching: never a candidate

        assert store.near_candidates("g1", limit=3) == [("short", b"short"), ("k4", b"print4"),
                                                         ("k3", b"print3")]
        clock.advance(3)  # "short" expired
        assert [key for key, _ in store.near_candidates("g1")] == ["k4", "k3", "k2", "k1", "k0"]
        clock.advance(92.5)  # k0 (stored at +0) is past the 100 s TTL, k1 (+1) is not
        assert [key for key, _ in store.near_candidates("g1")] == ["k4", "k3", "k2", "k1"]
        assert store.near_candidates("absent") == []

    def test_near_candidates__record_replaced_on_store_and_gone_with_its_entry(self, store):
        store.put(entry("a"), near=NearRecord("g", b"old"))
        store.put(entry("a"), near=NearRecord("g", b"new"))
        store.put(entry("b"), near=NearRecord("g", b"b"))
        assert dict(store.near_candidates("g")) == {"a": b"new", "b": b"b"}
        store.put(entry("a"))  # re-stored without a record: the same request, the record stays
        assert dict(store.near_candidates("g"))["a"] == b"new"
        store.delete("a")
        assert store.near_candidates("g") == [("b", b"b")]
        store.clear()
        assert store.near_candidates("g") == []


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def make_store(self, tmp_path):
        stores = []

        def make(ttl_seconds=0, clock=None):
            store = SQLiteStore(str(tmp_path / "cache.sqlite3"), ttl_seconds, clock=clock or FakeClock(),
                                hit_flush_seconds=0)
            stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()


class TestRedisStore(StoreContract):
    @pytest.fixture
    def make_store(self, redis_server, redis_prefix):
        from stores.redis import RedisStore

        stores = []

        def make(ttl_seconds=0, clock=None):
            store = RedisStore(redis_server.url(), ttl_seconds, prefix=redis_prefix,
                               clock=clock or FakeClock(), hit_flush_seconds=0, maintenance_seconds=0)
            stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()


# --------------------------------------------------------------------------- SQLite specifics

ORIGINAL_DDL = """
CREATE TABLE IF NOT EXISTS completions (
    cache_key TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    model TEXT NOT NULL,
    request_json TEXT NOT NULL,
    response_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_hit_at REAL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_completions_model ON completions(model);
CREATE INDEX IF NOT EXISTS idx_completions_updated_at ON completions(updated_at);
"""


def create_original_database(path, rows: list[tuple]) -> None:
    """A database exactly as the original server left it: its table, WAL, no tables of ours."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(ORIGINAL_DDL)
    db.executemany("INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def test_sqlite_store__fresh_file_has_the_original_table_and_migrations(tmp_path):
    path = tmp_path / "c.sqlite3"
    store = SQLiteStore(str(path), hit_flush_seconds=0)
    store.stats()
    store.close()
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(completions)")]
    assert columns[:9] == ["cache_key", "mode", "model", "request_json", "response_json",
                           "created_at", "updated_at", "last_hit_at", "hits"]
    indexes = {row[1] for row in db.execute("PRAGMA index_list(completions)")}
    assert {"idx_completions_model", "idx_completions_updated_at"} <= indexes
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    applied = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == [version for version, _, _ in MIGRATIONS]
    db.close()


def test_sqlite_store__original_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "orig.sqlite3"
    create_original_database(path, [
        ("k1", "chat", "m", "{}", '{"id":"a","choices":[1]}', 100.0, 150.0, 160.0, 4),
        ("k2", "completion", "m", "{}", '{"id":"b","choices":[1]}', 200.0, 250.0, None, 0),
    ])
    store = SQLiteStore(str(path), ttl_seconds=0, hit_flush_seconds=0)
    stats = store.stats()
    assert (stats["entries"], stats["hits"], stats["last_updated_at"]) == (2, 4, 250.0)
    got = store.get("k1")
    assert (got.response_json, got.created_at, got.hits) == ('{"id":"a","choices":[1]}', 100.0, 4)
    store.close()


def test_sqlite_store__unopenable_path_raises_store_error(tmp_path):
    from cache_store import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("")
    # No background maintainer: it would go on failing (and logging) into later tests.
    store = SQLiteStore(str(blocker / "sub" / "c.sqlite3"), hit_flush_seconds=0, maintenance_seconds=0)
    try:
        with pytest.raises(StoreError):
            store.get("k")
    finally:
        store.close()


def _completions_writes(statements: list[str]) -> set[str]:
    """The distinct statements that wrote the completions table (the trace repeats a statement
    once for each statement its triggers run)."""
    return {sql for sql in statements
            if sql.lstrip().upper().startswith(("INSERT INTO COMPLETIONS", "UPDATE COMPLETIONS"))}


def _savings_entry(key: str, prompt_tokens: int) -> NewEntry:
    return NewEntry(key, "chat", "m", "{}", '{"id":"x","choices":[1]}', prompt_tokens=prompt_tokens,
                    completion_tokens=2 * prompt_tokens, cost_usd=0.5, upstream_seconds=1.25)


@pytest.mark.parametrize("case", ["new", "live", "expired"])
def test_sqlite_store__put_writes_the_row_once_with_its_savings(tmp_path, case):
    """One row write per store: a second UPDATE for the savings would rewrite a 400 KB row again."""
    clock = FakeClock()
    statements: list[str] = []
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), ttl_seconds=100, clock=clock, hit_flush_seconds=0,
                        on_write=lambda db: db.set_trace_callback(statements.append))
    if case != "new":
        store.put(_savings_entry("k", 1))
        clock.advance(101 if case == "expired" else 10)
    statements.clear()
    status = store.put(_savings_entry("k", 7))
    assert status == ("updated" if case == "live" else "stored")
    writes = _completions_writes(statements)
    assert len(writes) == 1, writes
    top = store.top_entries(1)[0]
    assert (top.prompt_tokens, top.completion_tokens, top.cost_usd, top.upstream_seconds) == (7, 14, 0.5, 1.25)
    store.close()


def test_sqlite_store__savings_count_per_hit_after_a_re_store(tmp_path):
    clock = FakeClock()
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), clock=clock, hit_flush_seconds=0)
    store.put(_savings_entry("k", 3))
    store.put(_savings_entry("k", 5))  # live: "updated", the latest answer's savings count
    store.record_hit("k")
    store.record_hit("k")
    stats = store.stats()
    assert stats["tokens_saved"]["prompt"] == 10 and stats["tokens_saved"]["completion"] == 20
    assert stats["entries"] == 1 and stats["hits_served"] == 2
    store.close()


def test_sqlite_store__threads_share_pooled_connections(tmp_path):
    """Opening a connection reads the whole schema: threads take turns on pooled ones instead."""
    writers: list[int] = []
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0, maintenance_seconds=0,
                        on_write=lambda db: writers.append(id(db)))
    for number in range(8):  # one after another, each in a thread of its own
        thread = threading.Thread(target=lambda n=number: (store.get(f"k{n}"), store.put(entry(f"k{n}"))))
        thread.start()
        thread.join()
    assert all(store.get(f"k{n}") is not None for n in range(8))
    assert len(set(writers)) == 1
    assert len(store._connections) == 1
    store.close()


def test_sqlite_store__concurrent_threads_read_and_write_safely(tmp_path):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0)
    barrier = threading.Barrier(16)
    results: dict[int, str] = {}

    def work(n: int) -> None:
        barrier.wait()
        results[n] = store.put(entry(f"k{n}"))
        assert store.get(f"k{n}").key == f"k{n}"

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: "stored" for n in range(16)}
    assert store.stats()["entries"] == 16
    store.close()


def test_sqlite_store__usable_again_after_close(tmp_path):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0)
    store.put(entry("a"))
    store.close()
    assert store.get("a") is not None
    assert store.put(entry("b")) == "stored"
    store.close()


def test_sqlite_store__a_forked_child_opens_connections_of_its_own(tmp_path):
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0, maintenance_seconds=0)
    store.put(entry("parent"))
    def child_has_its_own():
        inherited = set(map(id, store._pool))
        ok = store.get("parent") is not None and store.put(entry("child")) == "stored"
        return ok and not inherited & set(map(id, store._pool))

    assert holds_in_forked_child(child_has_its_own)
    assert store.get("child") is not None
    assert store.put(entry("parent")) == "updated"
    store.close()


def test_sqlite_store__a_flush_waits_for_the_one_in_progress(tmp_path):
    """Eviction flushes to rank entries by their last hit: it must not find the pending hits
    taken by the background flush and not yet written."""
    entered, release = threading.Event(), threading.Event()

    def hook(db):
        if threading.current_thread().name == "first-flush":
            entered.set()
            release.wait(5)

    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=0, maintenance_seconds=0,
                        on_write=hook)
    store.put(entry("k"))
    store.record_hit("k")
    first = threading.Thread(target=store.flush, name="first-flush")
    first.start()
    assert entered.wait(5)
    second = threading.Thread(target=store.flush)
    second.start()
    second.join(0.2)
    assert second.is_alive()
    release.set()
    first.join(5)
    second.join(5)
    assert store.get("k").hits == 1
    store.close()


def test_sqlite_store__many_stored_bytes_wake_the_background_checkpoint(tmp_path, monkeypatch):
    """Checkpoints run in the flusher, not in the COMMIT of whichever request crosses SQLite's
    threshold while every other store waits for the write lock."""
    import cache_store

    monkeypatch.setattr(cache_store, "CHECKPOINT_AFTER_BYTES", 10_000)
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=60, maintenance_seconds=0)
    checkpointed = threading.Event()
    checkpoint = store.checkpoint
    store.checkpoint = lambda: (checkpoint(), checkpointed.set())
    store.put(NewEntry("big", "chat", "m", "x" * 20_000, "{}"))
    assert checkpointed.wait(5)  # long before the 60 s flush period
    db = sqlite3.connect(tmp_path / "c.sqlite3")
    busy, frames, backfilled = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames == backfilled
    db.close()
    store.close()


def _queue_behind_a_held_write(store: SQLiteStore, entries: list[NewEntry], hold: threading.Event,
                               results: dict) -> list[threading.Thread]:
    """Start one store per entry while the first transaction is held inside its on_write hook."""
    def put(item: NewEntry) -> None:
        try:
            results[item.key] = store.put(item)
        except Exception as exc:  # the test looks at which store failed, and how
            results[item.key] = exc

    threads = [threading.Thread(target=put, args=(item,)) for item in entries]
    threads[0].start()
    assert hold.wait(5)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.3)  # the others queue behind the held write lock
    return threads


def _holding_hook(transactions: list, entered: threading.Event, release: threading.Event):
    def hook(db):
        transactions.append(db)
        if len(transactions) == 1:
            entered.set()
            release.wait(5)
    return hook


def _store_with_a_held_first_write(path, **options):
    """A store whose first write transaction waits inside its on_write hook until ``release``:
    the stores started meanwhile queue behind it. Returns (store, transactions, entered, release)."""
    transactions: list = []
    entered, release = threading.Event(), threading.Event()
    store = SQLiteStore(str(path), hit_flush_seconds=0, maintenance_seconds=0,
                        on_write=_holding_hook(transactions, entered, release), **options)
    return store, transactions, entered, release


def test_sqlite_store__stats_do_not_wait_behind_a_long_write_of_their_own_process(tmp_path):
    """/healthz and /cache/stats call stats(): a group-commit batch holding the write lock (a
    burst's stores, or a writer of another process ahead of it) must not hold them too. They
    answer with the counters written so far, and the ones they could not write are kept."""
    store, transactions, entered, release = _store_with_a_held_first_write(tmp_path / "c.sqlite3")
    store.record_request("MISS", "test/model-a")  # a counter waiting to be written
    results: dict = {}
    threads = _queue_behind_a_held_write(store, [entry("held")], entered, results)
    began = time.monotonic()
    figures = store.stats()
    waited = time.monotonic() - began
    release.set()
    threads[0].join(5)
    assert waited < 1.0  # it waited STATS_FLUSH_WAIT_MS (0.1 s), not for the held write (5 s)
    assert figures["entries"] == 0 and figures["misses"] == 0
    assert results == {"held": "stored"}
    after = store.stats()  # the counter it could not write is written now
    assert after["entries"] == 1 and after["misses"] == 1
    store.close()


def test_sqlite_store__stats_wait_once_in_all_not_once_per_lock(tmp_path, monkeypatch):
    """The flush lock (another flush in progress), the write lock and SQLite's busy wait share
    the one STATS_FLUSH_WAIT_MS: stats never wait that long two or three times over."""
    monkeypatch.setattr(cache_store, "STATS_FLUSH_WAIT_MS", 400)
    store, transactions, entered, release = _store_with_a_held_first_write(tmp_path / "c.sqlite3")
    store.record_request("MISS", "test/model-a")
    results: dict = {}
    threads = _queue_behind_a_held_write(store, [entry("held")], entered, results)
    flushing = threading.Thread(target=_hold_for, args=(store._flush_lock, 0.3))
    flushing.start()
    time.sleep(0.05)  # the other "flush" has the flush lock
    began = time.monotonic()
    store.stats()
    waited = time.monotonic() - began
    release.set()
    threads[0].join(5)
    flushing.join(5)
    assert waited < 0.6  # 0.4 s in all, not 0.25 s for the flush lock and then 0.4 s more
    assert store.stats()["misses"] == 1
    store.close()


def _hold_for(lock: threading.Lock, seconds: float) -> None:
    with lock:
        time.sleep(seconds)


def test_sqlite_store__concurrent_stores_share_one_transaction(tmp_path):
    store, transactions, entered, release = _store_with_a_held_first_write(tmp_path / "c.sqlite3")
    results: dict = {}
    threads = _queue_behind_a_held_write(store, [entry(f"k{n}") for n in range(10)], entered, results)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(transactions) == 2  # the first store alone, then the nine queued behind it
    assert results == {f"k{n}": "stored" for n in range(10)}
    assert store.stats()["entries"] == 10
    store.close()


def test_sqlite_store__a_failing_store_in_a_batch_fails_alone(tmp_path):
    store, transactions, entered, release = _store_with_a_held_first_write(tmp_path / "c.sqlite3")
    results: dict = {}
    bad = NewEntry("bad", "chat", {"not": "bindable"}, "{}", "{}")  # type: ignore[arg-type]
    threads = _queue_behind_a_held_write(store, [entry("first"), entry("a"), bad, entry("b")], entered, results)
    release.set()
    for thread in threads:
        thread.join(5)
    assert (results["first"], results["a"], results["b"]) == ("stored", "stored", "stored")
    assert isinstance(results["bad"], StoreError)
    assert store.get("bad") is None and store.stats()["entries"] == 3
    store.close()


def test_sqlite_store__a_batch_holds_at_most_max_batch_bytes_and_the_wal_shrinks_back(tmp_path):
    path = tmp_path / "c.sqlite3"
    store, transactions, entered, release = _store_with_a_held_first_write(path)
    screenshot = "A" * (MAX_BATCH_BYTES * 3 // 8)  # three of them pass the cap, two do not
    big = [NewEntry(f"big{n}", "chat", "test/model-a", json.dumps({"shot": screenshot}), "{}")
           for n in range(10)]
    results: dict = {}
    threads = _queue_behind_a_held_write(store, big, entered, results)
    release.set()
    for thread in threads:
        thread.join(10)

    assert results == {f"big{n}": "stored" for n in range(10)}
    assert len(transactions) == 6  # the held one alone, then the nine queued two by two
    store.flush()  # checkpoints the WAL
    store.put(entry("after"))
    assert os.path.getsize(str(path) + "-wal") <= WAL_SIZE_LIMIT_BYTES
    store.close()


def test_sqlite_store__a_batch_that_meets_another_writer_fails_once_for_all(tmp_path):
    path = tmp_path / "c.sqlite3"
    store, transactions, entered, release = _store_with_a_held_first_write(path, busy_timeout_ms=200)
    store.put(entry("before"))
    transactions.clear()
    other = sqlite3.connect(str(path), isolation_level=None)
    results: dict = {}
    threads = _queue_behind_a_held_write(store, [entry(f"k{n}") for n in range(6)], entered, results)
    other.execute("BEGIN IMMEDIATE")  # another process's long write
    started = time.monotonic()
    release.set()
    for thread in threads:
        thread.join(10)
    waited = time.monotonic() - started
    other.execute("ROLLBACK")
    other.close()

    assert all(isinstance(result, StoreError) and "locked" in str(result) for result in results.values())
    assert len(results) == 6
    # The held store waits busy_timeout once and the batch of five once more; one at a time
    # the five would each have waited it again (1.2 s in all).
    assert waited < 0.8
    assert store.put(entry("k0")) == "stored"  # caching resumes once the other writer is done
    store.close()


@pytest.mark.parametrize("period", [1e10, float("inf")])
def test_sqlite_store__a_very_long_flush_period_still_checkpoints_after_many_stores(tmp_path, period):
    def running_flushers() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name == "cache-hit-flusher"}

    # Only this store's flusher: another test's closed store may still have one winding down.
    before = running_flushers()
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), hit_flush_seconds=period, maintenance_seconds=0)
    store.put(entry("first"))
    flushers = running_flushers() - before
    screenshot = "A" * (1 << 20)
    for n in range(6):  # past CHECKPOINT_AFTER_BYTES: the flusher is woken to checkpoint
        store.put(NewEntry(f"big{n}", "chat", "test/model-a", json.dumps({"shot": screenshot}), "{}"))
    deadline = time.monotonic() + 5
    while store._bytes_since_checkpoint > CHECKPOINT_AFTER_BYTES and time.monotonic() < deadline:
        time.sleep(0.02)

    assert len(flushers) == 1 and all(thread.is_alive() for thread in flushers)
    assert store._bytes_since_checkpoint <= CHECKPOINT_AFTER_BYTES  # 6 MB written: it ran
    store.close()


def test_sqlite_store__a_batch_gives_each_store_what_it_would_get_alone(tmp_path):
    """New, live and expired keys, and one key twice, in one transaction: outcomes, rows and
    running totals as if each store had been written on its own, in queue order."""
    clock = FakeClock()
    transactions: list = []
    entered, release = threading.Event(), threading.Event()
    store = SQLiteStore(str(tmp_path / "c.sqlite3"), ttl_seconds=100, clock=clock, hit_flush_seconds=0,
                        maintenance_seconds=0)
    store.put(entry("expired"))
    clock.advance(60)
    store.put(entry("live"))
    clock.advance(45)  # TTL 100: "live" is 45 s old, "expired" 105 s old
    store.on_write = _holding_hook(transactions, entered, release)
    batch = [entry("first"), entry("new", {"id": "one", "choices": [1]}), entry("live"), entry("expired"),
             entry("new", {"id": "two", "choices": [1]})]
    outcomes: dict[int, str] = {}

    def put(position: int) -> None:
        outcomes[position] = store.put(batch[position])

    threads = [threading.Thread(target=put, args=(position,)) for position in range(len(batch))]
    threads[0].start()
    assert entered.wait(5)
    for thread in threads[1:]:
        thread.start()
        time.sleep(0.05)  # queue in this order
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(transactions) == 2
    assert outcomes == {0: "stored", 1: "stored", 2: "updated", 3: "stored", 4: "updated"}
    assert json.loads(store.get("new").response_json)["id"] == "two"
    assert store.get("expired").created_at == clock.now
    stats = store.stats()
    db = sqlite3.connect(tmp_path / "c.sqlite3")
    (count, size), = db.execute("SELECT count(*), sum(length(CAST(request_json AS BLOB)) "
                                "+ length(CAST(response_json AS BLOB))) FROM completions")
    db.close()
    assert (stats["entries"], stats["stored_bytes"]) == (count, size) == (4, size)
    store.close()
