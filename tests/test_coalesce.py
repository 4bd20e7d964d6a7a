"""Single flight: concurrent identical cacheable misses make one upstream call (threads here;
real gunicorn worker processes in test_production_server.py)."""

from __future__ import annotations

import multiprocessing
import threading
import time

import openai

from coalesce import Coalescer
from fake_upstream import error_reply, json_reply
from helpers import chat_body, post_all


def test_coalesce__identical_concurrent_misses_make_one_upstream_call(start_proxy, fake_upstream):
    proxy = start_proxy()
    fake_upstream.default_delay = 0.5

    replies = post_all(proxy.url, [chat_body("one flight")] * 20)

    assert len(fake_upstream.calls()) == 1
    assert {reply.status_code for reply in replies} == {200}
    assert len({reply.content for reply in replies}) == 1
    statuses = sorted(reply.headers["X-Computer-Use-Cache"] for reply in replies)
    assert statuses == ["HIT"] * 19 + ["MISS"]
    followers = [reply for reply in replies if reply.headers["X-Computer-Use-Cache"] == "HIT"]
    assert all(reply.headers.get("X-Computer-Use-Cache-Coalesced") == "true" for reply in followers)


def test_coalesce__followers_of_a_failed_leader_go_upstream_at_once(start_proxy, fake_upstream):
    proxy = start_proxy()
    fake_upstream.default_delay = 0.5
    fake_upstream.enqueue(error_reply(500, "boom", "server_error"))

    began = time.monotonic()
    replies = post_all(proxy.url, [chat_body("leader fails")] * 8)
    elapsed = time.monotonic() - began

    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200] * 7 + [500]
    assert len(fake_upstream.calls()) == 8  # the failed leader, then each follower on its own
    assert elapsed < 1.8  # one wait for the leader plus one upstream round, not seven in a row


def test_coalesce__followers_of_an_uncacheable_answer_go_upstream(start_proxy, fake_upstream):
    proxy = start_proxy()
    fake_upstream.default_delay = 0.4
    fake_upstream.enqueue(json_reply({"id": "chatcmpl-empty", "object": "chat.completion", "choices": []}))

    began = time.monotonic()
    replies = post_all(proxy.url, [chat_body("nothing to store")] * 6)

    assert {reply.status_code for reply in replies} == {200}
    assert len(fake_upstream.calls()) == 6
    assert sum(reply.json()["id"] == "chatcmpl-empty" for reply in replies) == 1
    assert time.monotonic() - began < 1.6


def test_coalesce__a_streamed_follower_gets_a_replayed_stream(start_proxy, fake_upstream):
    proxy = start_proxy()
    fake_upstream.default_delay = 0.5
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    body = chat_body("stream me later")
    leader = threading.Thread(target=lambda: post_all(proxy.url, [body]))
    leader.start()
    assert fake_upstream.wait_for_requests(1)

    raw = client.chat.completions.with_raw_response.create(**body, stream=True)
    leader.join()
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)

    assert raw.headers["X-Computer-Use-Cache"] == "HIT"
    assert text == "echo: stream me later"
    assert len(fake_upstream.calls()) == 1


def test_coalesce__off_when_CACHE_COALESCE_is_0(start_proxy, fake_upstream):
    proxy = start_proxy(cache_coalesce=False)
    fake_upstream.default_delay = 0.4

    replies = post_all(proxy.url, [chat_body("every one upstream")] * 5)

    assert {reply.status_code for reply in replies} == {200}
    assert len(fake_upstream.calls()) == 5
    assert all("X-Computer-Use-Cache-Coalesced" not in reply.headers for reply in replies)


def _lead_in_another_process(lock_path: str, key: str, led, release) -> None:
    flight = Coalescer(lock_path, timeout_seconds=5).begin(key)
    led.put(flight.leader)
    release.wait(5)
    flight.release()


def test_coalescer__processes_meet_on_the_lock_file(tmp_path):
    lock_path = str(tmp_path / "cache.sqlite3.coalesce.lock")
    context = multiprocessing.get_context("fork")
    led, release = context.Queue(), context.Event()
    other = context.Process(target=_lead_in_another_process, args=(lock_path, "k1", led, release))
    other.start()
    try:
        assert led.get(timeout=5) is True
        coalescer = Coalescer(lock_path, timeout_seconds=5, poll_seconds=0.01)
        follower = coalescer.begin("k1")
        same_process_follower = coalescer.begin("k1")
        unrelated = coalescer.begin("k2")
        assert (follower.leader, same_process_follower.leader, unrelated.leader) == (False, False, True)
        threading.Timer(0.3, release.set).start()
        began = time.monotonic()
        assert follower.wait() is True
        assert same_process_follower.wait() is True
        assert 0.25 < time.monotonic() - began < 2
        unrelated.release()
    finally:
        release.set()
        other.join(5)


def test_coalescer__a_follower_stops_waiting_at_the_timeout(tmp_path):
    coalescer = Coalescer(str(tmp_path / "lock"), timeout_seconds=0.2)
    leader = coalescer.begin("k")
    follower = coalescer.begin("k")

    began = time.monotonic()
    assert follower.wait() is False
    assert time.monotonic() - began < 1
    leader.release()
    assert coalescer.begin("k").leader


def test_coalesce__an_unusable_lock_file_only_turns_coalescing_off(start_proxy, fake_upstream, tmp_path):
    (tmp_path / "cache.sqlite3.coalesce.lock").mkdir()  # os.open(O_RDWR) on it fails
    proxy = start_proxy()

    replies = post_all(proxy.url, [chat_body("no lock file")] * 3)

    assert {reply.status_code for reply in replies} == {200}
    assert len(fake_upstream.calls()) >= 1
