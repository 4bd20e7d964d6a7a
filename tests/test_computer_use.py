"""Computer use at the defaults, over real HTTP: screenshots never make a request too large, the
key still hashes their pixels, and the stored request keeps each one as a short reference."""

from __future__ import annotations

import base64
import hashlib
import json

import openai
import pytest

import screens
from cache_policy import canonical_json
from fake_upstream import chunks_from_completion, json_reply, sse_reply
from test_cli import flask_cache

SHOTS = [screens.desktop(step) for step in range(3)]
PNGS = [screens.encoded(shot) for shot in SHOTS]
URLS = ["data:image/png;base64," + base64.b64encode(png).decode() for png in PNGS]
CALLS = ["call_aaa111", "call_bbb222"]


def agent_body(**extra) -> dict:
    return screens.agent_request(URLS, CALLS, **extra)


def post(http, proxy, body, **headers):
    return http.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def original_key(body: dict) -> str:
    """The original server's key: the SHA-256 of the canonical request, screenshots included."""
    payload = {name: value for name, value in body.items() if name not in ("stream", "stream_options")}
    payload["mode"] = "chat"
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def test_screenshots__request_of_three_screenshots_misses_then_hits_at_the_defaults(proxy, http,
                                                                                  fake_upstream):
    body = agent_body()
    assert len(json.dumps(body)) > 300_000  # far past CACHE_MAX_INPUT_CHARS=120000 as text

    first, second = post(http, proxy, body), post(http, proxy, body)

    assert first.headers["X-Computer-Use-Cache"] == "MISS", first.headers.get("X-Computer-Use-Cache-Bypass-Reason")
    assert second.headers["X-Computer-Use-Cache"] == "HIT"
    assert second.headers["X-Computer-Use-Cache-Match"] == "exact"
    assert second.content == first.content
    assert first.headers["X-Computer-Use-Cache-Key"] == original_key(body)  # keys unchanged
    assert len(fake_upstream.calls()) == 1


def test_screenshots__streamed_request_misses_then_replays(proxy, http, fake_upstream):
    body = agent_body(stream=True)
    first = post(http, proxy, body)
    second = post(http, proxy, body)
    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert first.headers["X-Computer-Use-Cache-Key"] == original_key(body)
    assert b"data: [DONE]" in second.content
    assert len(fake_upstream.calls()) == 1


def test_screenshots__text_still_counts_against_the_limit(start_proxy, http):
    proxy = start_proxy(cache_max_input_chars=20_000)
    body = agent_body()
    body["messages"].append({"role": "user", "content": "x" * 30_000})
    reply = post(http, proxy, body)
    assert reply.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert reply.headers["X-Computer-Use-Cache-Bypass-Reason"] == "request is too large for cache"
    assert post(http, proxy, agent_body()).headers["X-Computer-Use-Cache"] == "MISS"


def test_screenshots__stored_entry_keeps_references_not_pixels(proxy, http):
    key = post(http, proxy, agent_body()).headers["X-Computer-Use-Cache-Key"]

    [listed] = http.get(proxy.url + "/cache/entries").json()["data"]
    entry = http.get(proxy.url + f"/cache/entries/{key}").json()

    assert listed["size"] < 20_000
    images = [part["image_url"]["url"] for message in entry["request"]["messages"]
              if isinstance(message["content"], list) for part in message["content"]
              if part["type"] == "image_url"]
    assert images == [{"bytes": len(png), "image_sha256": hashlib.sha256(png).hexdigest(),
                       "media_type": "image/png"} for png in PNGS]
    assert entry["request"]["cache_key"] == key
    assert entry["request"]["messages"][-1]["content"][0] == {"type": "text", "text": "Screenshot 2."}


def test_screenshots__show_export_and_import_keep_working(start_proxy, http, tmp_path):
    proxy_a = start_proxy()
    body = agent_body()
    key = post(http, proxy_a, body).headers["X-Computer-Use-Cache-Key"]
    proxy_a.store.flush()

    shown = flask_cache("show", key, db_path=proxy_a.store.path)
    exported = flask_cache("export", str(tmp_path / "cu.jsonl"), db_path=proxy_a.store.path)
    fresh = str(tmp_path / "b" / "cache.sqlite3")
    imported = flask_cache("import", str(tmp_path / "cu.jsonl"), db_path=fresh)

    assert shown.returncode == 0 and json.loads(shown.stdout)["request"]["cache_key"] == key
    assert "image_sha256" in shown.stdout and ";base64," not in shown.stdout
    assert exported.returncode == 0 and imported.returncode == 0, imported.stderr
    assert "imported 1, already present 0, invalid 0" in imported.stderr
    proxy_b = start_proxy(cache_db_path=fresh)
    again = post(http, proxy_b, body)
    assert again.headers["X-Computer-Use-Cache"] == "HIT"
    assert again.headers["X-Computer-Use-Cache-Key"] == key


def test_screenshots__bare_string_image_url_counts_as_an_image(start_proxy, http):
    proxy = start_proxy()
    body = agent_body()
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    part["image_url"] = part["image_url"]["url"]
    reply = post(http, proxy, body)
    assert reply.headers["X-Computer-Use-Cache"] == "MISS"
    entry = http.get(proxy.url + f"/cache/entries/{reply.headers['X-Computer-Use-Cache-Key']}").json()
    assert '"image_sha256"' in json.dumps(entry["request"])
