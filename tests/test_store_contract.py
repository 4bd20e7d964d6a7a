"""The store contract beyond get/put (test_cache_store.py): per-entry TTL, max-age, namespaces,
listing, export/import (across backends too), savings and request counts, LRU bounds, purging,
near matching and the partition secret. Every test runs against SQLite and Redis alike.
"""

from __future__ import annotations

import json
import threading

import pytest

from cache_store import NearRecord, NewEntry, SQLiteStore
from helpers import FakeClock
from stores.redis import RedisStore

BACKENDS = ["sqlite", "redis"]
# Near matching on SQLite is issue 11's (branch issue-11); once merged, "sqlite" joins here.
NEAR_BACKENDS = ["sqlite", "redis"]


def entry(key: str, *, model: str = "test/model-a", response: dict | None = None, prompt: str = "hi",
          **figures) -> NewEntry:
    request = json.dumps({"mode": "chat", "model": model,
                          "messages": [{"role": "user", "content": prompt}], "cache_key": key})
    return NewEntry(key, "chat", model, request, json.dumps(response or {"id": f"r-{key}", "choices": [1]}),
                    **figures)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def open_store(request, tmp_path, redis_prefix, clock):
    """open_store(backend, name="main", **options): a store of that backend; the same name is the
    same data (a second process, a second instance)."""
    made = []

    def open_(backend: str, name: str = "main", **options):
        options = {"clock": clock, "hit_flush_seconds": 0, "maintenance_seconds": 0, **options}
        if backend == "sqlite":
            store = SQLiteStore(str(tmp_path / f"{name}.sqlite3"), **options)
        else:
            server = request.getfixturevalue("redis_server")
            store = RedisStore(server.url(), prefix=f"{redis_prefix}{name}:", **options)
        made.append(store)
        return store

    yield open_
    for store in made:
        store.close()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_store(open_store, backend):
    return lambda **options: open_store(backend, **options)


@pytest.fixture
def store(make_store):
    return make_store()


# -- lifetimes -------------------------------------------------------------------------------------


def test_store__own_ttl_wins_over_the_servers(make_store, clock):
    store = make_store(ttl_seconds=100)
    store.put(entry("short"), ttl_seconds=10)
    store.put(entry("forever"), ttl_seconds=0)
    store.put(entry("server"))
    clock.advance(10)
    assert store.get("short") is not None
    clock.advance(1)
    assert store.get("short") is None
    clock.advance(1000)
    assert store.get("forever") is not None and store.get("server") is None
    assert store.entry("forever")["expires_at"] is None
    assert store.entry("short")["expired"] is True


def test_store__max_age_refuses_old_answers_until_re_stored(store, clock):
    store.put(entry("k"))
    clock.advance(6)
    assert store.get("k", max_age=10) is not None
    assert store.get("k", max_age=5) is None
    store.put(entry("k"))
    assert store.get("k", max_age=5) is not None


def test_store__re_storing_an_expired_entry_starts_it_over(make_store, clock):
    store = make_store(ttl_seconds=100)
    store.put(entry("k"))
    store.record_hit("k")
    store.flush()
    assert store.stats()["hits"] == 1
    clock.advance(101)
    assert store.put(entry("k")) == "stored"
    got = store.get("k")
    assert (got.hits, got.created_at) == (0, clock.now)
    assert store.stats()["hits"] == 0 and store.stats()["hits_served"] == 1


# -- listing -----------------------------------------------------------------------------------------


def test_store__entries_newest_first_in_pages(store, clock):
    for number in range(7):
        store.put(entry(f"k{number}"))
        clock.advance(1)
    store.put(entry("k2"))  # stored again: now the newest
    first = store.list_entries(limit=3)
    assert [item["key"] for item in first] == ["k2", "k6", "k5"]
    after = (first[-1]["updated_at"], first[-1]["key"])
    second = store.list_entries(limit=10, after=after)
    assert [item["key"] for item in second] == ["k4", "k3", "k1", "k0"]


