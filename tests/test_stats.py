"""/cache/stats: request counts and savings, exact, cheap and persistent across restarts."""

from __future__ import annotations

import os
import sqlite3
import threading

import openai
import pytest

from cache_store import NewEntry, SQLiteStore
from fake_upstream import chat_completion, chunks_from_completion, json_reply, sse_reply
from helpers import chat_body

USAGE_A = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "cost": 0.0015}
USAGE_B = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25, "cost": 0.002}
USAGE_C = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}  # no cost reported


def sdk(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-client", max_retries=0)


def ask(client, content, model="test/model-a", stream=False, **extra):
    if not stream:
        return client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], **extra)
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], stream=True, **extra)
    return list(chunks)


def drive_traffic(proxy, fake_upstream, http) -> None:
    """3 misses (one streamed, one coalesced burst leader), 7 hits, 2 bypasses, 3 coalesced."""
    client = sdk(proxy)
    fake_upstream.enqueue(json_reply(chat_completion("A", id="a", usage=USAGE_A)))
    ask(client, "question A")                                # MISS (stored)
    ask(client, "question A")                                # HIT
    ask(client, "question A")                                # HIT
    completion_b = chat_completion("B", id="b", model="test/model-b", usage=USAGE_B)
    fake_upstream.enqueue(sse_reply(chunks_from_completion(completion_b, include_usage=True)))
    ask(client, "question B", model="test/model-b", stream=True)   # streamed MISS (stored)
    ask(client, "question B", model="test/model-b", stream=True)   # streamed HIT
    ask(client, "question B", model="test/model-b")                # plain HIT
    bypassed = http.post(proxy.url + "/v1/chat/completions", json=chat_body("question A"),
                         headers={"X-Cache-Bypass": "1"})          # BYPASS
    assert bypassed.headers["X-Computer-Use-Cache"] == "BYPASS"
    ask(client, "question D", extra_body={"cache": False})         # BYPASS
    fake_upstream.enqueue(json_reply(chat_completion("C", id="c", usage=USAGE_C), delay=0.6))
    barrier = threading.Barrier(4)
    statuses = []

    def burst() -> None:
        barrier.wait()
        raw = ask(sdk(proxy), "question C")
        statuses.append((raw.headers["X-Computer-Use-Cache"],
                         raw.headers.get("X-Computer-Use-Cache-Coalesced")))

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [("HIT", "true")] * 3 + [("MISS", None)]
    assert len(fake_upstream.calls()) == 5


def expected_time_saved(db_path: str) -> tuple[float, dict[str, float]]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT model, upstream_seconds, hits FROM completions").fetchall()
    per_model: dict[str, float] = {}
    for model, seconds, hits in rows:
        per_model[model] = per_model.get(model, 0.0) + seconds * hits
    return sum(per_model.values()), per_model


def test_stats__every_figure_exact_and_kept_over_restart(start_proxy, fake_upstream, http, tmp_path):
    proxy = start_proxy()
    drive_traffic(proxy, fake_upstream, http)
    stats = http.get(proxy.url + "/cache/stats").json()

    assert stats["entries"] == 3
    assert stats["hits"] == 7 and stats["hits_served"] == 7
    assert stats["misses"] == 3
    assert stats["bypasses"] == 2
    assert stats["coalesced"] == 3
    assert stats["hit_rate"] == 0.7
    assert stats["tokens_saved"] == {"prompt": 2 * 11 + 2 * 20 + 3 * 3,
                                     "completion": 2 * 7 + 2 * 5 + 3 * 2,
                                     "total": 2 * 18 + 2 * 25 + 3 * 5}
    assert stats["cost_saved_usd"] == pytest.approx(2 * 0.0015 + 2 * 0.002)
    time_saved, per_model_time = expected_time_saved(stats["db_path"])
    assert stats["time_saved_seconds"] == round(time_saved, 3)
    assert time_saved >= 3 * 0.6  # the coalesced answer took 0.6 s upstream and was hit 3 times
    with sqlite3.connect(stats["db_path"]) as db:
        (stored_bytes,) = db.execute(
            "SELECT sum(length(CAST(request_json AS BLOB)) + length(CAST(response_json AS BLOB))) "
            "FROM completions").fetchone()
    assert stats["stored_bytes"] == stored_bytes
    path = stats["db_path"]
    assert stats["db_bytes"] == os.path.getsize(path) + os.path.getsize(path + "-wal")
    assert stats["by_model"] == {
        "test/model-a": {"hits": 5, "misses": 2, "bypasses": 2, "coalesced": 3, "near_hits": 0,
                         "hit_rate": round(5 / 7, 4),
                         "tokens_saved": {"prompt": 2 * 11 + 3 * 3, "completion": 2 * 7 + 3 * 2,
                                          "total": 2 * 18 + 3 * 5},
                         "cost_saved_usd": pytest.approx(0.003),
                         "time_saved_seconds": round(per_model_time["test/model-a"], 3)},
        "test/model-b": {"hits": 2, "misses": 1, "bypasses": 0, "coalesced": 0, "near_hits": 0,
                         "hit_rate": round(2 / 3, 4),
                         "tokens_saved": {"prompt": 40, "completion": 10, "total": 50},
                         "cost_saved_usd": pytest.approx(0.004),
                         "time_saved_seconds": round(per_model_time["test/model-b"], 3)},
    }
    for original in ("last_updated_at", "db_path", "ttl_seconds"):
        assert original in stats
    assert isinstance(stats["since"], float)

    proxy.stop()
    again = start_proxy()
    restarted = http.get(again.url + "/cache/stats").json()
    for field in ("entries", "hits", "hits_served", "misses", "bypasses", "coalesced", "hit_rate",
                  "tokens_saved", "cost_saved_usd", "time_saved_seconds", "stored_bytes", "by_model",
                  "since"):
        assert restarted[field] == stats[field], field


