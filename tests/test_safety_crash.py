"""Crashes and contention in the production server: gunicorn workers killed with SIGKILL while
writes and hits are in flight, many threads in several worker processes at once, and a start on
a corrupt database file.

Both tests start the real thing (`gunicorn -c gunicorn.conf.py 'server:create_app()'`) against
the fake upstream, drive it from client threads over HTTP, and afterwards open the database
themselves. No UPSTREAM_API_KEY is set, so the cache is partitioned by the clients' key and
the workers must also agree on the generated partition secret for hits to happen.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")
CLIENT_KEY = "sk-crash-test-" + "9f" * 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (gunicorn's workers), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


class Gunicorn:
    """The production server in a subprocess, on a free loopback port."""

    def __init__(self, tmp_path: Path, upstream: FakeUpstream, workers: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = tmp_path / "cache.sqlite3"
        self.workers = workers
        self.log_path = tmp_path / "gunicorn.log"
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
               "CACHE_DB_PATH": str(self.db_path), "UPSTREAM_BASE_URL": upstream.base_url,
               "WEB_CONCURRENCY": str(workers), "UPSTREAM_TIMEOUT_SECONDS": "20"}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn.conf.py", "server:create_app()"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0, expect_health: int = 200) -> None:
        """Until every worker is up and /healthz answers with the expected status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            if len(self.worker_pids()) == self.workers:
                try:
                    if requests.get(self.url + "/healthz", timeout=2).status_code == expect_health:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.05)
        raise AssertionError("gunicorn did not become ready:\n" + self.log_path.read_text())

    def worker_pids(self) -> list[int]:
        return _children(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def gunicorn(tmp_path):
    servers: list[Gunicorn] = []
    upstream = FakeUpstream(default_delay=0.02).start()

    def start(workers: int, expect_health: int = 200) -> Gunicorn:
        server = Gunicorn(tmp_path, upstream, workers)
        servers.append(server)
        server.wait_ready(expect_health=expect_health)
        return server

    yield start
    for server in servers:
        server.stop()
    upstream.stop()


def _body(prompt: str) -> dict:
    return {"model": "test/model-a", "messages": [{"role": "user", "content": prompt}]}


def _content(text: str) -> str:
    return json.loads(text)["choices"][0]["message"]["content"]


@dataclass
class Load:
    """What the client threads saw."""

    acknowledged: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (prompt, body)
    statuses: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    connection_errors: int = 0
    skipped: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str) -> None:
        with self.lock:
            self.statuses[name] = self.statuses.get(name, 0) + 1


def _drive(url: str, load: Load, stop: threading.Event, thread_number: int, seed: int) -> None:
    """New prompts (each written once) and repeats of acknowledged ones (must be hits)."""
    rng = random.Random(seed)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {CLIENT_KEY}"
    sequence = 0
    while not stop.is_set():
        with load.lock:
            known = list(load.acknowledged.items()) if rng.random() < 0.5 else []
        if known:
            _, (prompt, acknowledged_body) = rng.choice(known)
        else:
            sequence += 1
            prompt, acknowledged_body = f"thread {thread_number} step {sequence}", None
        try:
            response = session.post(url + "/v1/chat/completions", json=_body(prompt), timeout=20)
        except requests.RequestException:
            with load.lock:
                load.connection_errors += 1  # the worker died under this request
            session.close()
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {CLIENT_KEY}"
            continue
        status = response.headers.get("X-Computer-Use-Cache")
        store = response.headers.get("X-Computer-Use-Cache-Store")
        load.count(f"{response.status_code} {status}")
        if response.status_code != 200 or "locked" in response.text:
            load.problems.append(f"{prompt}: HTTP {response.status_code} {response.text[:200]}")
            continue
        if _content(response.text) != f"echo: {prompt}":
            load.problems.append(f"{prompt}: answered with another prompt's answer")
        if store and store.startswith("skipped"):
            with load.lock:
                load.skipped.append(store)
        if acknowledged_body is not None:
            if status != "HIT" or json.loads(response.text) != json.loads(acknowledged_body):
                load.problems.append(f"{prompt}: acknowledged entry not served back ({status})")
        elif store == "stored":
            with load.lock:
                load.acknowledged[response.headers["X-Computer-Use-Cache-Key"]] = (prompt, response.text)
    session.close()


def _run_load(url: str, threads: int, seconds: float, during=None) -> Load:
    load = Load()
    stop = threading.Event()
    workers = [threading.Thread(target=_drive, args=(url, load, stop, n, 1000 + n), daemon=True)
               for n in range(threads)]
    for worker in workers:
        worker.start()
    if during is not None:
        during()
    else:
        time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    return load


