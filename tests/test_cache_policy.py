"""The pure cache decision and key, without HTTP (fast); the same promises are proven over HTTP in
test_api_cache_key.py and test_api_cache_controls.py."""

from __future__ import annotations

import hashlib
import json

import pytest

import cache_policy
import config
from helpers import chat_body


def original_key(mode: str, body: dict, ignore: tuple[str, ...] = ()) -> str:
    """The key as ORIGINAL.md specifies it, computed independently of cache_policy."""
    skipped = {"stream", "stream_options", "cache", "cache_control", "metadata", *ignore}
    payload = {"mode": mode, **{k: v for k, v in body.items() if k not in skipped}}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decide(body: dict, bypass_header: bool = False, mode: str = "chat", **overrides):
    return cache_policy.decide(config.load_settings({}, **overrides), mode, body, bypass_header=bypass_header)


@pytest.mark.parametrize("body", [
    chat_body(),
    chat_body("Klicke auf «Weiter» — 東京 🚀"),
    chat_body(temperature=0.2, tools=[{"type": "function", "function": {"name": "click"}}]),
])
@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_decide__key_is_the_originals(body, mode):
    decision = decide(body, mode=mode)
    assert decision.key == original_key(mode, body)
    assert decision.canonical == json.dumps({"mode": mode, **body}, sort_keys=True,
                                            separators=(",", ":"), ensure_ascii=False)


def test_decide__lone_surrogate_hashes_instead_of_crashing():
    decision = decide(json.loads('{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'))
    assert len(decision.key) == 64


def test_decide__ignore_keys_setting():
    plain = decide(chat_body(), cache_ignore_keys=("user",))
    with_user = decide(chat_body(user="u-1"), cache_ignore_keys=("user",))
    assert plain.key == with_user.key


@pytest.mark.parametrize("body, header, reason", [
    (chat_body(), True, "X-Cache-Bypass requested"),
    (chat_body(cache=False), False, "cache disabled for request"),
    (chat_body(cache="off"), False, "cache disabled for request"),
    (chat_body(cache_control={"enabled": False}), False, "cache disabled for request"),
    (chat_body(cache_control={"enabled": "no"}), False, "cache disabled for request"),
    (chat_body(metadata={"cache": False}), False, "cache disabled for request"),
    (chat_body(metadata={"cache_enabled": "0"}), False, "cache disabled for request"),
    (chat_body("password: hunter2hunter2"), False, "request appears to contain credentials or secrets"),
])
def test_decide__bypass_reasons(body, header, reason):
    decision = decide(body, bypass_header=header)
    assert (decision.read, decision.write, decision.reason) == (False, False, reason)
    assert decision.key == original_key("chat", body)


def test_decide__switch_order_cache_first():
    # "cache" is read first: it wins over a later switch that says the opposite.
    assert decide(chat_body(cache=True, metadata={"cache": False})).reason is None
    assert decide(chat_body(cache=False, cache_control={"enabled": True})).reason == "cache disabled for request"
    assert decide(chat_body(cache_control={"enabled": True}, metadata={"cache": False})).reason is None


def test_decide__cache_true_overrides_disabled_setting():
    assert decide(chat_body(cache=True), cache_enabled=False).write
    assert decide(chat_body(), cache_enabled=False).reason == "cache disabled for request"


@pytest.mark.parametrize("model, allow, deny, cacheable", [
    ("openai/gpt-4o", ("openai/*",), (), True),
    ("anthropic/claude", ("openai/*",), (), False),
    ("openai/gpt-4o:free", (), ("*:free",), False),
    ("openai/gpt-4o", ("openai/*",), ("openai/gpt-4o",), False),
    ("x/y", (), (), True),
])
def test_decide__model_lists(model, allow, deny, cacheable):
    decision = decide(chat_body(model=model), cache_model_allowlist=allow, cache_model_denylist=deny)
    assert decision.write is cacheable
    if not cacheable:
        assert decision.reason == f"model is not cacheable: {model}"


def test_decide__input_size_limit_counts_the_canonical_payload():
    body = chat_body("x")
    size = len(decide(body).canonical)
    assert decide(body, cache_max_input_chars=size).write
    assert decide(body, cache_max_input_chars=size - 1).reason == "request is too large for cache"


@pytest.mark.parametrize("text", [
    "api_key=abcdefgh1", "API-KEY: 'abcdefgh12'", "apikey = abcdefgh", "secret:abcdefgh",
    "my password: hunter2hunter2", "passwd=12345678", "access_token: tok_abcdefgh",
    "refresh-token=rt_abcdefgh", "private_key: MIIEvQIBADANBg",
])
def test_contains_credentials__original_patterns(text):
    assert cache_policy.contains_credentials(text)


@pytest.mark.parametrize("text", [
    "the api key is in the vault", "password: short", "secret = 'a b c d e f'", "tokens: 12345678",
])
def test_contains_credentials__ordinary_text(text):
    assert not cache_policy.contains_credentials(text)


@pytest.mark.parametrize("body, forwarded", [
    ({"model": "m", "cache": True}, {"model": "m"}),
    ({"model": "m", "cache_control": {"enabled": False}}, {"model": "m"}),
    ({"model": "m", "cache_control": {"enabled": False, "ttl": 5}},
     {"model": "m", "cache_control": {"enabled": False, "ttl": 5}}),
    ({"model": "m", "cache_control": {"type": "ephemeral"}}, {"model": "m", "cache_control": {"type": "ephemeral"}}),
    ({"model": "m", "metadata": {"cache": False}}, {"model": "m"}),
    ({"model": "m", "metadata": {"cache_enabled": True, "user": "u"}}, {"model": "m", "metadata": {"user": "u"}}),
    ({"model": "m", "metadata": {"user": "u"}}, {"model": "m", "metadata": {"user": "u"}}),
])
def test_strip_proxy_controls(body, forwarded):
    original = json.loads(json.dumps(body))
    assert cache_policy.strip_proxy_controls(body) == forwarded
    assert body == original  # the caller's body is not changed
