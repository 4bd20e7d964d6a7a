"""Every API on Redis, over HTTP with the vendors' SDKs: Messages (anthropic) and Responses (openai)
miss then hit, /cache/stats and /metrics break them down by API with the same figures as on
SQLite, a near hit on screenshots is found through Redis's near index, and entries of every API
move between Redis and SQLite through `flask cache export` / `import`.
"""

from __future__ import annotations

import base64
import json

import anthropic
import openai
import pytest

import screens
from apis import API_BY_MODE
from helpers import completion_body
from test_stats_by_api import drive, wait_for

STATUS = "X-Computer-Use-Cache"
CLAUDE = "claude-sonnet-4-5"


@pytest.fixture
def redis_proxy(start_proxy, redis_server, redis_prefix, tmp_path):
    """start(**overrides) -> a real proxy whose store is the test's Redis (its own prefix)."""
    return lambda **overrides: start_proxy(cache_url=redis_server.url(), cache_redis_prefix=redis_prefix,
                                           cache_db_path=str(tmp_path / "unused.sqlite3"), **overrides)


def by_api_settled(http, proxy) -> dict:
    """/cache/stats once the last request of ``drive`` (an embeddings miss) is counted."""
    return wait_for(lambda: (s := http.get(proxy.url + "/cache/stats").json())["by_api"].get("embeddings") and s)


def test_redis_store__messages_and_responses_miss_then_hit_and_count_by_api(redis_proxy, http):
    proxy = redis_proxy()
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0)
    gpt = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0)
    message = {"model": CLAUDE, "max_tokens": 64, "messages": [{"role": "user", "content": "open settings"}]}
    messages = [claude.messages.with_raw_response.create(**message) for _ in range(2)]
    responses = [gpt.responses.with_raw_response.create(model="gpt-4o", input="click the gear")
                 for _ in range(2)]

    assert [raw.headers[STATUS] for raw in messages] == ["MISS", "HIT"]
    assert [raw.headers[STATUS] for raw in responses] == ["MISS", "HIT"]
    assert messages[1].parse().model_dump() == messages[0].parse().model_dump()
    assert responses[1].parse().model_dump() == responses[0].parse().model_dump()
    # The response's id was stored too (a retrieval entry, mode "responses"): answered from Redis.
    retrieved = gpt.responses.with_raw_response.retrieve(responses[0].parse().id)
    assert retrieved.headers[STATUS] == "HIT" and retrieved.parse().id == responses[0].parse().id

    by_api = http.get(proxy.url + "/cache/stats").json()["by_api"]
    assert {api: (f["hits"], f["misses"]) for api, f in by_api.items()} == {
        "messages": (1, 1), "responses": (2, 1)}
    assert by_api["messages"]["tokens_saved"]["total"] > 0
    assert by_api["messages"]["cost_saved_usd"] > 0 and by_api["messages"]["unpriced_hits"] == 0
    assert by_api["responses"]["cost_saved_usd"] > 0  # gpt-4o: priced with genai-prices


def counted(breakdown: dict) -> dict:
    """Figures per API or model without the upstream time saved (measured, so never equal twice)."""
    return {name: {field: value for field, value in figures.items() if field != "time_saved_seconds"}
            for name, figures in breakdown.items()}


def test_redis_store__figures_by_api_match_sqlites_over_http(start_proxy, redis_proxy, fake_upstream, http):
    """The same requests on a SQLite proxy and on a Redis proxy: the same figures, API by API
    (saved money read from usage.cost, priced, and unpriced), in /cache/stats and /metrics."""
    stats, metrics = {}, {}
    for name, proxy in (("sqlite", start_proxy()), ("redis", redis_proxy())):
        drive(proxy, fake_upstream)
        stats[name] = by_api_settled(http, proxy)
        metrics[name] = [line for line in http.get(proxy.url + "/metrics").text.splitlines()
                         if line.startswith(("computer_use_cache_api_", "computer_use_cache_unpriced"))
                         and "_created" not in line]
    for breakdown in ("by_api", "by_model"):
        assert counted(stats["redis"][breakdown]) == counted(stats["sqlite"][breakdown])
    assert stats["redis"]["by_api"]["responses"]["unpriced_hits"] == 1
    assert stats["redis"]["unpriced_hits"] == stats["sqlite"]["unpriced_hits"] == 1
    assert 'computer_use_cache_api_hits_total{api="messages"} 2.0' in metrics["redis"]
    assert "computer_use_cache_unpriced_hits_total 1.0" in metrics["redis"]
    assert sorted(metrics["redis"]) == sorted(metrics["sqlite"])


