"""Figures per API: /cache/stats, /metrics, the entries API and the CLI; savings read from each API's
usage fields, and money saved priced with genai-prices when the answer carries no usage.cost."""

from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest

from fake_upstream import anthropic_message, chat_completion, json_reply
from metrics import saved_figures
from pricing import usage_cost

CLAUDE = "claude-sonnet-4-5"
MESSAGE_USAGE = {"input_tokens": 1000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 800,
                 "output_tokens": 100}


def wait_for(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def drive(proxy, fake_upstream):
    """chat: miss + hit (usage.cost given); messages: miss + 2 hits (priced); responses: miss +
    hit (unknown model: unpriced); embeddings: one miss."""
    chat = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.25}
    fake_upstream.enqueue(json_reply(chat_completion("hi", usage=usage)))
    for _ in range(2):
        chat.chat.completions.create(model="test/model-a", messages=[{"role": "user", "content": "hi"}])
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0)
    fake_upstream.enqueue(json_reply(anthropic_message("ok", model=CLAUDE, usage=MESSAGE_USAGE)))
    for _ in range(3):
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "go"}])
    for _ in range(2):
        chat.responses.create(model="test/unknown-model", input="click it")
    chat.embeddings.create(model="text-embedding-3-small", input="x")


def test_stats__broken_down_by_api_with_each_apis_usage_and_prices(proxy, fake_upstream, http):
    drive(proxy, fake_upstream)
    stats = wait_for(lambda: (s := http.get(proxy.url + "/cache/stats").json())["by_api"].get("embeddings") and s)
    by_api = stats["by_api"]
    assert {api: (f["hits"], f["misses"]) for api, f in by_api.items()} == {
        "chat": (1, 1), "messages": (2, 1), "responses": (1, 1), "embeddings": (0, 1)}
    assert by_api["chat"]["cost_saved_usd"] == 0.25  # the upstream's own usage.cost
    assert by_api["messages"]["tokens_saved"] == {"prompt": 3600, "completion": 200, "total": 3800}
    one_call = usage_cost(CLAUDE, {"prompt_tokens": 1800, "completion_tokens": 100, "cache_read_tokens": 800})
    assert one_call and by_api["messages"]["cost_saved_usd"] == pytest.approx(2 * one_call, abs=1e-6)
    assert by_api["responses"]["tokens_saved"]["total"] > 0
    assert by_api["responses"]["cost_saved_usd"] == 0 and by_api["responses"]["unpriced_hits"] == 1
    assert stats["unpriced_hits"] == 1
    assert stats["cost_saved_usd"] == pytest.approx(0.25 + 2 * one_call, abs=1e-6)


def test_metrics__requests_and_savings_by_api(proxy, fake_upstream, http):
    drive(proxy, fake_upstream)
    wait_for(lambda: http.get(proxy.url + "/cache/stats").json()["by_api"].get("embeddings"))
    text = http.get(proxy.url + "/metrics").text
    assert 'computer_use_cache_api_requests_total{api="messages",cache_status="HIT"} 2.0' in text
    assert 'computer_use_cache_api_requests_total{api="responses",cache_status="MISS"} 1.0' in text
    assert 'computer_use_cache_api_hits_total{api="messages"} 2.0' in text
    assert 'computer_use_cache_api_tokens_saved_total{api="messages",kind="prompt"} 3600.0' in text
    assert "computer_use_cache_unpriced_hits_total 1.0" in text
    assert 'computer_use_cache_api_cost_saved_usd_total{api="chat"} 0.25' in text


def test_entries_and_cli__show_each_entrys_api(proxy, fake_upstream, http):
    drive(proxy, fake_upstream)
    entries = http.get(proxy.url + "/cache/entries").json()["data"]
    # Responses also keep a retrieval entry per response (GET /v1/responses/{id}).
    assert sorted(entry["mode"] for entry in entries) == [
        "chat", "embeddings", "messages", "responses", "responses"]
    result = proxy.app.test_cli_runner().invoke(args=["cache", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert {line.split()[1] for line in lines} == {"chat", "embeddings", "messages", "responses"}
    assert any("messages" in line and CLAUDE in line and "go" in line for line in lines)
    assert any("responses" in line and "click it" in line for line in lines)


@pytest.mark.parametrize("model, priced", [
    ("claude-sonnet-4-5", True), ("anthropic/claude-sonnet-4.5", True), ("gpt-4o", True),
    ("openai/gpt-4o", True), ("test/model-a", False), ("", False), (None, False)])
def test_usage_cost__prices_known_models_and_never_guesses(model, priced):
    cost = usage_cost(model, {"prompt_tokens": 1000, "completion_tokens": 100})
    assert (cost is not None and cost > 0) is priced
    if not priced:
        assert cost is None


def test_saved_figures__the_upstreams_cost_wins_and_unknown_models_are_unpriced():
    said = saved_figures({"prompt_tokens": 10, "completion_tokens": 1, "cost_usd": 0.5}, "gpt-4o")
    assert said["cost_usd"] == 0.5 and not said["unpriced"]
    priced = saved_figures({"prompt_tokens": 1000, "completion_tokens": 100, "cost_usd": None}, "gpt-4o")
    assert priced["cost_usd"] > 0 and not priced["unpriced"]
    unknown = saved_figures({"prompt_tokens": 1000, "completion_tokens": 100, "cost_usd": None}, "x/y")
    assert unknown["cost_usd"] == 0 and unknown["unpriced"]
    empty = saved_figures({"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None}, "x/y")
    assert not empty["unpriced"]  # nothing used, nothing left unpriced


def test_cli_import__accepts_every_apis_entries(proxy, fake_upstream, tmp_path):
    drive(proxy, fake_upstream)
    runner = proxy.app.test_cli_runner()
    exported = runner.invoke(args=["cache", "export", str(tmp_path / "dump.jsonl")])
    assert exported.exit_code == 0, exported.output
    modes = {json.loads(line)["mode"] for line in (tmp_path / "dump.jsonl").read_text().splitlines()}
    assert modes == {"chat", "messages", "responses", "embeddings"}
    proxy.store.clear()
    imported = runner.invoke(args=["cache", "import", str(tmp_path / "dump.jsonl")])
    assert imported.exit_code == 0, imported.output
    assert proxy.store.entry_count() == 5


def test_stats__a_database_from_before_apis_gets_per_api_figures_from_then_on(tmp_path):
    import sqlite3

    import store_schema
    from cache_store import SQLiteStore
    path = str(tmp_path / "v4.sqlite3")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                   "applied_at REAL NOT NULL)")
        for version, name, migrate in store_schema.MIGRATIONS[:4]:  # the schema before this issue
            migrate(db)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
        db.execute("INSERT INTO completions(cache_key, mode, model, request_json, response_json, created_at, "
                   "updated_at, hits, prompt_tokens, completion_tokens, cost_usd) "
                   "VALUES ('k', 'chat', 'm', '{}', '{}', 1, 1, 5, 9, 4, 0.25)")
    store = SQLiteStore(path, hit_flush_seconds=0)
    store.record_hit("k")
    stats = store.stats()
    assert stats["by_api"]["chat"]["hits"] == 1 and stats["by_api"]["chat"]["cost_saved_usd"] == 0.25
    assert stats["unpriced_hits"] == 0
    store.close()