def test_store__entries_with_the_same_time_page_by_key(store):
    for key in ("a", "c", "b", "d"):
        store.put(entry(key))  # the clock does not move: one updated_at for all
    first = store.list_entries(limit=2)
    assert [item["key"] for item in first] == ["d", "c"]
    rest = store.list_entries(limit=5, after=(first[-1]["updated_at"], first[-1]["key"]))
    assert [item["key"] for item in rest] == ["b", "a"]


def test_store__entries_filtered_by_model_and_namespace(store, clock):
    store.put(entry("a", model="m-1"))
    store.put(entry("b", model="m-2"), namespace="run-1")
    store.put(entry("c", model="m-1"), namespace="run-1")
    clock.advance(1)
    assert [item["key"] for item in store.list_entries(model="m-1")] == ["c", "a"]
    assert [item["key"] for item in store.list_entries(namespace="run-1")] == ["c", "b"]
    assert [item["key"] for item in store.list_entries(namespace=None)] == ["a"]
    assert [item["key"] for item in store.list_entries(model="m-1", namespace="run-1")] == ["c"]
    assert store.list_entries(model="m-3") == []


def test_store__entry_summary_and_texts(store, clock):
    store.put(entry("k", prompt="Open the settings page"), namespace="run-1")
    store.record_hit("k")
    clock.advance(2)
    item = store.entry("k")
    assert item["namespace"] == "run-1" and item["hits"] == 1 and item["last_hit_at"] == clock.now - 2
    assert json.loads(item["request_json"])["cache_key"] == "k"
    assert json.loads(item["response_json"])["id"] == "r-k"
    assert item["size"] == len(item["request_json"].encode()) + len(item["response_json"].encode())
    listed = store.list_entries()[0]
    assert listed["prompt"].startswith("Open the settings page")
    assert {name: listed[name] for name in item if name in listed} == \
        {name: item[name] for name in item if name in listed}
    assert store.entry("absent") is None


def test_store__delete_and_clear_leave_no_trace(store):
    store.put(entry("a"), namespace="n")
    store.put(entry("b"))
    store.record_hit("a")
    store.flush()
    assert store.delete("a") is True
    assert store.list_entries(namespace="n") == [] and store.get("a") is None
    assert store.stats()["entries"] == 1 and store.entry_count() == 1
    assert store.clear() == 1
    stats = store.stats()
    assert (stats["entries"], stats["hits"], stats["stored_bytes"]) == (0, 0, 0)
    assert store.list_entries() == [] and store.top_entries() == []
    assert stats["hits_served"] == 1  # savings already made are not taken back


# -- counting ----------------------------------------------------------------------------------------


def test_store__hits_count_savings_per_model(store, clock):
    store.put(entry("a", model="m-1", prompt_tokens=3, completion_tokens=5, cost_usd=0.25,
                    upstream_seconds=1.5))
    store.put(entry("b", model="m-2", prompt_tokens=7))
    for key in ("a", "a", "b"):
        store.record_hit(key)
    store.record_request("MISS", "m-1")
    store.record_request("BYPASS", "m-2")
    store.record_request("HIT", "m-1", coalesced=True)
    stats = store.stats()
    assert (stats["hits_served"], stats["misses"], stats["bypasses"], stats["coalesced"]) == (3, 1, 1, 1)
    assert stats["tokens_saved"] == {"prompt": 13, "completion": 10, "total": 23}
    assert stats["cost_saved_usd"] == 0.5 and stats["time_saved_seconds"] == 3.0
    assert stats["hit_rate"] == 0.75
    one = stats["by_model"]["m-1"]
    assert (one["hits"], one["misses"], one["coalesced"], one["hit_rate"]) == (2, 1, 1, 0.6667)
    assert stats["by_model"]["m-2"]["bypasses"] == 1
    assert stats["stored_bytes"] > 0 and stats["since"] is not None


