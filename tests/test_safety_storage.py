"""Storage faults: private files, a corrupt database, a full disk, a read-only or locked database.

Each test drives the proxy over real HTTP and checks that every request is still answered, that
the reason is said, that nothing stored is damaged, and that caching resumes by itself.

How the faults are made (we run as root, so file permissions alone cannot stop a write):
* full disk: ``PRAGMA max_page_count`` at the start of each write transaction caps the database
  at its current size, so SQLite itself fails the write with SQLITE_FULL ("database or disk is
  full"), exactly as on a full disk;
* read-only: ``PRAGMA query_only`` makes SQLite fail the write with SQLITE_READONLY ("attempt to
  write a readonly database");
* locked: a second connection holds the write lock longer than the store's busy timeout.
Both PRAGMAs are applied through the store's ``on_write`` hook and lifted the same way.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time

import pytest
import requests

from conftest import ProxyServer
from helpers import chat_body

BIG_PROMPT = "Describe every widget on this settings page. " * 600  # needs new database pages


@pytest.fixture
def serve(start_proxy):
    """serve(db_path=None, settings overrides..., store=dict of SQLiteStore options) -> ProxyServer."""

    def start(db_path=None, store_options: dict | None = None, **overrides) -> ProxyServer:
        if db_path is not None:
            overrides["cache_db_path"] = str(db_path)
        return start_proxy(store_options=store_options, **overrides)

    return start


def _post(server, body: dict) -> requests.Response:
    # A new connection per request: the test server then serves it on a new thread, with a new
    # store connection, as a fresh gunicorn thread would.
    response = requests.post(server.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": "Bearer sk-test-client", "Connection": "close"})
    assert response.status_code == 200, response.text
    return response


def _cache(response: requests.Response) -> tuple[str, str | None, str | None]:
    headers = response.headers
    return (headers["X-Computer-Use-Cache"], headers.get("X-Computer-Use-Cache-Store"),
            headers.get("X-Computer-Use-Cache-Bypass-Reason"))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- file modes --------------------------------------------------------------------------------


def test_store__creates_its_files_private_whatever_the_umask(serve, tmp_path):
    db_path = tmp_path / "data" / "cache" / "cache.sqlite3"
    previous = os.umask(0)  # the most permissive umask: the modes below are the code's own
    try:
        server = serve(db_path, upstream_api_key="")  # clients' keys: the secret file is made
        response = _post(server, chat_body())
        assert _cache(response)[:2] == ("MISS", "stored")
    finally:
        os.umask(previous)

    assert _mode(db_path.parent) == 0o700
    for name in ("cache.sqlite3", "cache.sqlite3-wal", "cache.sqlite3-shm",
                 "cache.sqlite3.coalesce.lock", "cache.sqlite3.secret"):
        assert _mode(db_path.parent / name) == 0o600, name


# -- a corrupt or foreign file -----------------------------------------------------------------


def _replace_with_good_database(path) -> None:
    fixed = str(path) + ".fixed"
    sqlite3.connect(fixed).close()
    os.replace(fixed, path)


def _wait_for_health(server, status: int, timeout: float = 5.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(server.url + "/healthz")
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_store__a_non_sqlite_file_is_left_untouched_and_every_request_passes_through(
        serve, tmp_path, fake_upstream, caplog):
    db_path = tmp_path / "cache.sqlite3"
    original = b"These are my notes, not a database.\n" * 200
    db_path.write_bytes(original)
    server = serve(db_path, store_options={"reopen_seconds": 0.3})

    replies = [_post(server, chat_body()) for _ in range(3)]
    stream = _post(server, chat_body(stream=True))
    health = requests.get(server.url + "/healthz")
    stats = requests.get(server.url + "/cache/stats")
    time.sleep(0.4)  # past a retry: still broken, still one log line
    replies.append(_post(server, chat_body()))

    for reply in replies + [stream]:
        status, store, reason = _cache(reply)
        assert (status, store) == ("BYPASS", None)
        assert reason == ("cache unavailable: the file at CACHE_DB_PATH is not a SQLite database "
                          "(left untouched)")
    assert replies[0].json()["choices"][0]["message"]["content"] == "echo: Plan the next click."
    assert b"data: [DONE]" in stream.content
    assert len(fake_upstream.calls()) == 5
    assert health.status_code == 503
    assert health.json()["ok"] is False
    assert "not a SQLite database" in health.json()["cache"]["error"]
    assert stats.status_code == 503 and stats.json()["error"]["type"]
    errors = [r for r in caplog.records if r.name == "computer_use_cache.store" and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert str(db_path) in errors[0].getMessage()
    assert db_path.read_bytes() == original
    assert not (tmp_path / "cache.sqlite3-wal").exists()  # SQLite never opened it


def test_store__caching_resumes_once_the_file_is_replaced_by_a_database(serve, tmp_path, caplog):
    db_path = tmp_path / "cache.sqlite3"
    db_path.write_bytes(b"\x00garbage" * 100)
    server = serve(db_path, store_options={"reopen_seconds": 0.2})
    assert _cache(_post(server, chat_body()))[0] == "BYPASS"

    _replace_with_good_database(db_path)
    health = _wait_for_health(server, 200)
    first = _post(server, chat_body())
    second = _post(server, chat_body())

    assert health.status_code == 200 and health.json()["ok"] is True
    assert _cache(first)[:2] == ("MISS", "stored")
    assert _cache(second)[0] == "HIT"
    assert any("available again" in r.getMessage() for r in caplog.records)


def test_store__a_corrupt_sqlite_file_is_left_untouched_and_bypassed(serve, tmp_path):
    db_path = tmp_path / "cache.sqlite3"
    good = tmp_path / "good.sqlite3"
    db = sqlite3.connect(good)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE notes(text)")
    db.close()
    # A real SQLite header (WAL mode, one page) followed by pages of garbage.
    corrupt = good.read_bytes()[:100] + os.urandom(16384)
    db_path.write_bytes(corrupt)
    server = serve(db_path, store_options={"reopen_seconds": 60})

    replies = [_post(server, chat_body()) for _ in range(2)]
    health = requests.get(server.url + "/healthz")

    for reply in replies:
        status, _, reason = _cache(reply)
        assert status == "BYPASS"
        assert reason.startswith("cache unavailable: cannot ")
        assert "malformed" in reason or "not a database" in reason
    assert health.status_code == 503
    assert db_path.read_bytes() == corrupt


# -- full disk, read-only, locked --------------------------------------------------------------


class StorageFault:
    """A real SQLite fault on each write transaction of the store while ``kind`` is set."""

    def __init__(self) -> None:
        self.kind: str | None = None

    def __call__(self, db: sqlite3.Connection) -> None:
        # max_page_count cannot go below the current size: 1 means "no new page".
        db.execute(f"PRAGMA max_page_count = {1 if self.kind == 'full' else 4294967294}")
        db.execute(f"PRAGMA query_only = {1 if self.kind == 'read-only' else 0}")


@pytest.mark.parametrize("kind,message", [
    ("full", "database or disk is full"),
    ("read-only", "attempt to write a readonly database"),
])
def test_store__a_full_or_read_only_database_answers_everything_and_resumes(serve, kind, message):
    fault = StorageFault()
    server = serve(store_options={"on_write": fault})
    small, big = chat_body(), chat_body(BIG_PROMPT)
    assert _cache(_post(server, small))[:2] == ("MISS", "stored")

    fault.kind = kind
    failed = _post(server, big)
    still_hit = _post(server, small)
    server.store.flush()  # the hit counter cannot be written either; it is kept for later
    fault.kind = None
    resumed = _post(server, big)
    hit_after = _post(server, big)
    server.store.flush()

    assert _cache(failed) == ("MISS", f"skipped: cache write failed: {message}", None)
    assert failed.json()["choices"][0]["message"]["content"].startswith("echo: Describe every widget")
    assert _cache(still_hit)[0] == "HIT"
    assert _cache(resumed)[:2] == ("MISS", "stored")
    assert _cache(hit_after)[0] == "HIT"
    assert server.store.stats()["entries"] == 2
    assert server.store.stats()["hits"] == 2
    check = sqlite3.connect(server.store.path)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


def test_store__a_locked_database_is_a_skipped_store_never_an_error(serve):
    server = serve(store_options={"busy_timeout_ms": 150})
    assert _cache(_post(server, chat_body("warm up")))[:2] == ("MISS", "stored")
    holder = sqlite3.connect(server.store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock for long
    try:
        locked = _post(server, chat_body())
        hit = _post(server, chat_body("warm up"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    after = _post(server, chat_body())

    assert _cache(locked) == ("MISS", "skipped: cache write failed: database is locked", None)
    assert _cache(hit)[0] == "HIT"
    assert _cache(after)[:2] == ("MISS", "stored")
