"""The ways the product is started for real: `python server.py` here, the Docker image's CMD in
test_docker_image.py (with these helpers). Each serves a MISS then a HIT against the fake upstream
and stops cleanly."""

from __future__ import annotations

import os
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


def stop_with_sigterm(process: subprocess.Popen) -> str:
    """Stop the server as `docker stop` does; it must exit cleanly. Returns its stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    return stderr


def run_until_sigterm(command: list[str], env: dict[str, str], fake_upstream) -> str:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        wait_healthy(url, process)
        miss_then_hit(url, fake_upstream)
    finally:
        stderr = stop_with_sigterm(process)
    assert "Traceback" not in stderr
    return stderr


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