def test_store__hits_count_savings_per_api_and_unpriced_apart(store):
    """Per API (the entry's mode): requests as counted, hits and savings as they flush; hits on
    an entry the price table could not price are counted apart, in all and per API."""
    store.put(entry("chat", prompt_tokens=3, completion_tokens=5, cost_usd=0.25, upstream_seconds=1.5))
    store.put(NewEntry("msg", "messages", "claude-x", '{"cache_key": "msg"}', "{}", prompt_tokens=10,
                       completion_tokens=2, unpriced=True))
    for key in ("chat", "msg", "msg"):
        store.record_hit(key)
    store.record_request("MISS", "test/model-a", api="chat")
    store.record_request("HIT", "test/model-a", api="chat", coalesced=True)
    store.record_request("MISS", "claude-x", api="messages")
    store.record_request("HIT", "claude-x", api="messages", near=True)
    store.record_request("HIT", "claude-x", api="messages")
    store.record_request("BYPASS", "text-embedding-3-small", api="embeddings")
    stats = store.stats()
    by_api = stats["by_api"]
    assert sorted(by_api) == ["chat", "embeddings", "messages"]
    assert {api: (f["hits"], f["misses"], f["bypasses"], f["coalesced"]) for api, f in by_api.items()} == {
        "chat": (1, 1, 0, 1), "messages": (2, 1, 0, 0), "embeddings": (0, 0, 1, 0)}
    assert by_api["chat"]["cost_saved_usd"] == 0.25 and by_api["chat"]["time_saved_seconds"] == 1.5
    assert by_api["chat"]["unpriced_hits"] == 0 and by_api["chat"]["hit_rate"] == 0.5
    assert by_api["messages"]["tokens_saved"] == {"prompt": 20, "completion": 4, "total": 24}
    assert (by_api["messages"]["cost_saved_usd"], by_api["messages"]["unpriced_hits"]) == (0, 2)
    assert by_api["embeddings"]["hit_rate"] is None
    assert stats["unpriced_hits"] == 2 and stats["near_hits"] == 1
    assert stats["by_model"]["claude-x"]["near_hits"] == 1


def test_store__unpriced_follows_the_latest_store(store, clock):
    store.put(NewEntry("k", "responses", "m", '{"cache_key": "k"}', "{}", prompt_tokens=1, unpriced=True))
    store.record_hit("k")
    store.flush()
    store.put(NewEntry("k", "responses", "m", '{"cache_key": "k"}', "{}", prompt_tokens=1, cost_usd=0.5))
    store.record_hit("k")
    responses = store.stats()["by_api"]["responses"]
    assert (responses["hits"], responses["unpriced_hits"], responses["cost_saved_usd"]) == (2, 1, 0.5)


def test_store__imported_entries_count_their_hits_by_api(open_store, backend):
    origin = open_store(backend, "origin")
    origin.put(NewEntry("r", "responses", "m", '{"cache_key": "r"}', "{}", prompt_tokens=4, unpriced=True))
    copy = open_store(backend, "copy")
    assert copy.insert_new(list(origin.export_rows())) == 1
    copy.record_hit("r")
    # What one hit saved does not travel with an export (on either backend): $0, not unpriced.
    assert copy.stats()["by_api"]["responses"] == {
        "hits": 1, "misses": 0, "bypasses": 0, "coalesced": 0, "hit_rate": 1.0,
        "tokens_saved": {"prompt": 0, "completion": 0, "total": 0}, "cost_saved_usd": 0,
        "time_saved_seconds": 0, "unpriced_hits": 0}


