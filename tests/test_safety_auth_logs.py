"""PROXY_API_KEYS client authentication, and logs that never carry keys, headers or bodies."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from werkzeug.serving import make_server

import openai
import pytest
import requests

import config
from conftest import make_settings
from fake_upstream import error_reply
from helpers import chat_body
from server import QuietRequestHandler, create_app

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
PROXY_KEY = "pk-team-3f9a1c2e7b5d4a60"
OTHER_PROXY_KEY = "pk-ci-9d8c7b6a5f4e3d21"
UPSTREAM_KEY = "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"
CLIENT_KEY = "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe-AAAA"
PROMPT_SECRET = "the launch code is tangerine-walrus-4417"


@pytest.fixture
def guarded(start_proxy):
    return start_proxy(proxy_api_keys=(PROXY_KEY, OTHER_PROXY_KEY), upstream_api_key=UPSTREAM_KEY)


@pytest.mark.parametrize("method, path", [("POST", CHAT), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                                          ("POST", "/chat/completions"), ("GET", "/models")])
def test_client_key__missing_or_wrong_is_401_before_anything(guarded, fake_upstream, http, method, path):
    for authorization in (None, "", "Bearer ", "Bearer wrong", f"Basic {PROXY_KEY}", f"Bearer {PROXY_KEY}x",
                          f"Bearer {PROXY_KEY[:-1]}", f"bearer  {PROXY_KEY.upper()}"):
        headers = {"Authorization": authorization} if authorization is not None else {}
        # Even a body that would be a 400 (bad JSON, no Content-Type) gets the 401 first.
        response = http.request(method, guarded.url + path, data=b"[[[", headers=headers)
        assert response.status_code == 401, authorization
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
    assert fake_upstream.requests == []
    assert guarded.store.stats()["entries"] == 0


def test_client_key__oversized_body_gets_401_not_413(start_proxy, fake_upstream, http):
    proxy = start_proxy(proxy_api_keys=(PROXY_KEY,), upstream_api_key=UPSTREAM_KEY, max_request_bytes=10)
    assert http.post(proxy.url + CHAT, data=b"x" * 100, headers={"Content-Type": "application/json"}
                     ).status_code == 401
    assert http.post(proxy.url + CHAT, data=b"x" * 100, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {PROXY_KEY}"}).status_code == 413
    assert fake_upstream.requests == []


def test_client_key__wrong_key_gets_no_cache_hit(guarded, fake_upstream, http):
    good = {"Authorization": f"Bearer {PROXY_KEY}"}
    assert http.post(guarded.url + CHAT, json=chat_body(), headers=good).status_code == 200
    response = http.post(guarded.url + CHAT, json=chat_body(), headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert "X-Computer-Use-Cache-Key" not in response.headers


@pytest.mark.parametrize("key", [PROXY_KEY, OTHER_PROXY_KEY])
def test_client_key__valid_key_works_and_is_never_forwarded(guarded, fake_upstream, key):
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(**chat_body())
    assert answer.choices[0].message.content.startswith("echo:")
    assert [model.id for model in client.models.list()] == ["test/model-a"]
    stream = client.chat.completions.create(**chat_body("streamed"), stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    for recorded in fake_upstream.requests:
        assert recorded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert key not in str(recorded.headers) and key.encode() not in recorded.body


def test_client_key__open_routes_stay_open_and_admin_keeps_its_token(start_proxy, http):
    proxy = start_proxy(proxy_api_keys=(PROXY_KEY,), upstream_api_key=UPSTREAM_KEY, cache_admin_token="adm-1")
    assert http.get(proxy.url + "/").status_code == 200
    assert http.get(proxy.url + "/healthz").status_code == 200
    assert http.options(proxy.url + CHAT).status_code == 204
    # The proxy key is not an admin token.
    denied = http.post(proxy.url + "/cache/clear", headers={"Authorization": f"Bearer {PROXY_KEY}"})
    assert denied.status_code == 401
    assert denied.json()["error"]["message"] == "Invalid cache admin token."
    assert http.post(proxy.url + "/cache/clear", headers={"X-Cache-Admin-Token": "adm-1"}).status_code == 200


def test_client_key__unset_means_open_as_before(proxy, fake_upstream, http):
    assert http.post(proxy.url + CHAT, json=chat_body()).status_code == 200


def test_client_key__without_upstream_key_start_up_fails_with_one_line():
    with pytest.raises(config.SettingsError) as caught:
        config.load_settings({"PROXY_API_KEYS": "a,b"})
    assert "UPSTREAM_API_KEY" in str(caught.value) and "\n" not in str(caught.value)
    settings = config.load_settings({"PROXY_API_KEYS": " a , b ", "OPENROUTER_API_KEY": "sk-or-v1-x"})
    assert settings.proxy_api_keys == ("a", "b")


def test_client_key__gunicorn_refuses_to_start_without_upstream_key(tmp_path):
    env = {**_clean_env(), "PROXY_API_KEYS": "k1", "CACHE_DB_PATH": str(tmp_path / "c.sqlite3"), "PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "server:create_app()"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "PROXY_API_KEYS is set but UPSTREAM_API_KEY is not" in result.stderr
    assert "Traceback" not in result.stderr


# -- logs ---------------------------------------------------------------------------------------

SECRETS = [PROXY_KEY, UPSTREAM_KEY, CLIENT_KEY, PROMPT_SECRET, "tangerine-walrus"]


def _session(base_url: str, fake_upstream, client_key: str) -> None:
    """Miss, hit, stream, upstream error, bad input, models, too large, refused key, unknown route:
    with keys and prompt text in headers, bodies and URLs (12 requests)."""
    headers = {"Authorization": f"Bearer {client_key}", "X-Title": CLIENT_KEY, "HTTP-Referer": CLIENT_KEY}
    body = chat_body(PROMPT_SECRET, user="agent-7")
    # A key inside the prompt is answered but never cached (secret_scan), and never logged.
    with_key = chat_body(PROMPT_SECRET + " " + CLIENT_KEY, user=CLIENT_KEY)
    with requests.Session() as http:
        assert http.post(base_url + CHAT, json=body, headers=headers).status_code == 200
        assert http.post(base_url + CHAT, json=body, headers=headers).headers["X-Computer-Use-Cache"] == "HIT"
        assert http.post(base_url + CHAT, json=with_key, headers=headers).headers["X-Computer-Use-Cache"] == "BYPASS"
        streamed = http.post(base_url + CHAT, json={**with_key, "stream": True}, headers=headers)
        assert b"[DONE]" in streamed.content
        fake_upstream.enqueue(error_reply(429, f"rate limited {CLIENT_KEY}", headers={"Retry-After": "1"}))
        assert http.post(base_url + CHAT, json=chat_body(PROMPT_SECRET + "x"), headers=headers).status_code == 429
        bad = f'{{"model": "{PROMPT_SECRET}", "messages": {{"k": "{CLIENT_KEY}"}}}}'
        assert http.post(base_url + CHAT, data=bad, headers={**headers, "Content-Type": "application/json"}
                         ).status_code == 400
        assert http.post(base_url + CHAT, data=b"[" * 1000 + CLIENT_KEY.encode(),
                         headers={**headers, "Content-Type": "application/json"}).status_code == 400
        assert http.get(base_url + "/v1/models", headers=headers).status_code == 200
        # Over MAX_REQUEST_BYTES (4096 in these tests): by Content-Length, and chunked.
        too_big = json.dumps(chat_body(PROMPT_SECRET * 200)).encode()
        assert http.post(base_url + CHAT, data=too_big, headers={**headers, "Content-Type": "application/json"}
                         ).status_code == 413
        assert http.post(base_url + CHAT, data=iter([too_big]), headers={**headers, "Content-Type": "application/json"}
                         ).status_code == 413
    # Secrets in the URL: sent with http.client, which (unlike this test's requests) logs nothing.
    assert _plain_request(base_url, "POST", f"/v1/chat/completions?api_key={CLIENT_KEY}",
                          {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}) == 401
    assert _plain_request(base_url, "GET", f"/{CLIENT_KEY}", {"Authorization": headers["Authorization"]}) == 404


def _plain_request(base_url: str, method: str, path: str, headers: dict) -> int:
    connection = http.client.HTTPConnection(base_url.split("//", 1)[1], timeout=10)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_logs__a_whole_session_leaves_no_secret_in_any_log(tmp_path, fake_upstream, caplog):
    caplog.set_level(logging.DEBUG)
    app = create_app(make_settings(tmp_path, fake_upstream, proxy_api_keys=(PROXY_KEY,),
                                   upstream_api_key=UPSTREAM_KEY, cache_admin_token="adm", max_request_bytes=4096))
    # Served the way `python server.py` serves it.
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _session(f"http://127.0.0.1:{server.server_port}", fake_upstream, PROXY_KEY)
        time.sleep(0.2)  # stream lines are written when the response closes
    finally:
        server.shutdown()
        server.server_close()
        app.extensions["computer_use_cache"].store.close()
    text = caplog.text
    for secret in SECRETS:
        assert secret not in text
    access = [record.getMessage() for record in caplog.records if record.name == "computer_use_cache.access"]
    assert len(access) == 12, access
    assert any(line.startswith("POST /v1/chat/completions 200 cache=HIT key=") for line in access)
    assert any(" 429 cache=BYPASS " in line and "upstream=429" in line for line in access)
    assert any(line.startswith("GET /v1/models 200 ") and "upstream=200" in line for line in access)
    assert any(line.startswith("POST /v1/chat/completions 401 ") for line in access)
    miss = next(line for line in access if "cache=MISS" in line)
    assert len(miss.split("key=")[1].split()[0]) == 12 and miss.endswith("ms")


def _clean_env() -> dict:
    env = {name: value for name, value in os.environ.items()
           if name not in ("UPSTREAM_API_KEY", "OPENROUTER_API_KEY", "OPENAI_API_KEY", "PROXY_API_KEYS")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited early"
        try:
            requests.get(url + "/healthz", timeout=5)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError("the server did not come up")


@pytest.mark.parametrize("command", [
    ["-m", "gunicorn", "-c", "gunicorn.conf.py", "server:create_app()"],
    ["server.py"],
])
def test_logs__real_server_stderr_and_stdout_carry_no_secret(tmp_path, fake_upstream, command):
    port = _free_port()
    env = {**_clean_env(), "HOST": "127.0.0.1", "PORT": str(port), "UPSTREAM_BASE_URL": fake_upstream.base_url,
           "UPSTREAM_API_KEY": UPSTREAM_KEY, "PROXY_API_KEYS": PROXY_KEY, "CACHE_DB_PATH": str(tmp_path / "c.sqlite3"),
           "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "4", "MAX_REQUEST_BYTES": "4096"}
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, process)
        _session(url, fake_upstream, PROXY_KEY)
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    output = stdout + stderr
    for secret in SECRETS:
        assert secret not in output
    assert "Traceback" not in output
    access = [line for line in output.splitlines() if "computer_use_cache.access " in line and "/healthz" not in line]
    assert len(access) == 12, output
    assert sum(" 413 cache=" in line for line in access) == 2


def test_client_key__every_configured_key_is_compared(monkeypatch):
    import guard

    compared = []
    real = guard.hmac.compare_digest

    def counting(left, right):
        compared.append(right)
        return real(left, right)

    monkeypatch.setattr(guard.hmac, "compare_digest", counting)
    guard.check_client_key(("k-one", "k-two", "k-three"), "Bearer k-one")
    assert compared == [b"k-one", b"k-two", b"k-three"]  # no early exit on the first match


def test_logs__unexpected_error_logs_no_exception_text(app, fake_upstream, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)

    def broken_request(*args, **kwargs):
        raise RuntimeError(f"boom while sending {CLIENT_KEY} {PROMPT_SECRET}")

    monkeypatch.setattr(app.extensions["computer_use_cache"].upstream, "request", broken_request)
    response = app.test_client().post(CHAT, json=chat_body(PROMPT_SECRET),
                                      headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 500
    assert response.get_json()["error"] == {"message": "The cache server failed unexpectedly.",
                                            "type": "server_error", "param": None, "code": "internal_error"}
    assert "unexpected RuntimeError on POST /v1/chat/completions" in caplog.text
    assert "broken_request" in caplog.text  # the frames are there
    assert CLIENT_KEY not in caplog.text and PROMPT_SECRET not in caplog.text
