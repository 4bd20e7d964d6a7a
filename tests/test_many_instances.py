"""Many instances, one cache: two proxies (separate gunicorn processes, separate ports, separate
CACHE_DB_PATH as on two machines) on one Redis, driven over HTTP with the openai SDK and requests.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import redis
import requests

import cache_policy
import config
from conftest import ROOT, SETTING_VARIABLES
from fake_upstream import FakeUpstream
from helpers import chat_body, completion_body
from redis_server import RedisServer
from test_production_server import Gunicorn

PREFIX = "fleet:"


class Fleet:
    """A fake upstream, a Redis and two proxy instances using it."""

    def __init__(self, **env: str):
        self.upstream = FakeUpstream().start()
        self.redis = RedisServer().start()
        self.dirs = [Path(tempfile.mkdtemp(prefix="cuc-instance-")) for _ in range(2)]
        self.instances: list[Gunicorn] = []
        try:
            for directory in self.dirs:
                self.instances.append(Gunicorn(self.env(directory, **env)))
        except BaseException:
            self.close()
            raise

    def env(self, directory: Path, **extra: str) -> dict[str, str]:
        return {"CACHE_URL": self.redis.url(), "CACHE_REDIS_PREFIX": PREFIX,
                "CACHE_DB_PATH": str(directory / "cache.sqlite3"),
                "UPSTREAM_BASE_URL": self.upstream.base_url, "UPSTREAM_API_KEY": "sk-upstream-test",
                "UPSTREAM_TIMEOUT_SECONDS": "20", "CACHE_HIT_FLUSH_SECONDS": "0.2",
                "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "64", **extra}

    def calls(self, marker: str) -> int:
        """Upstream calls whose request carried ``marker``."""
        return sum(marker in call.body.decode("utf-8", "replace") for call in self.upstream.calls())

    def close(self) -> None:
        for instance in self.instances:
            instance.terminate()
        self.redis.close()
        self.upstream.stop()


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    yield fleet
    fleet.close()


def client(instance: Gunicorn) -> openai.OpenAI:
    return openai.OpenAI(base_url=instance.url + "/v1", api_key="sk-client", max_retries=0)


def status(reply) -> str:
    return reply.headers["X-Computer-Use-Cache"]


def test_many_instances__a_miss_on_one_is_a_hit_on_the_other(fleet):
    first, second = fleet.instances
    body = chat_body("shared between instances")
    raw_first = client(first).chat.completions.with_raw_response.create(**body)
    raw_second = client(second).chat.completions.with_raw_response.create(**body)

    assert (status(raw_first), status(raw_second)) == ("MISS", "HIT")
    assert raw_second.parse().model_dump() == raw_first.parse().model_dump()
    assert fleet.calls("shared between instances") == 1


def test_many_instances__a_streamed_miss_on_one_is_a_streamed_hit_on_the_other(fleet):
    first, second = fleet.instances
    body = chat_body("streamed between instances")
    texts, statuses = [], []
    for instance in (first, second):
        raw = client(instance).chat.completions.with_raw_response.create(
            **body, stream=True, stream_options={"include_usage": True})
        chunks = list(raw.parse())
        statuses.append(status(raw))
        texts.append("".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices))
        assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert statuses == ["MISS", "HIT"]
    assert texts[0] == texts[1] == "echo: streamed between instances"
    assert fleet.calls("streamed between instances") == 1


def test_many_instances__50_identical_misses_across_both_make_one_upstream_call(fleet):
    body = chat_body("fifty at once, two instances")
    probe = redis.Redis.from_url(fleet.redis.url())

    def lease_checks() -> int:
        return probe.info("commandstats").get("cmdstat_pttl", {}).get("calls", 0)

    checks_before = lease_checks()
    fleet.upstream.default_delay = 0.5
    try:
        def post(number: int) -> requests.Response:
            instance = fleet.instances[number % 2]
            with requests.Session() as session:
                return session.post(instance.url + "/v1/chat/completions", json=body, timeout=30)

        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(post, range(50)))
    finally:
        fleet.upstream.default_delay = 0.0

    assert fleet.calls("fifty at once, two instances") == 1
    assert {reply.status_code for reply in replies} == {200}
    assert len({reply.content for reply in replies}) == 1
    assert sorted(status(reply) for reply in replies) == ["HIT"] * 49 + ["MISS"]
    followers = [reply for reply in replies if status(reply) == "HIT"]
    assert all(reply.headers.get("X-Computer-Use-Cache-Coalesced") == "true" for reply in followers)
    # The other instance's followers were told (pub/sub); they looked at the lease once, not
    # every few milliseconds for half a second.
    assert lease_checks() - checks_before <= 2


def test_many_instances__an_entry_deleted_on_one_is_gone_on_the_other(fleet):
    first, second = fleet.instances
    body = chat_body("delete me everywhere")
    key = requests.post(first.url + "/v1/chat/completions", json=body).headers["X-Computer-Use-Cache-Key"]
    assert status(requests.post(second.url + "/v1/chat/completions", json=body)) == "HIT"

    deleted = requests.delete(f"{first.url}/cache/entries/{key}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True

    assert requests.get(f"{second.url}/cache/entries/{key}").status_code == 404
    assert status(requests.post(second.url + "/v1/chat/completions", json=body)) == "MISS"


def test_many_instances__stats_on_either_count_both_instances_hits(fleet):
    first, second = fleet.instances
    model = f"test/stats-{secrets.token_hex(4)}"
    body = chat_body("count me on both", model=model)
    assert status(requests.post(first.url + "/v1/chat/completions", json=body)) == "MISS"
    for instance in (first, first, second, second, second):
        assert status(requests.post(instance.url + "/v1/chat/completions", json=body)) == "HIT"

    def figures(instance: Gunicorn) -> dict:
        return requests.get(instance.url + "/cache/stats").json()["by_model"].get(model, {})

    # Each instance writes its counters every CACHE_HIT_FLUSH_SECONDS (0.2 s here).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(figures(i).get("hits") == 5 for i in fleet.instances):
        time.sleep(0.1)
    for instance in fleet.instances:
        assert (figures(instance)["hits"], figures(instance)["misses"]) == (5, 1)
    listed = requests.get(second.url + "/cache/entries", params={"model": model}).json()["data"]
    assert [item["hits"] for item in listed] == [5]


def test_many_instances__messages_and_responses_shared_and_counted_by_api(fleet):
    """A Messages (anthropic SDK) and a Responses (openai SDK) miss on one instance are hits on
    the other, and either instance's /cache/stats counts both instances' requests by API."""
    import anthropic

    first, second = fleet.instances
    message = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "shared message"}]}
    messages = [anthropic.Anthropic(base_url=instance.url, api_key="sk-client", max_retries=0)
                .messages.with_raw_response.create(**message) for instance in (first, second)]
    responses = [client(instance).responses.with_raw_response.create(model="gpt-4o", input="shared response")
                 for instance in (first, second)]

    assert [status(raw) for raw in messages] == ["MISS", "HIT"]
    assert [status(raw) for raw in responses] == ["MISS", "HIT"]
    assert messages[1].parse().model_dump() == messages[0].parse().model_dump()
    assert responses[1].parse().model_dump() == responses[0].parse().model_dump()
    assert (len(fleet.upstream.calls("/messages")), len(fleet.upstream.calls("/responses"))) == (1, 1)

    def counted(instance: Gunicorn) -> dict:
        by_api = requests.get(instance.url + "/cache/stats").json()["by_api"]
        return {api: (by_api.get(api, {}).get("hits"), by_api.get(api, {}).get("misses"))
                for api in ("messages", "responses")}

    # Each instance writes its counters every CACHE_HIT_FLUSH_SECONDS (0.2 s here).
    expected = {"messages": (1, 1), "responses": (1, 1)}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(counted(i) == expected for i in fleet.instances):
        time.sleep(0.1)
    assert [counted(instance) for instance in fleet.instances] == [expected, expected]
    metrics = requests.get(second.url + "/metrics").text
    assert 'computer_use_cache_api_hits_total{api="messages"} 1.0' in metrics


def test_many_instances__clear_on_one_removes_only_the_cache_keys(fleet):
    first, second = fleet.instances
    foreign = redis.Redis.from_url(fleet.redis.url())
    foreign.set("someone-else:data", "keep me")
    foreign.set("fleet-other:data", "keep me too")  # a prefix that merely starts alike
    body = chat_body("cleared everywhere")
    requests.post(first.url + "/v1/chat/completions", json=body)

    cleared = requests.post(second.url + "/cache/clear")

    assert cleared.status_code == 200 and cleared.json()["deleted"] >= 1
    assert requests.get(first.url + "/cache/stats").json()["entries"] == 0
    assert list(foreign.scan_iter(f"{PREFIX}e:*")) == [] and foreign.hlen(f"{PREFIX}meta") == 0
    assert foreign.get("someone-else:data") == b"keep me"
    assert foreign.get("fleet-other:data") == b"keep me too"
    assert status(requests.post(first.url + "/v1/chat/completions", json=body)) == "MISS"


def test_many_instances__a_dead_leaders_lease_expires_and_followers_go_upstream(fleet):
    """A leader that died (its lease is never released nor renewed): the follower waits only
    until the lease expires, then asks upstream itself."""
    first, _ = fleet.instances
    body = chat_body("the leader died")
    key = cache_policy.decide(config.load_settings({}), "chat", body).key
    lease = redis.Redis.from_url(fleet.redis.url())
    assert lease.set(f"{PREFIX}lease:{key}", "a-dead-process", nx=True, px=1500)

    began = time.monotonic()
    reply = requests.post(first.url + "/v1/chat/completions", json=body, timeout=30)
    waited = time.monotonic() - began

    assert reply.status_code == 200 and status(reply) == "MISS"
    assert 1.0 < waited < 5
    assert fleet.calls("the leader died") == 1


def test_many_instances__redis_stopped_mid_run_then_back(tmp_path):
    fleet = Fleet()
    try:
        first, second = fleet.instances
        body = chat_body("through an outage")
        assert status(requests.post(first.url + "/v1/chat/completions", json=body)) == "MISS"
        assert status(requests.post(second.url + "/v1/chat/completions", json=body)) == "HIT"

        fleet.redis.stop()
        for instance in (first, second):
            began = time.monotonic()
            reply = requests.post(instance.url + "/v1/chat/completions", json=body, timeout=30)
            assert reply.status_code == 200 and time.monotonic() - began < 5
            assert status(reply) == "BYPASS"
            assert reply.headers["X-Computer-Use-Cache-Bypass-Reason"].startswith("cache unavailable: ")
            assert requests.get(instance.url + "/healthz").status_code == 503

        fleet.redis.start()  # same port, empty: the first answer is stored again, then hits
        began = time.monotonic()
        seen: list[str] = []
        while time.monotonic() - began < 10 and seen[-2:] != ["HIT", "HIT"]:
            for instance in (first, second):
                reply = requests.post(instance.url + "/v1/chat/completions", json=body, timeout=30)
                assert reply.status_code == 200
                seen.append(status(reply))
            time.sleep(0.2)
        assert seen[-2:] == ["HIT", "HIT"], seen
        assert time.monotonic() - began < 10
        assert all(requests.get(i.url + "/healthz").status_code == 200 for i in fleet.instances)
    finally:
        fleet.close()


# -- in one process, two apps: partitions, coalescing switched off, the operator's views ---------


def test_many_instances__client_key_partitions_agree_across_instances(start_proxy, redis_server,
                                                                      redis_prefix, tmp_path, http):
    """No CACHE_KEY_SECRET: the generated one lives in Redis, so a client key reaches its own
    entries on every instance (and only its own)."""
    options = {"upstream_api_key": "", "cache_url": redis_server.url(), "cache_redis_prefix": redis_prefix}
    first = start_proxy(cache_db_path=str(tmp_path / "a" / "c.sqlite3"), **options)
    second = start_proxy(cache_db_path=str(tmp_path / "b" / "c.sqlite3"), **options)
    body = chat_body("my own partition")
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}

    assert status(http.post(first.url + "/v1/chat/completions", json=body, headers=alice)) == "MISS"
    assert status(http.post(second.url + "/v1/chat/completions", json=body, headers=alice)) == "HIT"
    assert status(http.post(second.url + "/v1/chat/completions", json=body, headers=bob)) == "MISS"
    assert not (tmp_path / "a" / "c.sqlite3.secret").exists()
    secret = redis.Redis.from_url(redis_server.url()).get(f"{redis_prefix}secret")
    assert secret is not None and len(secret) == 64


def test_many_instances__coalescing_off_with_CACHE_COALESCE_0(start_proxy, fake_upstream, redis_server,
                                                             redis_prefix):
    proxy = start_proxy(cache_coalesce=False, cache_url=redis_server.url(), cache_redis_prefix=redis_prefix)
    fake_upstream.default_delay = 0.4
    body = chat_body("every one upstream, redis")

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: requests.post(proxy.url + "/v1/chat/completions", json=body,
                                                        timeout=30), range(5)))

    assert {reply.status_code for reply in replies} == {200}
    assert len(fake_upstream.calls()) == 5
    assert all("X-Computer-Use-Cache-Coalesced" not in reply.headers for reply in replies)


def test_many_instances__metrics_dashboard_and_entries_on_redis(start_proxy, redis_server, redis_prefix, http):
    proxy = start_proxy(cache_url=redis_server.url(), cache_redis_prefix=redis_prefix,
                        cache_admin_token="admin-token-123456")
    admin = {"X-Cache-Admin-Token": "admin-token-123456"}
    body = chat_body("seen by the dashboard")
    http.post(proxy.url + "/v1/chat/completions", json=body)
    assert status(http.post(proxy.url + "/v1/chat/completions", json=body)) == "HIT"
    proxy.store.flush()

    metrics = http.get(proxy.url + "/metrics", headers=admin).text
    assert "computer_use_cache_entries 1.0" in metrics
    activity = http.get(proxy.url + "/cache/activity", headers=admin).json()
    assert [item["status"] for item in activity["recent"][:2]] == ["HIT", "MISS"]
    assert activity["top_entries"][0]["hits"] == 1
    entries = http.get(proxy.url + "/cache/entries", headers=admin).json()
    assert len(entries["data"]) == 1 and entries["data"][0]["prompt"].startswith("seen by the dashboard")
    stats = http.get(proxy.url + "/cache/stats").json()
    assert stats["db_path"] == redis_server.url() and stats["hits_served"] == 1


# -- moving a warmed cache between SQLite and Redis ------------------------------------------------


def flask_cache(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items()
                   if name not in SETTING_VARIABLES and not name.startswith("FLASK_")}
    environment.update(UPSTREAM_BASE_URL="http://127.0.0.1:9", **env)
    return subprocess.run([sys.executable, "-m", "flask", "--app", "server", "cache", *args],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)


def test_many_instances__export_from_sqlite_import_into_redis_and_back(start_proxy, redis_server,
                                                                       redis_prefix, tmp_path, http):
    calls = [("/v1/chat/completions", chat_body("Open the login page"), {}),
             ("/v1/chat/completions", chat_body("Type the name", temperature=0), {}),
             ("/v1/completions", completion_body("Say hello"), {}),
             ("/v1/chat/completions", chat_body("Open the login page"), {"X-Cache-Namespace": "run-1"}),
             ("/v1/chat/completions", chat_body("Ünïcode ✓ \U0001f600"), {})]
    sqlite_proxy = start_proxy(cache_db_path=str(tmp_path / "warm.sqlite3"))
    expected = []
    for path, body, headers in calls:
        http.post(sqlite_proxy.url + path, json=body, headers=headers)
        expected.append(http.post(sqlite_proxy.url + path, json=body, headers=headers))
    redis_env = {"CACHE_URL": redis_server.url(), "CACHE_REDIS_PREFIX": redis_prefix}

    exported = flask_cache("export", str(tmp_path / "warm.jsonl"), CACHE_DB_PATH=str(tmp_path / "warm.sqlite3"))
    assert exported.returncode == 0 and "exported 5 entries" in exported.stderr, exported.stderr
    imported = flask_cache("import", str(tmp_path / "warm.jsonl"), CACHE_DB_PATH="/nonexistent/x", **redis_env)
    assert "imported 5, already present 0, invalid 0" in imported.stderr, imported.stderr
    again = flask_cache("import", str(tmp_path / "warm.jsonl"), **redis_env)
    assert "imported 0, already present 5, invalid 0" in again.stderr, again.stderr

    redis_proxy = start_proxy(cache_url=redis_server.url(), cache_redis_prefix=redis_prefix,
                              cache_db_path=str(tmp_path / "unused.sqlite3"))
    for (path, body, headers), before in zip(calls, expected):
        after = http.post(redis_proxy.url + path, json=body, headers=headers)
        assert status(after) == "HIT"
        assert after.headers["X-Computer-Use-Cache-Key"] == before.headers["X-Computer-Use-Cache-Key"]
        assert after.content == before.content

    back = flask_cache("export", str(tmp_path / "back.jsonl"), **redis_env)
    assert "exported 5 entries" in back.stderr, back.stderr
    lines = {json.loads(line)["key"]: json.loads(line) for line in open(tmp_path / "back.jsonl")}
    original = {json.loads(line)["key"]: json.loads(line) for line in open(tmp_path / "warm.jsonl")}
    assert lines == original  # every field of every entry, keys included
    fresh = flask_cache("import", str(tmp_path / "back.jsonl"), CACHE_DB_PATH=str(tmp_path / "fresh.sqlite3"))
    assert "imported 5, already present 0, invalid 0" in fresh.stderr, fresh.stderr


def test_many_instances__cli_on_redis(start_proxy, redis_server, redis_prefix, http):
    env = {"CACHE_URL": redis_server.url(), "CACHE_REDIS_PREFIX": redis_prefix}
    proxy = start_proxy(cache_url=redis_server.url(), cache_redis_prefix=redis_prefix)
    key = http.post(proxy.url + "/v1/chat/completions",
                    json=chat_body("from the command line")).headers["X-Computer-Use-Cache-Key"]

    stats = flask_cache("stats", **env)
    assert json.loads(stats.stdout)["entries"] == 1
    listed = flask_cache("list", **env)
    assert key in listed.stdout and "from the command line" in listed.stdout
    shown = json.loads(flask_cache("show", key, **env).stdout)
    assert shown["request"]["cache_key"] == key
    assert "purged 0 expired, evicted 0" in flask_cache("purge", **env).stdout
    assert flask_cache("delete", key, **env).stdout.strip() == f"deleted {key}"
    http.post(proxy.url + "/v1/chat/completions", json=chat_body("from the command line"))
    assert "deleted 1 entries" in flask_cache("clear", "--yes", **env).stdout
    assert json.loads(flask_cache("stats", **env).stdout)["entries"] == 0


# -- the request controls and bounds, over HTTP, on Redis -------------------------------------------


@pytest.fixture
def redis_proxy(start_proxy, redis_server, redis_prefix, clock):
    """start(**overrides) -> a real proxy on Redis whose store reads time from ``clock``."""
    return lambda **overrides: start_proxy(store_options={"clock": clock}, cache_url=redis_server.url(),
                                           cache_redis_prefix=redis_prefix, **overrides)


def post(http, proxy, content: str, **headers: str) -> str:
    reply = http.post(proxy.url + "/v1/chat/completions", json=chat_body(content), headers=headers)
    assert reply.status_code == 200
    return status(reply)


def test_redis_store__ttl_max_age_and_namespaces_over_http(redis_proxy, clock, http):
    proxy = redis_proxy(cache_ttl_seconds=100)
    assert post(http, proxy, "own ttl", **{"X-Cache-TTL": "10"}) == "MISS"
    assert post(http, proxy, "server ttl") == "MISS"
    clock.advance(11)
    assert post(http, proxy, "own ttl") == "MISS"  # its own 10 s are over
    assert post(http, proxy, "server ttl") == "HIT"
    assert post(http, proxy, "server ttl", **{"Cache-Control": "max-age=5"}) == "MISS"
    assert post(http, proxy, "server ttl", **{"Cache-Control": "max-age=5"}) == "HIT"  # stored again
    clock.advance(101)
    assert post(http, proxy, "server ttl") == "MISS"
    assert post(http, proxy, "spaced", **{"X-Cache-Namespace": "run-1"}) == "MISS"
    assert post(http, proxy, "spaced", **{"X-Cache-Namespace": "run-2"}) == "MISS"
    assert post(http, proxy, "spaced", **{"X-Cache-Namespace": "run-1"}) == "HIT"
    assert post(http, proxy, "spaced") == "MISS"
    listed = http.get(proxy.url + "/cache/entries", params={"namespace": "run-1"}).json()["data"]
    assert [item["namespace"] for item in listed] == ["run-1"]


def test_redis_store__least_recently_used_evicted_over_http(redis_proxy, clock, http):
    proxy = redis_proxy(cache_max_entries=3)
    for name in ("A", "B", "C"):
        assert post(http, proxy, name) == "MISS"
        clock.advance(1)
    assert post(http, proxy, "A") == "HIT"  # A is now the most recently used
    clock.advance(1)
    assert post(http, proxy, "D") == "MISS"  # one over the bound: B goes

    deadline = time.monotonic() + 5
    while proxy.store.entry_count() != 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [post(http, proxy, name) for name in ("A", "C", "D")] == ["HIT", "HIT", "HIT"]
    assert post(http, proxy, "B") == "MISS"


def test_many_instances__sigterm_writes_every_hit_count_to_redis(redis_server, redis_prefix, fake_upstream,
                                                                  tmp_path):
    """Counters held in memory (CACHE_HIT_FLUSH_SECONDS=600: only the shutdown writes them)."""
    server = Gunicorn({"CACHE_URL": redis_server.url(), "CACHE_REDIS_PREFIX": redis_prefix,
                       "CACHE_DB_PATH": str(tmp_path / "cache.sqlite3"), "CACHE_HIT_FLUSH_SECONDS": "600",
                       "UPSTREAM_BASE_URL": fake_upstream.base_url, "UPSTREAM_API_KEY": "sk-upstream-test",
                       "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "8"})
    try:
        body = chat_body("counted at shutdown")
        key = requests.post(server.url + "/v1/chat/completions", json=body).headers["X-Computer-Use-Cache-Key"]
        for _ in range(6):
            with requests.Session() as session:  # new connections: both workers take some
                assert status(session.post(server.url + "/v1/chat/completions", json=body)) == "HIT"
    finally:
        assert server.terminate() == 0
    assert redis.Redis.from_url(redis_server.url()).hget(f"{redis_prefix}e:{key}", "hits") == b"6"


def test_production_config__instances_on_redis_take_short_gil_turns():
    script = "import runpy, sys; runpy.run_path('gunicorn.conf.py'); print(sys.getswitchinterval())"
    environment = {name: value for name, value in os.environ.items() if name not in SETTING_VARIABLES}
    turns = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env={**environment, **extra}, timeout=60).stdout.strip()
             for extra in ({}, {"CACHE_URL": "redis://127.0.0.1:6379/0"})]
    assert [round(float(turn), 6) for turn in turns] == [0.05, 0.005]

