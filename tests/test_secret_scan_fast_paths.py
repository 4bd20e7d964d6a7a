"""The credential scan's shortcuts find exactly what the plain regex versions find.

* ``without_base64_data`` ends a payload at the next quote when everything up to it is base64,
  instead of walking the run with a regex;
* ``labelled_credential`` tries the label pattern only where a label starts, instead of a
  regex search from every position;
* ``find_secret_kind`` looks for a token prefix only when its rarest character is in the text.
"""

from __future__ import annotations

import base64
import random
import re
import time

from hypothesis import given, settings as hypothesis_settings, strategies as st

import secret_scan
from cache_policy import canonical_json
from secret_scan import find_secret_kind, labelled_credential, without_base64_data


def _reference_without_base64_data(text: str) -> str:
    """Every payload found with the regex run, as the scan did before."""
    pieces = []
    kept_from = 0
    start = text.find(";base64,")
    while start >= 0:
        payload_start = start + len(";base64,")
        payload_end = re.compile(r"[A-Za-z0-9+/=]*").match(text, payload_start).end()
        if secret_scan._opaque_payload(text, payload_start, payload_end):
            pieces.append(text[kept_from:payload_start])
            kept_from = payload_end
        start = text.find(";base64,", payload_end)
    if not pieces:
        return text
    pieces.append(text[kept_from:])
    return " ".join(pieces)


def _reference_labelled_credential(text: str) -> bool:
    if any(char in text for char in ("\u0130", "\u0131", "\u017f")):
        return secret_scan._LABEL_PATTERN_ANY_CASE.search(text) is not None
    return secret_scan._LABEL_PATTERN.search(text.lower()) is not None


_rng = random.Random(11)
_B64 = base64.b64encode(_rng.randbytes(600)).decode()

_PIECES = st.sampled_from([
    ";base64,", "data:image/png;base64,", '"', "\\", '\\"', " ", "\n", "\\n", "é", "İ", ";", ",",
    _B64[:3], _B64[:64], _B64, "====", "+/", "AKIA", "sk-", "ghp_", "x", "-", "_",
    "api_key", "API-KEY", "password", "passwd", "Secret", "access_token", "refresh-token",
    "private_key", "PRIVATE KEY", "ſecret", ":", "=", "'", "hunter2hunter2", "12345678",
])
_TEXTS = st.lists(_PIECES, max_size=30).map("".join)


@given(_TEXTS)
@hypothesis_settings(max_examples=1000, deadline=None)
def test_without_base64_data__same_text_as_the_regex_run(text):
    assert without_base64_data(text) == _reference_without_base64_data(text)


@given(_TEXTS)
@hypothesis_settings(max_examples=1000, deadline=None)
def test_labelled_credential__same_verdict_as_a_full_search(text):
    assert labelled_credential(text) == _reference_labelled_credential(text)