def _check_database(path: Path, acknowledged: dict[str, tuple[str, str]]) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = {key: (request_json, response_json) for key, request_json, response_json in
                db.execute("SELECT cache_key, request_json, response_json FROM completions")}
        for key, (prompt, served) in acknowledged.items():
            assert key in rows, f"acknowledged entry for {prompt!r} is missing"
            assert json.loads(rows[key][1]) == json.loads(served), f"entry for {prompt!r} changed"
        for key, (request_json, response_json) in rows.items():  # no partial or torn row anywhere
            request = json.loads(request_json)
            assert request["cache_key"] == key
            assert _content(response_json) == "echo: " + request["messages"][-1]["content"]
        counters = dict(db.execute("SELECT name, value FROM cache_counters"))
        entries, hits, stored_bytes = db.execute(
            "SELECT count(*), coalesce(sum(hits), 0), coalesce(sum(length(CAST(request_json AS BLOB))"
            " + length(CAST(response_json AS BLOB))), 0) FROM completions").fetchone()
        assert (counters["entries"], counters["hits"], counters["stored_bytes"]) == (entries, hits, stored_bytes)
    finally:
        db.close()


def test_gunicorn__workers_killed_mid_write_lose_and_corrupt_nothing_acknowledged(gunicorn):
    server = gunicorn(workers=2)
    first_workers = set(server.worker_pids())
    rng = random.Random(5)
    kills = []

    def kill_workers_repeatedly() -> None:
        for round_number in range(14):
            time.sleep(rng.uniform(0.4, 0.9))
            pids = server.worker_pids()
            victims = pids if round_number % 4 == 3 else [rng.choice(pids)] if pids else []
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
            deadline = time.monotonic() + 10
            while len(server.worker_pids()) < server.workers and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(0.5)

    load = _run_load(server.url, threads=16, seconds=0, during=kill_workers_repeatedly)
    server.wait_ready()
    restarted = set(server.worker_pids())
    served_back = [requests.post(server.url + "/v1/chat/completions", json=_body(prompt), timeout=10,
                                 headers={"Authorization": f"Bearer {CLIENT_KEY}"})
                   for prompt, _ in list(load.acknowledged.values())[:150]]
    server.stop()

    print(f"kills={len(kills)} acknowledged={len(load.acknowledged)} statuses={load.statuses} "
          f"connection_errors={load.connection_errors} skipped={len(load.skipped)}")
    assert len(kills) >= 14
    assert not load.problems, load.problems[:5]
    assert len(load.acknowledged) >= 150
    assert load.statuses.get("200 HIT", 0) >= 150
    assert not restarted & first_workers
    assert all(r.status_code == 200 and r.headers["X-Computer-Use-Cache"] == "HIT" for r in served_back)
    _check_database(server.db_path, load.acknowledged)


def test_gunicorn__many_threads_in_several_workers_never_see_database_is_locked(gunicorn):
    server = gunicorn(workers=3)

    load = _run_load(server.url, threads=24, seconds=4)
    server.stop()

    print(f"acknowledged={len(load.acknowledged)} statuses={load.statuses} skipped={load.skipped[:3]}")
    assert not load.problems, load.problems[:5]
    assert load.connection_errors == 0
    assert not [store for store in load.skipped if "locked" in store]
    assert load.statuses.get("200 MISS", 0) >= 50 and load.statuses.get("200 HIT", 0) >= 50
    _check_database(server.db_path, load.acknowledged)
    log = server.log_path.read_text()
    assert "locked" not in log and "Traceback" not in log



def test_gunicorn__starts_on_a_corrupt_database_and_passes_everything_through(gunicorn, tmp_path):
    db_path = tmp_path / "cache.sqlite3"
    original = b"PK\x03\x04 a zip archive someone saved here by mistake" * 50
    db_path.write_bytes(original)

    server = gunicorn(workers=2, expect_health=503)
    replies = [requests.post(server.url + "/v1/chat/completions", json=_body(f"question {n}"), timeout=10,
                             headers={"Authorization": f"Bearer {CLIENT_KEY}"}) for n in range(6)]
    health = requests.get(server.url + "/healthz", timeout=10)
    server.stop()

    for n, reply in enumerate(replies):
        assert reply.status_code == 200
        assert reply.headers["X-Computer-Use-Cache"] == "BYPASS"
        assert reply.headers["X-Computer-Use-Cache-Bypass-Reason"].startswith("cache unavailable: ")
        assert _content(reply.text) == f"echo: question {n}"
    assert health.status_code == 503 and "not a SQLite database" in health.json()["cache"]["error"]
    log_lines = server.log_path.read_text().splitlines()
    errors = [line for line in log_lines if "unavailable, every request is answered without" in line]
    assert 1 <= len(errors) <= 2  # one per worker process that served a request, not one per request
    assert "Traceback" not in "\n".join(log_lines)
    assert db_path.read_bytes() == original
