"""CACHE_IGNORE_PATTERNS: volatile text (a date line, a step counter) left out of the key, over
real HTTP; unset, keys are exactly the original's; a pattern that does not compile stops start-up."""

from __future__ import annotations

import pytest

import config
from cache_policy import IGNORED_TEXT, canonical_request, decide, message_text_slots
from helpers import chat_body
from test_config import STARTUP_COMMANDS, startup_error_line

DATE_PATTERN = r"Today is \d{4}-\d{2}-\d{2}\."


def dated(date: str, question: str = "Open the invoices folder.") -> dict:
    return chat_body(messages=[
        {"role": "system", "content": f"You are a desktop agent. Today is {date}. Be careful."},
        {"role": "user", "content": [{"type": "text", "text": question}]}])


def post(http, proxy, body):
    return http.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)


def test_ignore_patterns__two_system_prompts_with_different_dates_share_one_entry(start_proxy, http,
                                                                                  fake_upstream):
    proxy = start_proxy(cache_ignore_patterns=(DATE_PATTERN,))
    first = post(http, proxy, dated("2026-12-04"))
    second = post(http, proxy, dated("2026-12-05"))
    other = post(http, proxy, dated("2026-12-05", "Open the travel folder."))

    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert second.headers["X-Computer-Use-Cache-Key"] == first.headers["X-Computer-Use-Cache-Key"]
    assert other.headers["X-Computer-Use-Cache"] == "MISS"
    # The upstream gets the client's own text; only the key leaves the date out.
    assert "Today is 2026-12-04." in fake_upstream.calls()[0].json["messages"][0]["content"]
    stored = http.get(proxy.url + f"/cache/entries/{first.headers['X-Computer-Use-Cache-Key']}").json()
    assert stored["request"]["messages"][0]["content"] == f"You are a desktop agent. {IGNORED_TEXT} Be careful."


def test_ignore_patterns__unset_keys_are_the_original_ones(start_proxy, http):
    proxy = start_proxy()
    first, second = post(http, proxy, dated("2026-12-04")), post(http, proxy, dated("2026-12-05"))
    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "MISS")
    settings = config.load_settings({}, cache_ignore_patterns=(DATE_PATTERN,))
    plain = config.load_settings({})
    body = dated("2026-12-04")
    assert decide(plain, "chat", body).key == first.headers["X-Computer-Use-Cache-Key"]
    assert decide(settings, "chat", body).key != decide(plain, "chat", body).key
    assert body == dated("2026-12-04")  # the body itself is never changed


def test_message_text_slots__contents_parts_system_and_prompts():
    body = {"system": [{"type": "text", "text": "sys"}], "instructions": "ins", "prompt": ["p1", "p2"],
            "messages": [{"role": "user", "content": "plain"},
                         {"role": "user", "content": [{"type": "text", "text": "part"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "content": "result"}]},
                         {"role": "assistant", "content": None}],
            "model": "m", "temperature": 0}
    assert [holder[key] for holder, key in message_text_slots(body)] == [
        "sys", "ins", "p1", "p2", "plain", "part", "result"]


def test_canonical_request__every_pattern_applies_in_turn():
    settings = config.load_settings({"CACHE_IGNORE_PATTERNS": '["step \\\\d+", "\\\\d{2}:\\\\d{2}"]'})
    body = chat_body("At 10:41, step 7 of the run.")
    assert "At <cache-ignored>, <cache-ignored> of the run." in canonical_request(settings, "chat", body)


@pytest.mark.parametrize("raw, expected", [
    ('["a+", "b\\\\d"]', ("a+", "b\\d")),
    ("Today is \\d+\n\n  step \\d+  \n", ("Today is \\d+", "step \\d+")),
    ("[0-9]{4}-[0-9]{2}", ("[0-9]{4}-[0-9]{2}",)),  # starts like JSON, is one pattern
])
def test_load_settings__ignore_patterns_as_json_or_lines(raw, expected):
    assert config.load_settings({"CACHE_IGNORE_PATTERNS": raw}).cache_ignore_patterns == expected


def test_load_settings__a_pattern_that_does_not_compile_names_the_variable():
    with pytest.raises(config.SettingsError, match="CACHE_IGNORE_PATTERNS.*pattern 2"):
        config.load_settings({"CACHE_IGNORE_PATTERNS": "ok\n(unclosed"})
    with pytest.raises(config.SettingsError, match="CACHE_IGNORE_PATTERNS"):
        config.load_settings({}, cache_ignore_patterns=("[",))


@pytest.mark.parametrize("command", STARTUP_COMMANDS.values(), ids=STARTUP_COMMANDS.keys())
def test_startup__bad_ignore_pattern_stops_with_one_line_naming_it(command, tmp_path):
    line = startup_error_line(command, tmp_path, CACHE_IGNORE_PATTERNS="(unclosed")
    assert "CACHE_IGNORE_PATTERNS" in line and "does not compile" in line


@pytest.mark.parametrize("name, raw", [
    ("CACHE_MATCH", "fuzzy"), ("CACHE_SCREENSHOT_TOLERANCE", "1.5"),
    ("CACHE_SCREENSHOT_IGNORE_REGIONS", "0.9,0.9,0.8,1"), ("CACHE_SCREENSHOT_IGNORE_REGIONS", "0,0,1"),
])
def test_load_settings__bad_near_settings_name_the_variable(name, raw):
    with pytest.raises(config.SettingsError, match=name):
        config.load_settings({name: raw})
