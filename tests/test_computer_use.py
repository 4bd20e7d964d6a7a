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
    assert images == [{"base64_sha256": hashlib.sha256(base64.b64encode(png)).hexdigest(), "bytes": len(png),
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
    assert "base64_sha256" in shown.stdout and ";base64," not in shown.stdout
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
    assert '"base64_sha256"' in json.dumps(entry["request"])


# -- near matching (CACHE_MATCH=near / X-Cache-Match: near) --------------------------------------

def screen_urls(fmt: str = "PNG", **change) -> list[str]:
    """The three screenshots of agent_body, drawn again with ``change`` (clock=..., dialog=...)."""
    return [screens.data_url(screens.desktop(step, **change), fmt) for step in range(3)]


def tool_reply(call_id: str, step: int = 2, stream: bool = False):
    answer = screens.tool_call_answer(step, call_id, f"chatcmpl-{call_id}")
    if stream:
        return sse_reply(chunks_from_completion(answer, include_usage=True))
    return json_reply(answer)


def near_proxy(start_proxy, **overrides):
    return start_proxy(cache_match="near", **overrides)


def test_near__clock_change_hits_in_near_mode_and_misses_in_exact_mode(start_proxy, http, fake_upstream):
    exact = start_proxy()
    ticked = screens.agent_request(screen_urls(clock="10:58"), CALLS)
    assert post(http, exact, agent_body()).headers["X-Computer-Use-Cache"] == "MISS"
    assert post(http, exact, ticked).headers["X-Computer-Use-Cache"] == "MISS"

    near = near_proxy(start_proxy, cache_db_path=str(exact.store.path) + ".near")
    fake_upstream.enqueue(tool_reply("call_stored"))
    stored = post(http, near, agent_body())
    calls_before = len(fake_upstream.calls())
    again = post(http, near, ticked)

    assert stored.headers["X-Computer-Use-Cache"] == "MISS"
    assert again.headers["X-Computer-Use-Cache"] == "HIT"
    assert again.headers["X-Computer-Use-Cache-Match"] == "near"
    assert again.headers["X-Computer-Use-Cache-Key"] == stored.headers["X-Computer-Use-Cache-Key"]
    assert again.content == stored.content
    assert len(fake_upstream.calls()) == calls_before
    assert "X-Computer-Use-Cache-Match" in again.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize("change", [{"highlight": True}, {"dialog": True}])
def test_near__a_change_of_one_percent_or_more_misses(start_proxy, http, change):
    proxy = near_proxy(start_proxy)
    post(http, proxy, agent_body())
    changed = screens.agent_request(URLS[:2] + [screens.data_url(screens.desktop(2, **change))], CALLS)
    reply = post(http, proxy, changed)
    assert reply.headers["X-Computer-Use-Cache"] == "MISS"


def test_near__re_encoded_screenshots_hit(start_proxy, http):
    proxy = near_proxy(start_proxy)
    stored = post(http, proxy, agent_body())
    reply = post(http, proxy, screens.agent_request(screen_urls("JPEG", clock="10:44"), CALLS))
    assert (reply.headers["X-Computer-Use-Cache"], reply.headers["X-Computer-Use-Cache-Match"]) == ("HIT", "near")
    assert reply.content == stored.content


def test_near__different_tool_call_ids_hit(start_proxy, http, fake_upstream):
    proxy = near_proxy(start_proxy)
    stored = post(http, proxy, agent_body())
    other_ids = screens.agent_request(URLS, ["call_zzz999", "call_yyy888"])
    reply = post(http, proxy, other_ids)
    assert reply.headers["X-Computer-Use-Cache-Match"] == "near" and reply.content == stored.content
    # Ids are renumbered by first appearance: the same ids in another order are another request.
    swapped = screens.agent_request(URLS, list(reversed(CALLS)))
    swapped["messages"][4]["tool_call_id"] = CALLS[0]  # the first result now answers the other call
    assert post(http, proxy, swapped).headers["X-Computer-Use-Cache"] == "MISS"


def test_near__streamed_near_hit_replays_the_stored_tool_calls(start_proxy, fake_upstream):
    proxy = near_proxy(start_proxy)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-client", max_retries=0)
    fake_upstream.enqueue(tool_reply("call_from_run_1", stream=True))

    def run(shots):
        body = screens.agent_request(shots, CALLS)
        raw = client.chat.completions.with_raw_response.create(
            model=body["model"], messages=body["messages"], tools=body["tools"], temperature=0, stream=True)
        calls = {}
        for chunk in raw.parse():
            for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(delta.index, {"id": "", "arguments": ""})
                entry["id"] += delta.id or ""
                entry["arguments"] += delta.function.arguments or ""
        return raw.headers, calls

    first_headers, first_calls = run(URLS)
    upstream_calls = len(fake_upstream.calls())
    headers, calls = run(screen_urls(clock="10:59"))

    assert first_headers["X-Computer-Use-Cache"] == "MISS"
    assert (headers["X-Computer-Use-Cache"], headers["X-Computer-Use-Cache-Match"]) == ("HIT", "near")
    assert calls == first_calls == {0: {"id": "call_from_run_1",
                                        "arguments": json.dumps(screens.step_action(2))}}
    assert len(fake_upstream.calls()) == upstream_calls


def test_near__per_request_header_and_never_forwarded(start_proxy, http, fake_upstream):
    proxy = start_proxy()  # server mode exact
    stored = post(http, proxy, agent_body(), **{"X-Cache-Match": "near"})
    ticked = screens.agent_request(screen_urls(clock="10:47"), CALLS)
    asked = post(http, proxy, ticked, **{"X-Cache-Match": "Near"})
    plain = post(http, proxy, screens.agent_request(screen_urls(clock="10:48"), CALLS))

    assert stored.headers["X-Computer-Use-Cache"] == "MISS"
    assert plain.headers["X-Computer-Use-Cache"] == "MISS"  # exact mode: a different screen
    assert (asked.headers["X-Computer-Use-Cache"], asked.headers["X-Computer-Use-Cache-Match"]) == ("HIT", "near")
    assert all("x-cache-match" not in {name.lower() for name in call.headers} for call in fake_upstream.calls())


def test_near__exact_mode_entries_are_not_indexed(start_proxy, http):
    proxy = start_proxy()
    post(http, proxy, agent_body())
    ticked = screens.agent_request(screen_urls(clock="10:47"), CALLS)
    assert post(http, proxy, ticked, **{"X-Cache-Match": "near"}).headers["X-Computer-Use-Cache"] == "MISS"


@pytest.mark.parametrize("value", ["fuzzy", "exact,near", "1"])
def test_near__bad_x_cache_match_is_a_400(proxy, http, fake_upstream, value):
    reply = post(http, proxy, agent_body(), **{"X-Cache-Match": value})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_request_header"
    assert "X-Cache-Match" in reply.json()["error"]["message"]
    assert fake_upstream.calls() == []


def test_near__never_crosses_models_namespaces_or_sizes(start_proxy, http):
    proxy = near_proxy(start_proxy)
    post(http, proxy, agent_body())
    ticked = screen_urls(clock="10:47")
    other_model = screens.agent_request(ticked, CALLS, model="test/model-b")
    small = [screens.data_url(screens.desktop(step, size=(1024, 760))) for step in range(3)]
    assert post(http, proxy, other_model).headers["X-Computer-Use-Cache"] == "MISS"
    assert post(http, proxy, screens.agent_request(ticked, CALLS),
                **{"X-Cache-Namespace": "run-2"}).headers["X-Computer-Use-Cache"] == "MISS"
    assert post(http, proxy, screens.agent_request(small, CALLS)).headers["X-Computer-Use-Cache"] == "MISS"
    assert post(http, proxy, screens.agent_request(ticked, CALLS)).headers["X-Computer-Use-Cache"] == "HIT"


def test_near__closest_candidate_wins(start_proxy, http, fake_upstream):
    proxy = near_proxy(start_proxy, cache_screenshot_tolerance=0.02)
    fake_upstream.enqueue(tool_reply("call_clock"), tool_reply("call_button"))
    post(http, proxy, screens.agent_request(URLS[:2] + [screens.data_url(screens.desktop(2, clock="11:11"))], CALLS))
    post(http, proxy, screens.agent_request(URLS[:2] + [screens.data_url(screens.desktop(2, highlight=True))], CALLS))
    reply = post(http, proxy, agent_body())  # the original screen: a clock away from the first
    assert reply.headers["X-Computer-Use-Cache-Match"] == "near"
    assert reply.json()["choices"][0]["message"]["tool_calls"][0]["id"] == "call_clock"


def test_near__ignore_regions_and_tolerance(start_proxy, http):
    strict = near_proxy(start_proxy, cache_screenshot_tolerance=0.0)
    post(http, strict, agent_body())
    ticked = screens.agent_request(screen_urls(clock="10:47"), CALLS)
    assert post(http, strict, ticked).headers["X-Computer-Use-Cache"] == "MISS"
    regions = near_proxy(start_proxy, cache_screenshot_tolerance=0.0,
                         cache_screenshot_ignore_regions=(screens.CLOCK_REGION,),
                         cache_db_path=strict.store.path + ".regions")
    post(http, regions, agent_body())
    assert post(http, regions, ticked).headers["X-Computer-Use-Cache-Match"] == "near"


def test_near__counted_apart_in_stats_metrics_and_dashboard_feed(start_proxy, http):
    proxy = near_proxy(start_proxy)
    post(http, proxy, agent_body())
    post(http, proxy, agent_body())  # exact hit
    post(http, proxy, screens.agent_request(screen_urls(clock="10:47"), CALLS))  # near hit

    stats = http.get(proxy.url + "/cache/stats").json()
    metrics = http.get(proxy.url + "/metrics").text

    assert stats["hits_served"] == 2 and stats["near_hits"] == 1
    assert stats["by_model"]["test/model-a"]["near_hits"] == 1
    assert 'computer_use_cache_near_hits_total{route="/v1/chat/completions"} 1.0' in metrics
    assert 'computer_use_cache_requests_total{cache_status="HIT",route="/v1/chat/completions"} 2.0' in metrics


def test_near__unreadable_image_is_never_a_near_hit(start_proxy, http):
    proxy = near_proxy(start_proxy)
    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really" * 100).decode()
    post(http, proxy, screens.agent_request(URLS[:2] + [broken], CALLS))
    reply = post(http, proxy, screens.agent_request(URLS[:2] + [broken], ["call_other1", "call_other2"]))
    assert reply.headers["X-Computer-Use-Cache"] == "MISS"


def test_near__export_and_import_carry_the_near_index(start_proxy, http, tmp_path):
    proxy_a = near_proxy(start_proxy)
    post(http, proxy_a, agent_body())
    proxy_a.store.flush()
    exported = flask_cache("export", str(tmp_path / "near.jsonl"), db_path=proxy_a.store.path)
    [line] = (tmp_path / "near.jsonl").read_text().splitlines()
    assert {"near_group", "near_fingerprints"} <= set(json.loads(line))
    fresh = str(tmp_path / "b" / "cache.sqlite3")
    imported = flask_cache("import", str(tmp_path / "near.jsonl"), db_path=fresh)
    assert exported.returncode == 0 and imported.returncode == 0, imported.stderr

    proxy_b = near_proxy(start_proxy, cache_db_path=fresh)
    reply = post(http, proxy_b, screens.agent_request(screen_urls(clock="10:47"), CALLS))
    assert reply.headers["X-Computer-Use-Cache-Match"] == "near"


def test_near__import_refuses_a_broken_near_record(start_proxy, http, tmp_path):
    proxy = near_proxy(start_proxy)
    post(http, proxy, agent_body())
    proxy.store.flush()
    flask_cache("export", str(tmp_path / "near.jsonl"), db_path=proxy.store.path)
    record = json.loads((tmp_path / "near.jsonl").read_text())
    bad_group = {**record, "near_group": "not hex"}
    bad_prints = {**record, "near_fingerprints": base64.b64encode(b"junk").decode()}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad_group) + "\n" + json.dumps(bad_prints) + "\n")
    result = flask_cache("import", str(tmp_path / "bad.jsonl"), db_path=str(tmp_path / "c.sqlite3"))
    assert result.returncode == 1
    assert "line 1: near_group" in result.stderr and "line 2: near_fingerprints" in result.stderr


