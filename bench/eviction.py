"""Does the hit path slow down while eviction runs?  Run by hand: ``python bench/eviction.py``.

1. idle: a gunicorn worker (unbounded store) serves cache hits; their latency is measured.
2. The database is filled with many old entries (older than the hot ones).
3. eviction: the worker is restarted with CACHE_MAX_ENTRIES just above the hot set; its first
   request starts the background maintainer, which evicts the old entries in batches. Hits are
   measured the whole time, and those answered while the entry count was still above the bound
   are the "during eviction" sample. Hits after eviction has finished are measured too.

Everything runs on 127.0.0.1 against the fake upstream (tests/fake_upstream.py). Prints p50/p95
of each phase and the ratio hit p50 during eviction / idle (1.0 = no slowdown).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cache_policy import canonical_json, hash_canonical  # noqa: E402
from cache_store import SQLiteStore  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db_path: str, upstream_url: str, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    environment = {**os.environ, "CACHE_DB_PATH": db_path, "UPSTREAM_BASE_URL": upstream_url,
                   "CACHE_HIT_FLUSH_SECONDS": "1", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "8",
         "-b", f"127.0.0.1:{port}", "server:create_app()"],
        cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def hot_body(number: int) -> dict:
    return {"model": "test/model-a", "messages": [{"role": "user", "content": f"hot step {number}"}]}


def hit_latencies(session: requests.Session, url: str, hot: int, *, count: int | None = None,
                  until: threading.Event | None = None) -> list[tuple[float, float]]:
    """(finish time, seconds) of sequential hits over the hot set."""
    samples = []
    number = 0
    while (count is None or len(samples) < count) and not (until is not None and until.is_set()):
        started = time.perf_counter()
        response = session.post(url + "/v1/chat/completions", json=hot_body(number % hot))
        elapsed = time.perf_counter() - started
        if response.headers.get("X-Computer-Use-Cache") != "HIT":
            raise RuntimeError(f"expected a hit, got {response.headers.get('X-Computer-Use-Cache')}")
        samples.append((time.monotonic(), elapsed))
        number += 1
    return samples


def fill(db_path: str, entries: int, size: int) -> None:
    """Old entries (least recently used), inserted in big batches straight into the store."""
    store = SQLiteStore(db_path, maintenance_seconds=0)
    old = time.time() - 3600
    response = '{"id":"chatcmpl-filler","object":"chat.completion","choices":[],"pad":"' + "x" * size + '"}'
    batch = []
    for number in range(entries):
        canonical = canonical_json({"mode": "chat", "model": "filler",
                                    "messages": [{"role": "user", "content": f"filler {number}"}]})
        key = hash_canonical(canonical)
        batch.append({"key": key, "mode": "chat", "model": "filler", "namespace": None,
                      "request_json": canonical[:-1] + f',"cache_key":"{key}"}}',
                      "response_json": response, "created_at": old + number * 0.001,
                      "updated_at": old + number * 0.001, "expires_at": None})
        if len(batch) == 2000:
            store.insert_new(batch)
            batch = []
    if batch:
        store.insert_new(batch)
    store.close()


def entry_count(db_path: str) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT value FROM cache_counters WHERE name = 'entries'").fetchone()[0])
    finally:
        db.close()


def summary(label: str, samples: list[tuple[float, float]]) -> float:
    values = sorted(seconds for _, seconds in samples)
    p50 = statistics.median(values)
    p95 = values[int(len(values) * 0.95) - 1]
    print(f"{label:<22} n={len(values):>5}  p50={p50 * 1000:6.2f} ms  p95={p95 * 1000:6.2f} ms")
    return p50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot", type=int, default=50, help="entries that are hit")
    parser.add_argument("--fill", type=int, default=100_000, help="old entries to evict")
    parser.add_argument("--size", type=int, default=1000, help="bytes of padding per old entry")
    parser.add_argument("--hits", type=int, default=2000, help="hits measured when idle")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as upstream, requests.Session() as session:
        db_path = os.path.join(tmp, "cache.sqlite3")
        process, url = start_server(db_path, upstream.base_url)
        try:
            for number in range(args.hot):
                session.post(url + "/v1/chat/completions", json=hot_body(number))
            hit_latencies(session, url, args.hot, count=200)  # warm up
            idle = hit_latencies(session, url, args.hot, count=args.hits)
        finally:
            stop_server(process)

        started = time.monotonic()
        fill(db_path, args.fill, args.size)
        size_before = os.path.getsize(db_path)
        print(f"filled {args.fill} old entries in {time.monotonic() - started:.1f} s "
              f"(database {size_before / 1e6:.0f} MB)")

        bound = args.hot + 100
        process, url = start_server(db_path, upstream.base_url, CACHE_MAX_ENTRIES=str(bound))
        try:
            done = threading.Event()
            finished_at: list[float] = []

            def watch() -> None:
                while entry_count(db_path) > bound:
                    time.sleep(0.01)
                finished_at.append(time.monotonic())
                done.set()

            eviction_started = time.monotonic()
            samples = []
            watcher = threading.Thread(target=watch, daemon=True)
            # The first hit starts the worker's maintainer; measure from it until the bound holds.
            samples += hit_latencies(session, url, args.hot, count=1)
            watcher.start()
            samples += hit_latencies(session, url, args.hot, until=done)
            watcher.join()
            after = hit_latencies(session, url, args.hot, count=args.hits)
        finally:
            stop_server(process)
        evicted_for = finished_at[0] - eviction_started
        during = [sample for sample in samples if sample[0] <= finished_at[0]]
        print(f"evicted {args.fill + args.hot - entry_count(db_path)} entries in {evicted_for:.2f} s "
              f"in the background; database {size_before / 1e6:.0f} MB -> "
              f"{os.path.getsize(db_path) / 1e6:.1f} MB")
        idle_p50 = summary("hits, idle", idle)
        during_p50 = summary("hits, during eviction", during)
        summary("hits, after eviction", after)
        print(f"ratio hit p50 during eviction / idle: {during_p50 / idle_p50:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
