"""The ways the product is started for real: the Docker image's CMD (from the venv) and
`python server.py`. Each one serves a MISS then a HIT against the fake upstream and stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

import config
from conftest import ROOT
from helpers import chat_body

VENV_BIN = ROOT / ".venv" / "bin"


def dockerfile_cmd() -> list[str]:
    """The exec-form CMD of the Dockerfile, as the container would run it."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, "the Dockerfile must have an exec-form CMD"
    return json.loads(match.group(1))


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile (KEY=VALUE pairs, possibly continued over lines)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    names = {f.metadata["env"] for f in config.dataclasses.fields(config.Settings)}
    names |= {"OPENAI_BASE_URL", "OPENROUTER_API_KEY", "OPENAI_API_KEY", "WEB_CONCURRENCY", "GUNICORN_THREADS"}
    env = {name: value for name, value in os.environ.items() if name not in names}
    env.update(extra)
    return env


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if requests.get(url + "/healthz", timeout=1).json()["ok"] is True:
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.1)
    pytest.fail("server did not become healthy")


def miss_then_hit(url: str, fake_upstream) -> None:
    statuses = [requests.post(url + "/v1/chat/completions", json=chat_body(), timeout=10)
                .headers["X-Computer-Use-Cache"] for _ in range(2)]
    assert statuses == ["MISS", "HIT"]
    assert len(fake_upstream.calls()) == 1


def run_until_sigterm(command: list[str], env: dict[str, str], fake_upstream) -> str:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        wait_healthy(url, process)
        miss_then_hit(url, fake_upstream)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


def test_dockerfile_cmd__starts_from_the_venv_and_serves(fake_upstream, tmp_path):
    command = dockerfile_cmd()
    assert command[0] == "gunicorn"
    command[0] = str(VENV_BIN / "gunicorn")
    image_env = dockerfile_env()
    assert image_env["CACHE_DB_PATH"] == "/data/code_model_cache.sqlite3"
    env = clean_env(**{**image_env, "HOST": "127.0.0.1", "PORT": str(free_port()),
                       "CACHE_DB_PATH": str(tmp_path / "cache.sqlite3"),
                       "UPSTREAM_BASE_URL": fake_upstream.base_url})
    run_until_sigterm(command, env, fake_upstream)
    assert stored_hits(tmp_path / "cache.sqlite3") == 1


def stored_hits(path) -> int:
    """The hit counter on disk: a clean stop writes the counts still held in memory."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT sum(hits) FROM completions").fetchone()[0]
    finally:
        db.close()


def test_python_server_py__starts_and_serves(fake_upstream, tmp_path):
    env = clean_env(HOST="127.0.0.1", PORT=str(free_port()), CACHE_DB_PATH=str(tmp_path / "cache.sqlite3"),
                    UPSTREAM_BASE_URL=fake_upstream.base_url)
    run_until_sigterm([sys.executable, "server.py"], env, fake_upstream)
    assert stored_hits(tmp_path / "cache.sqlite3") == 1


def test_dockerfile__runs_as_non_root_with_a_data_volume():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("FROM python:3.11-slim")
    assert re.search(r"^USER\s+(?!root\b|0\b)\S+", text, re.MULTILINE)
    assert 'VOLUME ["/data"]' in text