def _data_url(size: int, seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(random.Random(seed).randbytes(size)).decode()


def test_without_base64_data__screenshot_payloads_in_canonical_json():
    body = {"messages": [
        {"content": [{"type": "image_url", "image_url": {"url": _data_url(30_000, seed)}},
                     {"type": "text", "text": f"step {seed}: password = hunter{seed}hunter"}]}
        for seed in range(3)]}
    text = canonical_json(body)

    stripped = without_base64_data(text)

    assert stripped == _reference_without_base64_data(text)
    assert len(stripped) < 2_000
    assert stripped.count("password = hunter") == 3


def test_without_base64_data__payload_followed_by_text_in_the_same_string():
    # Not a screenshot on its own: the payload is one word in a prompt, a key follows it.
    key = "ghp_" + "a1B2c3D4" * 5
    text = canonical_json({"content": f"img data:image/png;base64,{_B64} and then {key} ok"})

    assert without_base64_data(text) == _reference_without_base64_data(text)
    assert find_secret_kind(text) == "GitHub token"


def test_without_base64_data__many_markers_in_one_long_string_stay_linear():
    # Each marker is followed by a non-base64 character before the string's end: the quick
    # check fails once for the whole string and is not repeated per marker.
    text = canonical_json({"content": ";base64,AAAA!" * 40_000})

    started = time.perf_counter()
    stripped = without_base64_data(text)
    seconds = time.perf_counter() - started

    assert stripped == _reference_without_base64_data(text)
    # ~0.1 s; checking each marker's rest of the string again would take ~10 s.
    assert seconds < 2.0, f"took {seconds:.1f} s"


def _reference_find_secret_kind(text: str) -> str | None:
    """Every prefix of every kind searched for, as the scan did before it looked at gates."""
    text = without_base64_data(text)
    if labelled_credential(text):
        return "labelled credential"
    for kind in secret_scan.TOKEN_KINDS:
        for prefix in kind.prefixes:
            position = text.find(prefix)
            while position >= 0:
                match = kind.pattern.match(text, position)
                if match is not None and kind.looks_random(match.group(match.lastindex or 0)):
                    return kind.name
                position = text.find(prefix, position + 1)
    return None


_TOKEN_PIECES = st.sampled_from([
    "sk-", "AKIA", "ASIA", "ghp_", "gho_", "github_pat_", "xoxb-", "xoxp-", "AIza", "sk_live_",
    "rk_live_", "eyJ", ".", "Bearer ", "bearer ", "BEARER ", "-----BEGIN ", "RSA ", "PRIVATE KEY-----",
    "\n", " ", "_", "-", "A1b2C3d4E5f6G7h8", "0123456789ABCDEF", "zzzzzzzzzzzzzzzzzzzz", "é",
    # whole tokens of each kind, so that every kind is found now and then
    "sk-proj-A1b2C3d4E5f6G7h8I9j0", "AKIA0123456789ABCDEF", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6",
    "github_pat_A1b2C3d4E5f6G7h8I9j0K1", "xoxb-123456789012-A1b2C3d4", "sk_live_A1b2C3d4E5f6G7h8",
    "AIzaA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.A1b2C3d4E5f6G7h8",
    "Bearer A1b2C3d4E5f6G7h8I9", "-----BEGIN PRIVATE KEY-----\n" + "A1b2C3d4E5" * 5,
])


@given(st.lists(_TOKEN_PIECES, max_size=16).map("".join))
@hypothesis_settings(max_examples=1500, deadline=None)
def test_find_secret_kind__same_kind_as_searching_every_prefix(text):
    assert find_secret_kind(text) == _reference_find_secret_kind(text)


# -- bare base64 image data (Anthropic's image sources) ---------------------------------------

def _anthropic_body(data: str, text: str = "Click the button.") -> dict:
    return {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]}


def _decide(body: dict):
    import config
    from apis.messages import MESSAGES
    from cache_policy import decide
    settings = config.load_settings({})
    return decide(settings, "messages", body, images=MESSAGES.inline_images(body))


def test_without_bare_base64__cuts_each_payload_found_as_a_whole_run():
    payload = base64.b64encode(random.Random(3).randbytes(3000)).decode()
    text = canonical_json(_anthropic_body(payload))
    cut = secret_scan.without_bare_base64(text, [payload])
    assert payload not in cut and cut.replace(" ", "") == text.replace(payload, "").replace(" ", "")
    # Not a whole run (base64 on either side), or too short to matter: kept.
    assert secret_scan.without_bare_base64("A" + payload, [payload]) == "A" + payload
    assert secret_scan.without_bare_base64("x" + payload[:100], [payload[:100]]) == "x" + payload[:100]


def test_without_bare_base64__keeps_a_payload_a_label_could_reach_into():
    payload = base64.b64encode(random.Random(4).randbytes(3000)).decode()
    text = '{"api_key":"' + payload + '"}'
    assert secret_scan.without_bare_base64(text, [payload]) == text


def test_decide__a_credential_beside_an_anthropic_screenshot_still_bypasses():
    payload = base64.b64encode(random.Random(5).randbytes(200_000)).decode()
    assert _decide(_anthropic_body(payload)).reason is None
    leaked = _decide(_anthropic_body(payload, "my api_key: sk-live-0123456789abcdef0123"))
    assert leaked.reason == "request appears to contain credentials or secrets"


def test_decide__an_anthropic_screenshot_costs_the_scan_no_more_than_a_chat_one():
    """The scan leaves bare base64 image data out as it does data: URL payloads (it read every
    byte of an Anthropic screenshot before: ~10x the chat request's decision)."""
    import config
    from apis.chat import CHAT
    from cache_policy import decide
    payload = base64.b64encode(random.Random(6).randbytes(300_000)).decode()
    scanned = []
    original = secret_scan.find_secret_kind

    def recording(text, clean_strings=()):
        scanned.append(len(secret_scan.without_base64_data(text, clean_strings)))
        return original(text, clean_strings)

    import cache_policy
    cache_policy.contains_secret, saved = recording, cache_policy.contains_secret
    try:
        _decide(_anthropic_body(payload))
        chat = {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Click the button."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}}]}]}
        decide(config.load_settings({}), "chat", chat, images=CHAT.inline_images(chat))
    finally:
        cache_policy.contains_secret = saved
    messages_scanned, chat_scanned = scanned
    assert messages_scanned < 1000 and chat_scanned < 1000, scanned
