"""Canonical JSON's screenshot shortcut: same text as json.dumps, same key as the original, and
the screenshots it hands to the credential scan change no verdict."""

from __future__ import annotations

import base64
import hashlib
import json
import random

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import cache_policy
import config
import secret_scan
from cache_policy import canonical_json, canonical_payload, hash_canonical
from helpers import chat_body
from secret_scan import find_secret_kind, without_base64_data


def plain_canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_B64 = base64.b64encode(random.Random(5).randbytes(400)).decode()
# Long strings (the shortcut starts at 256 characters) made of data: URL parts and of what
# must not pass as a clean payload: quotes, backslashes, control characters, non-ASCII.
_PARTS = st.sampled_from([
    "data:image/png;base64,", ";base64,", "data:", _B64, _B64[:7], "=", "==", '"', "\\", "\n",
    "\x01", "\x7f", "é", "\ud800", " ", "password=hunter2hunter2", "ghp_" + "aB3" * 12, "-", "_",
])
_DATA_URLS = st.builds(
    lambda head, payload, tail: head + "".join(payload) + "".join(tail),
    st.sampled_from(["data:image/png;base64,", ";base64,", 'a"b;base64,', "\\n\n;base64,", "é;base64,",
                     "data:image/png;base64,;base64,"]),
    st.lists(st.sampled_from([_B64, _B64[:7], "=", "==", "+/"]), min_size=1, max_size=4),
    st.lists(_PARTS, max_size=2),  # mostly nothing: a clean payload; else what spoils it
)
_LONG_STRINGS = _DATA_URLS | _DATA_URLS | \
    st.lists(_PARTS, min_size=1, max_size=8).map("".join).filter(lambda text: len(text) >= 256)
_VALUES = st.recursive(
    _LONG_STRINGS | st.text(max_size=20) | st.integers() | st.none(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["a", "url", "z"]), children, max_size=3),
    max_leaves=8,
)


@given(_VALUES)
@hypothesis_settings(max_examples=800, deadline=None)
def test_canonical_json__with_data_urls_equals_json_dumps_and_lists_only_clean_payloads(value):
    clean: list[str] = []

    text = canonical_json(value, clean)

    assert text == plain_canonical(value)
    position = 0
    for string in clean:  # each occurs in the text, in this order, with an all-base64 payload
        position = text.index(json.dumps(string, ensure_ascii=False), position) + 1
        payload = string[string.index(";base64,") + len(";base64,"):]
        assert not payload.encode("ascii").translate(None, secret_scan._BASE64_BYTES)


@given(_VALUES)
@hypothesis_settings(max_examples=800, deadline=None)
def test_find_secret_kind__same_verdict_and_text_with_the_clean_strings(value):
    clean: list[str] = []
    text = canonical_json(value, clean)

    assert without_base64_data(text, clean) == without_base64_data(text)
    assert find_secret_kind(text, clean) == find_secret_kind(text)


def test_without_base64_data__a_wrong_or_missing_hint_is_only_slower():
    shot = "data:image/png;base64," + _B64 * 300
    text = canonical_json({"a": shot, "b": "x" * 300, "c": shot.replace("data:", "DATA:")})

    expected = without_base64_data(text)
    assert without_base64_data(text, ["data:image/png;base64," + _B64]) == expected  # not in the text
    assert without_base64_data(text, [shot, shot, shot]) == expected


def test_decide__screenshot_body_key_and_verdict_match_the_original():
    shots = ["data:image/png;base64," + base64.b64encode(random.Random(n).randbytes(90_000 + n)).decode()
             for n in range(3)]
    body = chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": shot}} for shot in shots]}])
    settings = config.load_settings({}, cache_max_input_chars=10**7)

    decision = cache_policy.decide(settings, "chat", body)

    text = plain_canonical({"mode": "chat", **body})
    assert decision.canonical == text
    assert decision.key == hashlib.sha256(text.encode()).hexdigest()
    assert decision.read and decision.write


@pytest.mark.parametrize("partition", [None, "ab" * 32])
@pytest.mark.parametrize("namespace", [None, "team-a", "x:y@z"])
@pytest.mark.parametrize("canonical", ['{"a":1}', '{"a":"東京 \ud800"}'])
def test_hash_canonical__prefixes_hashed_ahead_equal_the_joined_text(partition, namespace, canonical):
    text = canonical
    if namespace is not None:
        text = f"namespace:{namespace}\x00{text}"
    if partition is not None:
        text = f"partition {partition}\n{text}"

    assert hash_canonical(canonical, partition, namespace) == \
        hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def test_canonical_payload__unchanged_by_collecting_clean_strings():
    body = chat_body("data:image/png;base64," + _B64)
    payload = canonical_payload("chat", body, frozenset())

    assert canonical_json(payload, []) == canonical_json(payload) == plain_canonical(payload)


@given(_VALUES)
@hypothesis_settings(max_examples=500, deadline=None)
def test_forwarded_json__equals_json_dumps(value):
    assert cache_policy.forwarded_json(value) == json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("value", [{"a": float("nan"), "b": [1.5, -0.0, 10**30]}, "x" * 300, 'é"\\', None, 3])
def test_forwarded_json__equals_json_dumps_for_numbers_and_lone_values(value):
    assert cache_policy.forwarded_json(value) == json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("length", [0, 1, cache_policy._HASH_SLICE - 1, cache_policy._HASH_SLICE,
                                    cache_policy._HASH_SLICE + 1, 3 * cache_policy._HASH_SLICE + 7])
@pytest.mark.parametrize("filler", ["a", "é", "東", "🚀", "\ud800", "a\udfff"])
def test_hash_canonical__hashed_in_slices_equals_the_whole_text(length, filler):
    canonical = (filler * length)[:length]

    assert hash_canonical(canonical) == hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