def screenshot_message(clock: str) -> dict:
    """A Messages computer-use step: the task and a screenshot as a base64 image block."""
    png = base64.b64encode(screens.encoded(screens.desktop(2, clock=clock))).decode("ascii")
    return {"model": CLAUDE, "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Review the report and save it."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]}


def test_redis_store__near_hit_on_screenshots(redis_proxy, fake_upstream, http):
    """CACHE_MATCH=near on Redis: a screenshot whose clock moved is a near hit, for chat and
    Messages alike, and counted apart in total, by model and (as a hit) by API."""
    proxy = redis_proxy(cache_match="near")
    chat = [screens.agent_request([screens.data_url(screens.desktop(step, clock=clock)) for step in range(3)],
                                  ["call_aaa111", "call_bbb222"]) for clock in ("10:41", "10:58")]
    stored = http.post(proxy.url + "/v1/chat/completions", json=chat[0], timeout=30)
    near = http.post(proxy.url + "/v1/chat/completions", json=chat[1], timeout=30)
    assert (stored.headers[STATUS], near.headers[STATUS]) == ("MISS", "HIT")
    assert near.headers["X-Computer-Use-Cache-Match"] == "near" and near.content == stored.content

    claude = anthropic.Anthropic(base_url=proxy.url, api_key="sk-client", max_retries=0)
    first = claude.messages.with_raw_response.create(**screenshot_message("10:41"))
    again = claude.messages.with_raw_response.create(**screenshot_message("10:59"))
    assert (first.headers[STATUS], again.headers[STATUS]) == ("MISS", "HIT")
    assert again.headers["X-Computer-Use-Cache-Match"] == "near"
    assert again.parse().model_dump() == first.parse().model_dump()
    assert (len(fake_upstream.calls()), len(fake_upstream.calls("/messages"))) == (1, 1)

    stats = http.get(proxy.url + "/cache/stats").json()
    assert stats["near_hits"] == 2 and stats["hits_served"] == 2
    assert stats["by_model"]["test/model-a"]["near_hits"] == 1 and stats["by_model"][CLAUDE]["near_hits"] == 1
    assert {api: (f["hits"], f["misses"]) for api, f in stats["by_api"].items()} == {
        "chat": (1, 1), "messages": (1, 1)}


def test_cli__entries_of_every_api_move_from_redis_to_sqlite_and_back(start_proxy, redis_proxy, fake_upstream,
                                                                      http, tmp_path):
    """`record_from_line` takes every API's entries (retrieval entries too) into either backend."""
    source = redis_proxy()
    drive(source, fake_upstream)
    http.post(source.url + "/v1/completions", json=completion_body("Say hello"))
    runner = source.app.test_cli_runner()
    exported = runner.invoke(args=["cache", "export", str(tmp_path / "redis.jsonl")])
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in (tmp_path / "redis.jsonl").read_text().splitlines()]
    assert {line["mode"] for line in lines} == set(API_BY_MODE)
    assert any(json.loads(line["request_json"])["mode"] == "responses.retrieve" for line in lines)

    sqlite = start_proxy(cache_db_path=str(tmp_path / "from-redis.sqlite3"))
    imported = sqlite.app.test_cli_runner().invoke(args=["cache", "import", str(tmp_path / "redis.jsonl")])
    assert imported.exit_code == 0, imported.output
    assert f"imported {len(lines)}, already present 0, invalid 0" in imported.output
    claude = anthropic.Anthropic(base_url=sqlite.url, api_key="k", max_retries=0)
    assert claude.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "go"}]).headers[STATUS] == "HIT"

    back = sqlite.app.test_cli_runner().invoke(args=["cache", "export", str(tmp_path / "sqlite.jsonl")])
    assert back.exit_code == 0, back.output
    source.store.clear()
    again = runner.invoke(args=["cache", "import", str(tmp_path / "sqlite.jsonl")])
    assert again.exit_code == 0 and f"imported {len(lines)}, already present 0, invalid 0" in again.output
    gpt = openai.OpenAI(base_url=source.url + "/v1", api_key="k", max_retries=0)
    raw = gpt.responses.with_raw_response.create(model="test/unknown-model", input="click it")
    assert raw.headers[STATUS] == "HIT"
    assert gpt.responses.with_raw_response.retrieve(raw.parse().id).headers[STATUS] == "HIT"
