"""The fast key derivation and credential scan give exactly what the plain versions give."""

from __future__ import annotations

import base64
import json
import os
import re

from hypothesis import given, settings as hypothesis_settings, strategies as st

from cache_policy import CREDENTIAL_PATTERN, canonical_json, contains_credentials

LABELS = ["api_key", "API-KEY", "apikey", "Secret", "password", "PASSWD", "access_token",
          "refresh-token", "privateKey", "ſecret", "tokeN", "api key"]
PIECES = st.sampled_from(LABELS + [":", "=", " ", "\u00a0", "\n", '"', "'", "abcdefgh", "1234",
                                   "x" * 300, "\\", "é", "\ud800"])


def plain_canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text()
    | st.text(alphabet="ab+/=\"\\\n\x7f\x01é", min_size=250, max_size=400),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@given(JSON_VALUES)
@hypothesis_settings(max_examples=100, deadline=None)
def test_canonical_json__equals_json_dumps(value):
    assert canonical_json(value) == plain_canonical(value)


def test_canonical_json__screenshot_body_equals_json_dumps():
    shot = base64.b64encode(os.urandom(30000)).decode()
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{shot}"}},
        {"type": "text", "text": "é \"quoted\" \\ " * 40}]}]}
    assert canonical_json(body) == plain_canonical(body)


@given(st.lists(PIECES, max_size=30).map("".join))
@hypothesis_settings(max_examples=400, deadline=None)
def test_contains_credentials__flags_whatever_a_full_search_of_the_original_pattern_flags(text):
    # The widened scan (secret_scan) may flag more, never less than the original's pattern.
    if CREDENTIAL_PATTERN.search(text) is not None:
        assert contains_credentials(text)


def test_contains_credentials__found_after_a_long_image():
    shot = base64.b64encode(os.urandom(60000)).decode()
    text = canonical_json({"url": shot, "note": "my password = hunter22hunter"})
    assert contains_credentials(text)
    assert not contains_credentials(canonical_json({"url": shot, "note": "password please"}))
    assert re.search(CREDENTIAL_PATTERN, text)
