"""The credential check: every kind of bare token is caught, ordinary coding prompts are not.

The values below are made up with the real shapes (lengths, alphabets, prefixes); none is a
live credential.
"""

from __future__ import annotations

import base64
import json
import random
import string
import time

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from cache_policy import CREDENTIAL_PATTERN, canonical_json, canonical_payload, decide
from config import load_settings
from helpers import chat_body
from secret_scan import contains_secret, find_secret_kind, labelled_credential, without_base64_data

CREDENTIAL_REASON = "request appears to contain credentials or secrets"

_rng = random.Random(20261128)


def _random(alphabet: str, length: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(length))


ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
HEX = "0123456789abcdef"
BASE64URL = ALNUM + "-_"


def _b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


JWT = ".".join([_b64url({"alg": "HS256", "typ": "JWT"}),
                _b64url({"sub": "1234567890", "name": "Jane", "iat": 1516239022}),
                _random(BASE64URL, 43)])
PEM_BODY = "\n".join(_random(ALNUM + "+/", 64) for _ in range(6))

TRUE_POSITIVES = [
    ("OpenAI legacy key", "sk-" + _random(ALNUM, 20) + "T3BlbkFJ" + _random(ALNUM, 20)),
    ("OpenAI project key", "sk-proj-" + _random(BASE64URL, 156)),
    ("OpenAI service account key", "sk-svcacct-" + _random(BASE64URL, 120)),
    ("OpenRouter key", "sk-or-v1-" + _random(HEX, 64)),
    ("Anthropic key", "sk-ant-api03-" + _random(BASE64URL, 93) + "AA"),
    ("sk- hex key (DeepSeek style)", "sk-" + _random(HEX, 32)),
    ("AWS access key id", "AKIA" + _random(UPPER_DIGITS, 16)),
    ("AWS temporary key id", "ASIA" + _random(UPPER_DIGITS, 16)),
    ("GitHub personal token", "ghp_" + _random(ALNUM, 36)),
    ("GitHub OAuth token", "gho_" + _random(ALNUM, 36)),
    ("GitHub user-to-server token", "ghu_" + _random(ALNUM, 36)),
    ("GitHub server-to-server token", "ghs_" + _random(ALNUM, 36)),
    ("GitHub refresh token", "ghr_" + _random(ALNUM, 36)),
    ("GitHub fine-grained token", "github_pat_" + _random(ALNUM, 22) + "_" + _random(ALNUM, 59)),
    ("Slack bot token", "xoxb-" + _random(string.digits, 12) + "-" + _random(string.digits, 13)
     + "-" + _random(ALNUM, 24)),
    ("Slack user token", "xoxp-" + _random(string.digits, 12) + "-" + _random(string.digits, 12)
     + "-" + _random(string.digits, 13) + "-" + _random(HEX, 32)),
    ("Google API key", "AIza" + _random(BASE64URL, 35)),
    ("Stripe live secret key", "sk_live_" + _random(ALNUM, 24)),
    ("Stripe live restricted key", "rk_live_" + _random(ALNUM, 24)),
    ("JWT", JWT),
    ("Bearer header", "Authorization: Bearer " + _random(ALNUM, 40)),
    ("bearer, lower case", "curl -H 'authorization: bearer " + _random(ALNUM + "._-", 32) + "'"),
    ("RSA private key", "-----BEGIN RSA PRIVATE KEY-----\n" + PEM_BODY + "\n-----END RSA PRIVATE KEY-----"),
    ("PKCS#8 private key", "-----BEGIN PRIVATE KEY-----\n" + PEM_BODY + "\n-----END PRIVATE KEY-----"),
    ("OpenSSH private key", "-----BEGIN OPENSSH PRIVATE KEY-----\n" + PEM_BODY + "\n-----END OPENSSH PRIVATE KEY-----"),
    ("EC private key", "-----BEGIN EC PRIVATE KEY-----\n" + PEM_BODY + "\n-----END EC PRIVATE KEY-----"),
    ("encrypted private key", "-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + PEM_BODY),
    # The original server's labelled pattern keeps working.
    ("labelled api key", "api_key=" + _random(ALNUM, 24)),
    ("labelled password", 'password: "correct-horse-battery"'),
    ("labelled secret", "CLIENT SECRET = '" + _random(ALNUM, 16) + "'"),
]


def _in_prompt(token: str) -> dict:
    return chat_body(f"My setup is below, why does the call fail?\n{token}\nThanks!")


@pytest.mark.parametrize("label,token", TRUE_POSITIVES, ids=[row[0] for row in TRUE_POSITIVES])
def test_decide__bypasses_a_request_carrying_each_kind_of_credential(label, token):
    decision = decide(load_settings({}), "chat", _in_prompt(token))

    assert decision.bypass
    assert decision.reason == CREDENTIAL_REASON


@pytest.mark.parametrize("label,token", TRUE_POSITIVES, ids=[row[0] for row in TRUE_POSITIVES])
def test_find_secret_kind__finds_tokens_in_tool_results_and_at_the_edges(label, token):
    body = chat_body(messages=[
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": token},
    ])
    canonical = canonical_json(canonical_payload("chat", body, frozenset()))

    assert find_secret_kind(canonical) is not None
    assert contains_secret(token)  # the bare value, nothing around it


def _png_data_url(size: int) -> str:
    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    payload = header + random.Random(size).randbytes(size)
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def _jpeg_data_url(size: int) -> str:
    payload = b"\xff\xd8\xff\xe0\x00\x10JFIF" + random.Random(size + 1).randbytes(size)
    return "data:image/jpeg;base64," + base64.b64encode(payload).decode()


ORDINARY_PROMPTS = [
    ("password as a variable name", """
def change_password(user, new_password):
    if not validate_password(new_password):
        raise ValueError("password too weak")
    user.password_hash = hash_password(new_password)
    send_password_changed_email(user)
"""),
    ("password field in a form", "<input type=\"password\" name=\"password\" autocomplete=\"current-password\">"),
    ("reading a secret from the environment", 'token = os.environ["GITHUB_TOKEN"]\nheaders = {"Authorization": f"Bearer {token}"}'),
    ("placeholders in docs", "curl https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"\n"
     "Replace Bearer <token> or Bearer YOUR_API_KEY_HERE with your key, e.g. sk-... or sk-proj-..."),
    ("git SHAs", "git revert 3f2a9c1e8b7d4e6fa5b4c3d2e1f0a9b8c7d6e5f4 && git show a1b2c3d"),
    ("sha256 digests", "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
     "expected e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    ("UUIDs", "request 123e4567-e89b-12d3-a456-426614174000 and task-5f0c6a1e-3b7d-4c8e-9a2f-1d3e5b7c9a0f failed"),
    ("words starting with sk", "The skeleton of the sk-learn pipeline: sklearn.pipeline, sk-learn-model-selection, "
     "skip_keys, sketch-2024-version-with-many-parts, task-queue-worker-0123456789, risk-assessment-report-2024-final"),
    ("model names and versions", "Use claude-3-5-sonnet-20241022 or gpt-4o-2024-08-06; openrouter/auto is fine."),
    ("a JWT-looking prefix alone", "The header eyJhbGciOiJIUzI1NiJ9 decodes to {\"alg\":\"HS256\"}."),
    ("public keys and certificates", "-----BEGIN PUBLIC KEY-----\n" + PEM_BODY + "\n-----END PUBLIC KEY-----\n"
     "-----BEGIN CERTIFICATE-----\n" + PEM_BODY + "\n-----END CERTIFICATE-----"),
    ("a question about private key files", "Why does ssh say the -----BEGIN OPENSSH PRIVATE KEY----- line is invalid?"),
    ("AWS docs wording", "Create an access key (AKIA...) in IAM, then run aws configure."),
    ("CSS and numbers", "color: #ff8800; margin: 0 auto; transform: rotate(45deg); id=0x7fffffff"),
    ("base64 blob that is not a data URL", base64.b64encode(random.Random(7).randbytes(30000)).decode()),
]


@pytest.mark.parametrize("label,text", ORDINARY_PROMPTS, ids=[row[0] for row in ORDINARY_PROMPTS])
def test_decide__caches_ordinary_coding_prompts(label, text):
    decision = decide(load_settings({}, cache_max_input_chars=10**7), "chat", chat_body(text))

    assert decision.reason is None
    assert decision.read and decision.write


def _screenshot_body(image_bytes: int, url: callable = _png_data_url) -> dict:
    return chat_body(messages=[
        {"role": "system", "content": "You operate a computer. Answer with one tool call."},
        {"role": "user", "content": [
            {"type": "text", "text": "Step 14: click the Save button."},
            {"type": "image_url", "image_url": {"url": url(image_bytes), "detail": "high"}},
        ]},
    ])


@pytest.mark.parametrize("url", [_png_data_url, _jpeg_data_url], ids=["png", "jpeg"])
def test_decide__caches_screenshots_as_data_urls(url):
    body = _screenshot_body(300_000, url)

    decision = decide(load_settings({}, cache_max_input_chars=10**7), "chat", body)

    assert decision.reason is None


def test_find_secret_kind__still_sees_a_key_next_to_a_screenshot():
    body = _screenshot_body(300_000)
    body["messages"][1]["content"].append({"type": "text", "text": "ghp_" + _random(ALNUM, 36)})
    canonical = canonical_json(canonical_payload("chat", body, frozenset()))

    assert find_secret_kind(canonical) == "GitHub token"


def _best_of(runs: int, action) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def test_find_secret_kind__scans_a_400_kb_computer_use_body_in_a_few_ms():
    body = _screenshot_body(300_000)  # 400 KB once base64-encoded
    canonical = canonical_json(canonical_payload("chat", body, frozenset()))
    assert len(canonical) > 400_000

    seconds = _best_of(5, lambda: find_secret_kind(canonical))

    # Typically ~1-2 ms; the bound leaves room for a loaded CI machine.
    assert seconds < 0.015, f"scan took {seconds * 1000:.1f} ms"


def test_find_secret_kind__scans_400_kb_of_plain_text_without_regex_blowup():
    text = canonical_json({"content": ("def handler(event, context):\n    return {'ok': True}\n" * 8000)[:400_000]})

    seconds = _best_of(3, lambda: find_secret_kind(text))

    # Typically ~5-8 ms (the original's case-insensitive pattern alone took ~50 ms).
    assert seconds < 0.060, f"scan took {seconds * 1000:.1f} ms"


_TRICKY = st.sampled_from(list("apiksecrtwordnhvyAPIKSECRTWORDNHVY_-:= '\"\t\nİıſK\\x0ß")
                         + ["password", "api-key", "SECRET", "ſecret", "paſſword", "prıvate_key"])


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.lists(_TRICKY, max_size=40).map("".join))
def test_labelled_credential__flags_all_the_original_flagged_and_only_more_across_escapes(text):
    original = CREDENTIAL_PATTERN.search(text) is not None
    if original:
        assert labelled_credential(text)
    if "\\" not in text:
        assert labelled_credential(text) == original


def test_labelled_credential__sees_a_quoted_value_in_canonical_json():
    canonical = canonical_json(chat_body('config: password: "correct-horse-battery"'))

    assert CREDENTIAL_PATTERN.search(canonical) is None  # the original missed it
    assert labelled_credential(canonical)


def test_proxy__answers_but_never_stores_a_request_with_a_bare_key(openai_client, proxy, fake_upstream):
    leaked = "sk-or-v1-" + _random(HEX, 64)
    messages = [{"role": "user", "content": f"Is my OpenRouter key {leaked} still valid?"}]

    replies = [openai_client.chat.completions.with_raw_response.create(model="test/model-a", messages=messages)
               for _ in range(2)]

    for raw in replies:
        assert raw.headers["X-Computer-Use-Cache"] == "BYPASS"
        assert raw.headers["X-Computer-Use-Cache-Bypass-Reason"] == CREDENTIAL_REASON
        assert raw.parse().choices[0].message.content.startswith("echo: Is my OpenRouter key")
    assert len(fake_upstream.calls()) == 2
    assert proxy.store.stats()["entries"] == 0


# -- base64 data: URLs -------------------------------------------------------------------------
# Their payloads are left out of the scan (screenshots are most of an agent's request), but
# only where no credential can start: a value typed right after ";base64," is still found.

_B64_TEXT = base64.b64encode(random.Random(3).randbytes(300)).decode()
_DATA_URL_PIECES = st.sampled_from([
    ";base64,", "data:image/png;base64,", "data:text/plain;base64,", _B64_TEXT[:5], _B64_TEXT,
    "=", "==", ":", " ", '"', "'", "\\", "_", "-", "api", "key", "apikey", "api_key", "Secret",
    "password", "PASSWD", "access", "token", "refresh_token", "privatekey", "hunter2hunter2",
    "AKIA", "ghp_", "sk-", "0123456789ABCDEF",
])


@given(st.lists(_DATA_URL_PIECES, max_size=24).map("".join))
@hypothesis_settings(max_examples=1500, deadline=None)
def test_contains_secret__flags_what_the_original_flagged_around_base64_payloads(text):
    if CREDENTIAL_PATTERN.search(text) is not None:
        assert contains_secret(text)


TYPED_AFTER_THE_MARKER = [
    "data:text/plain;base64,password=hunter2hunter2",
    "data:text/plain;base64,api_key=" + _random(ALNUM, 24),
    "data:text/plain;base64,apikey=" + _random(ALNUM, 24),
    "data:;base64,SECRET: " + _random(ALNUM, 12),
    "data:;base64," + _B64_TEXT[:40] + "secret:" + _random(ALNUM, 12),
    "data:;base64," + _B64_TEXT[:40] + "passwd=" + _random(ALNUM, 12) + "==",
    "data:;base64," + _B64_TEXT[:40] + "access_token = " + _random(ALNUM, 12),
    "data:;base64,AKIA" + _random(UPPER_DIGITS, 16),
    "data:;base64,ghp_" + _random(ALNUM, 36),
    "data:;base64,sk-proj-" + _random(BASE64URL, 60),
    "data:;base64," + JWT,
]


@pytest.mark.parametrize("text", TYPED_AFTER_THE_MARKER)
def test_find_secret_kind__sees_a_credential_typed_in_a_base64_payload(text):
    assert find_secret_kind(canonical_json(chat_body(text))) is not None


@pytest.mark.parametrize("size", [30_000, 30_001, 30_002])  # no, one and two "=" of padding
@pytest.mark.parametrize("url", [_png_data_url, _jpeg_data_url], ids=["png", "jpeg"])
def test_without_base64_data__leaves_out_screenshot_payloads(url, size):
    canonical = canonical_json(canonical_payload("chat", _screenshot_body(size, url), frozenset()))

    assert len(without_base64_data(canonical)) < 1_000
