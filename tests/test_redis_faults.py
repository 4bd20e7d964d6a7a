"""Redis faults seen by a client over HTTP: refused connections, a wrong password, a frozen server
and a restart. Every request is still answered (from upstream, BYPASS, "cache unavailable: ..."),
/healthz says 503 with the reason, the password shows up nowhere, and caching resumes by itself.
"""

from __future__ import annotations

import logging
import time

import pytest

from config import SettingsError, load_settings
from helpers import chat_body
from redis_server import free_port

PASSWORD = "s3cret-redis-pass"
CHAT = "/v1/chat/completions"


def ask(http, proxy, content: str, bound: float):
    """POST one chat request; assert it was answered, 200, within ``bound`` seconds."""
    began = time.monotonic()
    reply = http.post(proxy.url + CHAT, json=chat_body(content), timeout=30)
    elapsed = time.monotonic() - began
    assert reply.status_code == 200, reply.text
    assert elapsed < bound, f"answered after {elapsed:.1f} s"
    return reply


def assert_bypassed(reply) -> None:
    assert reply.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert reply.headers["X-Computer-Use-Cache-Bypass-Reason"].startswith("cache unavailable: ")


def wait_for_hit(http, proxy, content: str, within: float) -> float:
    """Ask until the answer is a HIT; returns how long that took (fails past ``within``)."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        reply = ask(http, proxy, content, bound=10)
        if reply.headers["X-Computer-Use-Cache"] == "HIT":
            return time.monotonic() - began
        time.sleep(0.2)
    raise AssertionError(f"no HIT within {within} s")


def no_password_anywhere(http, proxy, caplog, *replies) -> None:
    texts = [caplog.text, *(reply.text + str(reply.headers) for reply in replies)]
    for path in ("/healthz", "/cache/stats", "/cache/activity", "/metrics", "/cache/entries"):
        answer = http.get(proxy.url + path, timeout=30)
        texts.append(answer.text + str(answer.headers))
    assert not [text for text in texts if PASSWORD in text]


def test_redis_faults__refused_connections_bypass_within_5_s(start_proxy, http, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = start_proxy(cache_url=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")  # nobody listens

    replies = [ask(http, proxy, f"refused {n}", bound=5) for n in range(3)]
    replies.append(ask(http, proxy, "refused 0", bound=5))

    for reply in replies:
        assert_bypassed(reply)
    health = http.get(proxy.url + "/healthz")
    assert health.status_code == 503 and health.json()["ok"] is False
    assert "Redis" in health.json()["cache"]["error"]
    assert http.get(proxy.url + "/cache/stats").status_code == 503
    no_password_anywhere(http, proxy, caplog, *replies, health)


def test_redis_faults__a_wrong_password_bypasses_and_says_why(start_proxy, own_redis, http, caplog):
    caplog.set_level(logging.DEBUG)
    redis = own_redis(password="the-right-one-is-this")
    proxy = start_proxy(cache_url=redis.url(password=PASSWORD))

    replies = [ask(http, proxy, "wrong password", bound=5) for _ in range(2)]

    for reply in replies:
        assert_bypassed(reply)
    health = http.get(proxy.url + "/healthz")
    assert health.status_code == 503
    assert "password" in health.json()["cache"]["error"].lower()
    no_password_anywhere(http, proxy, caplog, *replies, health)


def test_redis_faults__a_frozen_redis_costs_at_most_10_s_then_hits_resume(start_proxy, own_redis, http):
    redis = own_redis()
    proxy = start_proxy(cache_url=redis.url())
    ask(http, proxy, "before the freeze", bound=5)
    assert ask(http, proxy, "before the freeze", bound=5).headers["X-Computer-Use-Cache"] == "HIT"

    redis.freeze()
    try:
        for content in ("before the freeze", "during the freeze", "during the freeze"):
            assert_bypassed(ask(http, proxy, content, bound=10))
        assert http.get(proxy.url + "/healthz", timeout=30).status_code == 503
    finally:
        redis.thaw()
    assert wait_for_hit(http, proxy, "before the freeze", within=10) < 10
    assert http.get(proxy.url + "/healthz").status_code == 200


def test_redis_faults__a_restart_mid_run_bypasses_then_hits_resume(start_proxy, own_redis, http):
    redis = own_redis()
    proxy = start_proxy(cache_url=redis.url())
    ask(http, proxy, "across a restart", bound=5)

    redis.stop()
    assert_bypassed(ask(http, proxy, "across a restart", bound=5))
    health = http.get(proxy.url + "/healthz")
    assert health.status_code == 503 and health.json()["cache"]["available"] is False

    redis.start()  # the same port, empty (no persistence)
    began = time.monotonic()
    wait_for_hit(http, proxy, "across a restart", within=10)
    assert time.monotonic() - began < 10
    assert http.get(proxy.url + "/healthz").status_code == 200


def test_redis_faults__the_proxy_starts_while_redis_is_down(start_proxy, own_redis, http):
    port = free_port()
    proxy = start_proxy(cache_url=f"redis://127.0.0.1:{port}/0")
    assert_bypassed(ask(http, proxy, "redis comes later", bound=5))

    own_redis(port=port)
    assert wait_for_hit(http, proxy, "redis comes later", within=10) < 10


def test_redis_faults__a_dead_redis_is_not_asked_on_every_request(start_proxy, http, monkeypatch):
    """The circuit breaker: after a failure, requests bypass at once until the retry interval."""
    proxy = start_proxy(cache_url=f"redis://127.0.0.1:{free_port()}/0")
    store = proxy.store
    attempts = []
    original = store.client.execute_command
    monkeypatch.setattr(store.client, "execute_command",
                        lambda *args, **options: attempts.append(args[0]) or original(*args, **options))
    store.breaker.retry_seconds = 30

    assert_bypassed(ask(http, proxy, "breaker 0", bound=5))
    assert attempts  # the lookup (or the background purge) found Redis gone
    attempts.clear()
    for n in range(1, 5):
        assert_bypassed(ask(http, proxy, f"breaker {n}", bound=5))
    assert attempts == []


@pytest.mark.parametrize("url", ["http://user:pw@host/0", "redis://host:port/0", "redis://host/db",
                                 "unix://relative/path"])
def test_config__a_bad_cache_url_stops_start_up_naming_the_variable(url):
    with pytest.raises(SettingsError) as raised:
        load_settings({"CACHE_URL": url})
    message = str(raised.value)
    assert message.startswith("CACHE_URL=") and "\n" not in message
    assert "pw" not in message


@pytest.mark.parametrize("url", ["", "redis://localhost:6379/0", "rediss://user:pw@cache.example:6380/2",
                                 "unix:///run/redis/redis.sock?db=1", "redis://[::1]:6379"])
def test_config__cache_urls_that_select_a_store(url):
    assert load_settings({"CACHE_URL": url}).cache_url == url


def test_redis_store__tls_through_rediss(start_proxy, own_redis, http):
    redis = own_redis(password=PASSWORD, tls=True)
    proxy = start_proxy(cache_url=redis.url())

    assert ask(http, proxy, "over TLS", bound=5).headers["X-Computer-Use-Cache"] == "MISS"
    assert ask(http, proxy, "over TLS", bound=5).headers["X-Computer-Use-Cache"] == "HIT"
    stats = http.get(proxy.url + "/cache/stats").json()
    assert stats["entries"] == 1 and stats["db_path"].startswith("rediss://:***@127.0.0.1:")


def test_redis_store__through_a_unix_socket(start_proxy, own_redis, http):
    redis = own_redis(password=PASSWORD, unix=True)
    proxy = start_proxy(cache_url=redis.url(db=3))

    assert ask(http, proxy, "over a socket", bound=5).headers["X-Computer-Use-Cache"] == "MISS"
    assert ask(http, proxy, "over a socket", bound=5).headers["X-Computer-Use-Cache"] == "HIT"
    assert http.get(proxy.url + "/healthz").json()["cache"]["db_path"].startswith("unix://:***@/")