def test_stats__a_hit_waits_for_no_write(settings, tmp_path):
    """Counting stays off the hit path: nothing reaches the database until the batch flush."""
    store = SQLiteStore(str(tmp_path / "batch.sqlite3"), hit_flush_seconds=0)
    store.put(NewEntry("k", "chat", "m", '{"messages":[]}', "{}", prompt_tokens=4, completion_tokens=1,
                       cost_usd=0.5, upstream_seconds=2.0))
    store.record_hit("k")
    store.record_request("HIT", "m", route="/v1/chat/completions", key="k", seconds=0.001)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT value FROM cache_counters WHERE name = 'hits_served'").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM recent_requests").fetchone() == (0,)
    stats = store.stats()  # flushes
    assert stats["tokens_saved"] == {"prompt": 4, "completion": 1, "total": 5}
    assert stats["cost_saved_usd"] == 0.5 and stats["time_saved_seconds"] == 2.0
    store.close()


def test_stats__savings_survive_deletion_and_expired_restore(tmp_path):
    now = [1000.0]
    store = SQLiteStore(str(tmp_path / "s.sqlite3"), ttl_seconds=10, clock=lambda: now[0],
                        hit_flush_seconds=0)
    entry = NewEntry("k", "chat", "m", "{}", "{}", prompt_tokens=3, completion_tokens=2)
    store.put(entry)
    store.record_hit("k")
    store.flush()
    now[0] += 60
    store.put(entry)  # expired: stored afresh with hits = 0, savings already made stay
    store.delete("k")
    stats = store.stats()
    assert stats["tokens_saved"]["total"] == 5 and stats["hits_served"] == 1 and stats["hits"] == 0
    store.close()


def test_stats__old_database_is_migrated_with_usage_backfilled(tmp_path):
    path = str(tmp_path / "original.sqlite3")
    with sqlite3.connect(path) as db:
        db.execute("""CREATE TABLE completions (cache_key TEXT PRIMARY KEY, mode TEXT NOT NULL,
            model TEXT NOT NULL, request_json TEXT NOT NULL, response_json TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, last_hit_at REAL,
            hits INTEGER NOT NULL DEFAULT 0)""")
        db.execute("INSERT INTO completions VALUES ('k', 'chat', 'm', '{}', ?, 1, 1, NULL, 2)",
                   ('{"usage": {"prompt_tokens": 9, "completion_tokens": 4, "cost": 0.25}}',))
        db.execute("INSERT INTO completions VALUES ('bad', 'chat', 'm', '{}', 'not json', 1, 1, NULL, 0)")
    store = SQLiteStore(path, hit_flush_seconds=0)
    store.record_hit("k")
    stats = store.stats()
    assert stats["hits"] == 3 and stats["hits_served"] == 1  # served since the upgrade
    assert stats["tokens_saved"] == {"prompt": 9, "completion": 4, "total": 13}
    assert stats["cost_saved_usd"] == 0.25
    store.close()
