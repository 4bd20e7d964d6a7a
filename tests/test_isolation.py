"""Per-client-key partitions: with clients' own keys forwarded, nobody hits another key's entries."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from pathlib import Path

import openai
import pytest

from cache_policy import canonical_json, canonical_payload, decide, hash_canonical
from config import SettingsError, load_settings
from helpers import chat_body
from key_partition import load_or_create_secret

KEY_A = "sk-or-v1-" + "a1" * 32
KEY_B = "sk-or-v1-" + "b2" * 32
MESSAGES = [{"role": "user", "content": "Which button saves the form?"}]


def _client(proxy, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=api_key, max_retries=0)


def _ask(proxy, api_key: str, **extra):
    raw = _client(proxy, api_key).chat.completions.with_raw_response.create(
        model="test/model-a", messages=MESSAGES, **extra)
    return raw.headers["X-Computer-Use-Cache"], raw.headers["X-Computer-Use-Cache-Key"], raw


def _original_key(body: dict) -> str:
    """The original server's key, computed here from its definition."""
    payload = {name: value for name, value in body.items()
               if name not in ("stream", "stream_options", "cache", "cache_control", "metadata")}
    payload["mode"] = "chat"
    text = canonical_json(payload)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_partition__clients_with_different_keys_never_share_entries(start_proxy, fake_upstream):
    proxy = start_proxy(upstream_api_key="")

    a_first, a_key, _ = _ask(proxy, KEY_A)
    b_first, b_key, _ = _ask(proxy, KEY_B)
    a_again, _, _ = _ask(proxy, KEY_A)
    b_again, _, _ = _ask(proxy, KEY_B)

    assert (a_first, b_first, a_again, b_again) == ("MISS", "MISS", "HIT", "HIT")
    assert a_key != b_key
    sent = [call.headers["authorization"] for call in fake_upstream.calls()]
    assert sent == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]