def shape(value):
    """The keys of a stats object, nested, with the type of each value (numbers as one type)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def drive_every_counter(store, clock) -> None:
    """Something in every figure the stats have: entries of two APIs, exact, near, coalesced and
    unpriced hits, a miss and a bypass."""
    store.put(entry("a", prompt_tokens=3, completion_tokens=5, cost_usd=0.25, upstream_seconds=1.5))
    store.put(NewEntry("b", "messages", "claude-x", '{"cache_key": "b"}', "{}", prompt_tokens=7,
                       unpriced=True), near=NearRecord("g", b"\x01"))
    clock.advance(1)
    for key in ("a", "b", "b"):
        store.record_hit(key)
    store.record_request("MISS", "test/model-a", api="chat", route="/v1/chat/completions", key="a", seconds=0.5)
    store.record_request("HIT", "test/model-a", api="chat", key="a", coalesced=True)
    store.record_request("HIT", "claude-x", api="messages", key="b", near=True)
    store.record_request("HIT", "claude-x", api="messages", key="b")
    store.record_request("BYPASS", "claude-x", api="messages")


def test_store__stats_have_the_same_fields_and_figures_on_every_backend(open_store, clock):
    """Key by key, nested: a field one backend gains must be added to the other."""
    stats = {}
    for backend in BACKENDS:
        store = open_store(backend, f"shape-{backend}", ttl_seconds=100)
        drive_every_counter(store, clock)
        stats[backend] = store.stats()
    sqlite, redis_ = stats["sqlite"], stats["redis"]
    assert shape(sqlite) == shape(redis_)
    # Where they live and how big that is differ by nature; every counted figure is the same.
    where = ("db_path", "db_bytes", "since", "last_updated_at")
    assert {key: value for key, value in sqlite.items() if key not in where} == \
        {key: value for key, value in redis_.items() if key not in where}
    assert sqlite["by_api"]["messages"]["unpriced_hits"] == 2 and sqlite["near_hits"] == 1


def test_store__activity_and_entries_have_the_same_fields_on_every_backend(open_store, clock):
    views = {}
    for backend in BACKENDS:
        store = open_store(backend, f"views-{backend}", ttl_seconds=100)
        drive_every_counter(store, clock)
        activity = store.activity(since=clock.now - 60)
        views[backend] = {
            "activity": {**activity, "recent": activity["recent"][:1], "timeline": activity["timeline"][:1]},
            "listed": store.list_entries()[0], "entry": store.entry("a"),
            "top": store.top_entries(1)[0].__dict__, "export": next(iter(store.export_rows())),
        }
    assert shape(views["sqlite"]) == shape(views["redis"])


def test_store__top_entries_by_hits(store):
    store.put(entry("a", prompt_tokens=4))
    store.put(entry("b"))
    store.put(entry("c"))
    for key in ("b", "b", "a"):
        store.record_hit(key)
    top = store.top_entries(2)
    assert [(item.key, item.hits) for item in top] == [("b", 2), ("a", 1)]
    assert top[1].prompt_tokens == 4 and top[1].size_bytes > 0


def test_store__activity_buckets_and_recent_requests(store, clock):
    store.record_request("MISS", "m", route="/v1/chat/completions", key="k", seconds=0.5)
    clock.advance(10)
    store.record_request("HIT", "m", route="/v1/chat/completions", key="k", seconds=0.001)
    store.record_request("HIT", "m", route="/v1/chat/completions", key="k", seconds=0.001, coalesced=True)
    activity = store.activity(since=clock.now - 60)
    assert [(row["MISS"], row["HIT"]) for row in activity["timeline"]] == [(1, 0), (0, 2)]
    assert [item["status"] for item in activity["recent"]] == ["HIT", "HIT", "MISS"]
    assert activity["recent"][0]["coalesced"] is True and activity["recent"][2]["seconds"] == 0.5


def test_store__hits_of_two_processes_add_up(open_store, backend):
    first, second = open_store(backend), open_store(backend)
    first.put(entry("k"))
    first.record_hit("k")
    second.record_hit("k")
    second.record_hit("k")
    first.flush()
    assert second.stats()["hits_served"] == 3  # its own flushed by stats, the other's already written
    assert first.get("k").hits == 3


# -- bounds and purging ------------------------------------------------------------------------------


def test_store__eviction_takes_the_least_recently_used(make_store, clock):
    store = make_store(max_entries=3)
    for key in ("A", "B", "C"):
        store.put(entry(key))
        clock.advance(1)
    store.record_hit("A")
    store.flush()
    clock.advance(1)
    store.put(entry("D"))  # one over the bound (evicted in the background, or here)
    store.evict()
    assert store.get("B") is None
    assert all(store.get(key) is not None for key in ("A", "C", "D"))
    assert store.stats()["entries"] == 3


def test_store__eviction_by_bytes(make_store, clock):
    big = "x" * 1000
    store = make_store(max_bytes=2500)
    for key in ("A", "B", "C"):
        store.put(NewEntry(key, "chat", "m", json.dumps({"cache_key": key, "p": big}), "{}"))
        clock.advance(1)
    store.maintain()  # or the background maintainer, woken by the stores, was first
    assert store.get("A") is None and store.get("C") is not None
    assert store.stats()["entries"] == 2 and store.stats()["stored_bytes"] <= 2500


def test_store__purge_removes_expired_entries_only(make_store, clock):
    store = make_store(ttl_seconds=100)
    store.put(entry("server-ttl"))
    store.put(entry("own-ttl"), ttl_seconds=10)
    store.put(entry("never"), ttl_seconds=0)
    clock.advance(50)
    store.put(entry("young"))
    assert store.purge_expired() == 1  # own-ttl
    clock.advance(60)
    assert store.purge_expired() == 1  # server-ttl, 110 s old
    assert sorted(item["key"] for item in store.list_entries()) == ["never", "young"]
    assert store.stats()["entries"] == 2


# -- moving entries between stores -------------------------------------------------------------------


@pytest.mark.parametrize("source, target", [("sqlite", "redis"), ("redis", "sqlite"), ("redis", "redis")])
def test_store__export_then_import_keeps_every_entry(open_store, clock, source, target):
    origin = open_store(source, "origin")
    origin.put(entry("a"), namespace="run-1")
    origin.put(entry("b"), ttl_seconds=60)
    clock.advance(5)
    origin.put(entry("c", prompt="東京 ✓"))
    rows = list(origin.export_rows())
    destination = open_store(target, "destination")
    destination.put(entry("c", response={"id": "already here", "choices": [1]}))
    assert destination.insert_new(rows) == 2
    assert destination.insert_new(rows) == 0
    moved = {row["key"]: row for row in destination.export_rows()}
    for row in rows:
        if row["key"] != "c":
            assert moved[row["key"]] == row
    assert json.loads(destination.get("c").response_json)["id"] == "already here"
    assert destination.get("b") is not None
    clock.advance(60)
    assert destination.get("b") is None  # its own deadline came along


# -- near matching (issue 11's index) ----------------------------------------------------------------


@pytest.fixture(params=NEAR_BACKENDS)
def near_store(request, open_store):
    return open_store(request.param, ttl_seconds=100)


def test_store__near_candidates_newest_first_and_bounded(near_store, clock):
    for number in range(5):
        near_store.put(entry(f"k{number}"), near=NearRecord("g1", bytes([number])))
        clock.advance(1)
    near_store.put(entry("other"), near=NearRecord("g2", b"\xff"))
    near_store.put(entry("plain"))
    assert near_store.near_candidates("g1", limit=3) == [("k4", b"\x04"), ("k3", b"\x03"), ("k2", b"\x02")]
    assert near_store.near_candidates("g2") == [("other", b"\xff")]
    assert near_store.near_candidates("nothing") == []


def test_store__near_record_follows_its_entry(near_store, clock):
    near_store.put(entry("a"), near=NearRecord("g", b"old"))
    near_store.put(entry("b"), near=NearRecord("g", b"b"))
    clock.advance(1)
    near_store.put(entry("a"), near=NearRecord("g", b"new"))  # replaced, and now the newest
    assert near_store.near_candidates("g") == [("a", b"new"), ("b", b"b")]
    near_store.put(entry("a"), near=NearRecord("h", b"moved"))
    assert near_store.near_candidates("g") == [("b", b"b")]
    # Stored again without a record (an exact-mode store): the key covers the images, so the
    # request is the same and its record, still true, stays.
    near_store.put(entry("a"))
    assert near_store.near_candidates("h") == [("a", b"moved")]
    near_store.delete("b")
    near_store.delete("a")
    assert near_store.near_candidates("g") == near_store.near_candidates("h") == []


def test_store__near_candidates_are_live_entries_only(near_store, clock):
    near_store.put(entry("short"), ttl_seconds=5, near=NearRecord("g", b"s"))
    near_store.put(entry("long"), near=NearRecord("g", b"l"))
    clock.advance(6)
    assert near_store.near_candidates("g") == [("long", b"l")]
    near_store.purge_expired()
    near_store.clear()
    assert near_store.near_candidates("g") == []


def test_store__export_and_import_carry_the_near_record(near_store, open_store):
    near_store.put(entry("k"), near=NearRecord("g", b"\x00\x01\xfe"))
    rows = list(near_store.export_rows())
    assert rows[0]["near_group"] == "g" and rows[0]["near_fingerprints"] == "AAH+"
    other = open_store("redis", "copy")
    assert other.insert_new(rows) == 1
    assert other.near_candidates("g") == [("k", b"\x00\x01\xfe")]


# -- the partition secret ----------------------------------------------------------------------------


def test_redis_store__one_partition_secret_for_every_instance(open_store):
    stores = [open_store("redis") for _ in range(8)]
    secrets: list[bytes] = []
    barrier = threading.Barrier(len(stores))

    def read(store) -> None:
        barrier.wait()
        secrets.append(store.partition_secret())

    threads = [threading.Thread(target=read, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(secrets) == 8 and len(set(secrets)) == 1 and len(secrets[0]) == 64
    assert open_store("redis", "elsewhere").partition_secret() != secrets[0]
    assert open_store("sqlite").partition_secret() is None  # SQLite: a file beside the database


def test_redis_store__a_hit_is_one_command(own_redis):
    """The lookup is one HMGET; the hit itself is counted in memory, written later in a batch."""
    import redis

    server = own_redis()
    store = RedisStore(server.url(), hit_flush_seconds=0, maintenance_seconds=0)
    probe = redis.Redis.from_url(server.url())

    def commands() -> int:
        return probe.info("stats")["total_commands_processed"]

    store.put(entry("k"))
    store.get("k")  # the lookup pool's connection is open from now on
    first = commands()
    info_itself = commands() - first
    before = commands()
    assert store.get("k") is not None
    store.record_hit("k")
    assert commands() - before - info_itself == 1
    store.flush()
    assert store.get("k").hits == 1
    store.close()


def test_redis_store__an_entry_redis_dropped_is_a_miss_and_is_tidied_up(open_store, clock):
    """maxmemory-policy volatile-lru may drop an entry's hash, never its bookkeeping."""
    store = open_store("redis", ttl_seconds=100)
    store.put(entry("dropped"))
    store.put(entry("kept"))
    store.client.delete(store.key("e:dropped"))  # what Redis's eviction does
    assert store.get("dropped") is None
    assert [item["key"] for item in store.list_entries()] == ["kept"]
    assert store.put(entry("dropped")) == "stored"
    assert store.stats()["entries"] == 2
    store.client.delete(store.key("e:dropped"))
    clock.advance(101)
    assert store.purge_expired() == 2  # its bookkeeping goes with its expiry
    stats = store.stats()
    assert (stats["entries"], stats["stored_bytes"]) == (0, 0)


def test_redis_store__a_full_redis_refuses_the_store_not_the_request(start_proxy, own_redis, http):
    import redis

    server = own_redis()
    admin = redis.Redis.from_url(server.url())
    proxy = start_proxy(cache_url=server.url())
    assert http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "before it filled"}]}).headers["X-Computer-Use-Cache"] == "MISS"
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", max(1, admin.info("memory")["used_memory"] - 1024))

    reply = http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "x" * 20000}]})

    assert reply.status_code == 200 and reply.headers["X-Computer-Use-Cache"] == "MISS"
    assert reply.headers["X-Computer-Use-Cache-Store"].startswith("skipped: cache write failed: Redis: ")
    assert "maxmemory" in reply.headers["X-Computer-Use-Cache-Store"]
    assert http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "before it filled"}]}).headers["X-Computer-Use-Cache"] == "HIT"