def test_exact_mode__never_decodes_a_screenshot(start_proxy, http, monkeypatch):
    import near_match
    decoded = []
    monkeypatch.setattr(near_match, "screen_print", lambda data: decoded.append(data))
    monkeypatch.setattr(near_match, "decoded_image", lambda payload: decoded.append(payload))
    proxy = start_proxy()
    ticked = screens.agent_request(screen_urls(clock="10:47"), CALLS)
    replies = [post(http, proxy, body) for body in (agent_body(), agent_body(), ticked, agent_body(stream=True))]
    assert [reply.headers["X-Computer-Use-Cache"] for reply in replies] == ["MISS", "HIT", "MISS", "HIT"]
    assert decoded == []


def test_near__never_crosses_client_partitions(start_proxy, http):
    proxy = near_proxy(start_proxy, upstream_api_key="")  # each client key its own partition
    alice, bob = {"Authorization": "Bearer alice-key-0001"}, {"Authorization": "Bearer bob-key-0002"}
    ticked = screens.agent_request(screen_urls(clock="10:47"), CALLS)
    assert post(http, proxy, agent_body(), **alice).headers["X-Computer-Use-Cache"] == "MISS"
    assert post(http, proxy, ticked, **bob).headers["X-Computer-Use-Cache"] == "MISS"
    assert post(http, proxy, screens.agent_request(screen_urls(clock="10:48"), CALLS),
                **alice).headers["X-Computer-Use-Cache-Match"] == "near"