def test_partition__requests_without_a_key_share_the_unpartitioned_cache(start_proxy, http):
    proxy = start_proxy(upstream_api_key="")
    url = proxy.url + "/v1/chat/completions"
    body = {"model": "test/model-a", "messages": MESSAGES}

    first = http.post(url, json=body)
    second = http.post(url, json=body)
    status_with_key, _, _ = _ask(proxy, KEY_A)

    assert first.status_code == second.status_code == 200
    assert first.headers["X-Computer-Use-Cache"] == "MISS"
    assert second.headers["X-Computer-Use-Cache"] == "HIT"
    assert status_with_key == "MISS"
    canonical = json.dumps({**body, "mode": "chat"}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    assert first.headers["X-Computer-Use-Cache-Key"] == hashlib.sha256(canonical.encode()).hexdigest()


def test_partition__streamed_requests_are_partitioned_too(start_proxy):
    proxy = start_proxy(upstream_api_key="")

    statuses = []
    for api_key in (KEY_A, KEY_B, KEY_A):
        with _client(proxy, api_key).chat.completions.with_streaming_response.create(
                model="test/model-a", messages=MESSAGES, stream=True) as response:
            statuses.append(response.headers["X-Computer-Use-Cache"])
            text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
        assert text == "echo: Which button saves the form?"

    assert statuses == ["MISS", "MISS", "HIT"]


def test_partition__share_across_keys_restores_one_cache_with_the_original_keys(start_proxy, tmp_path):
    proxy = start_proxy(upstream_api_key="", cache_share_across_keys=True)

    a_status, a_key, _ = _ask(proxy, KEY_A)
    b_status, b_key, _ = _ask(proxy, KEY_B)

    assert (a_status, b_status) == ("MISS", "HIT")
    assert a_key == b_key == _original_key({"model": "test/model-a", "messages": MESSAGES})
    assert not (tmp_path / "cache.sqlite3.secret").exists()


def test_partition__a_server_key_means_one_cache_with_keys_identical_to_the_original(
        start_proxy, fake_upstream, tmp_path):
    proxy = start_proxy(upstream_api_key="sk-server-" + "c3" * 24)

    a_status, a_key, _ = _ask(proxy, KEY_A, temperature=0.2)
    b_status, b_key, _ = _ask(proxy, KEY_B, temperature=0.2)

    assert (a_status, b_status) == ("MISS", "HIT")
    assert a_key == b_key == _original_key({"model": "test/model-a", "messages": MESSAGES, "temperature": 0.2})
    assert fake_upstream.calls()[0].headers["authorization"] == "Bearer sk-server-" + "c3" * 24
    assert not (tmp_path / "cache.sqlite3.secret").exists()


def test_decide__mixes_the_partition_into_the_key_only_when_given():
    settings = load_settings({})
    body = chat_body()
    canonical = canonical_json(canonical_payload("chat", body, frozenset({"stream", "metadata"})))

    shared = decide(settings, "chat", body)
    partitioned = decide(settings, "chat", body, partition="p" * 64)
    other = decide(settings, "chat", body, partition="q" * 64)

    assert shared.key == hash_canonical(canonical) == _original_key(body)
    assert len({shared.key, partitioned.key, other.key}) == 3
    assert partitioned.canonical == shared.canonical  # what is stored does not change


def test_partition__no_raw_client_key_is_ever_stored(start_proxy, tmp_path):
    proxy = start_proxy(upstream_api_key="")
    for api_key in (KEY_A, KEY_B):
        _ask(proxy, api_key)
        _ask(proxy, api_key)
        with _client(proxy, api_key).chat.completions.create(
                model="test/model-a", messages=[{"role": "user", "content": "stream me"}], stream=True) as stream:
            list(stream)
    proxy.store.flush()
    assert proxy.store.stats()["entries"] == 4

    files = [path for path in tmp_path.iterdir() if path.name.startswith("cache.sqlite3")]
    assert {path.name for path in files} >= {"cache.sqlite3", "cache.sqlite3-wal", "cache.sqlite3.secret"}
    for path in files:
        data = path.read_bytes()
        for api_key in (KEY_A, KEY_B):
            assert api_key.encode() not in data, path.name
            assert api_key[-20:].encode() not in data, path.name


def test_partition__secret_file_is_private_and_survives_restarts(start_proxy, tmp_path):
    first = start_proxy(upstream_api_key="")
    _, key_before, _ = _ask(first, KEY_A)
    secret_path = tmp_path / "cache.sqlite3.secret"
    secret = secret_path.read_bytes()
    first.stop()

    second = start_proxy(upstream_api_key="")
    status, key_after, _ = _ask(second, KEY_A)

    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert len(secret.strip()) == 64
    assert secret_path.read_bytes() == secret
    assert (status, key_after) == ("HIT", key_before)


def _load_secret_after(barrier, path: str, results) -> None:
    barrier.wait()
    results.put(load_or_create_secret(path))


def test_load_or_create_secret__concurrent_processes_agree_on_one_secret(tmp_path):
    context = multiprocessing.get_context("fork")
    path = str(tmp_path / "db" / "cache.sqlite3.secret")
    barrier = context.Barrier(8)
    results = context.Queue()
    workers = [context.Process(target=_load_secret_after, args=(barrier, path, results)) for _ in range(8)]
    for worker in workers:
        worker.start()
    secrets_seen = {results.get(timeout=10) for _ in workers}
    for worker in workers:
        worker.join(timeout=10)

    assert len(secrets_seen) == 1
    assert secrets_seen == {Path(path).read_bytes().strip()}
    assert sorted(os.listdir(tmp_path / "db")) == ["cache.sqlite3.secret"]  # no temporary left
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "db").st_mode) == 0o700


def test_partition__a_configured_secret_is_used_and_no_secret_file_written(start_proxy, tmp_path):
    shared_secret = "correct horse battery staple 0123456789"
    one = start_proxy(upstream_api_key="", cache_key_secret=shared_secret, cache_db_path=str(tmp_path / "one.sqlite3"))
    two = start_proxy(upstream_api_key="", cache_key_secret=shared_secret, cache_db_path=str(tmp_path / "two.sqlite3"))
    other = start_proxy(upstream_api_key="", cache_key_secret="another secret of enough length", cache_db_path=str(tmp_path / "x.sqlite3"))

    keys = [_ask(server, KEY_A)[1] for server in (one, two, other)]

    assert keys[0] == keys[1] != keys[2]
    assert not list(tmp_path.glob("*.secret"))


def test_settings__a_short_cache_key_secret_fails_naming_the_variable():
    with pytest.raises(SettingsError, match="CACHE_KEY_SECRET"):
        load_settings({"CACHE_KEY_SECRET": "short"})


def test_partition__an_unusable_secret_file_bypasses_the_cache_and_still_answers(start_proxy, tmp_path, caplog):
    (tmp_path / "cache.sqlite3.secret").mkdir()  # neither readable as a file nor replaceable
    proxy = start_proxy(upstream_api_key="")

    replies = [_ask(proxy, KEY_A) for _ in range(3)]

    for status, _, raw in replies:
        assert status == "BYPASS"
        assert raw.headers["X-Computer-Use-Cache-Bypass-Reason"].startswith(
            "cache unavailable: cannot read the cache key secret file")
        assert raw.parse().choices[0].message.content == "echo: Which button saves the form?"
    errors = [record for record in caplog.records if record.name == "computer_use_cache.partition"]
    assert len(errors) == 1
