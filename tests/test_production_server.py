"""The production server: real gunicorn with the production gunicorn.conf.py and 2 workers."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from fake_upstream import chat_completion, chunks_from_completion, sse_reply
from helpers import chat_body, post_all

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    """`gunicorn -c gunicorn.conf.py 'server:create_app()'` as a subprocess on a free port."""

    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **env}
        # A file, not a pipe: nobody reads the log while the server runs, and a full pipe
        # would block the workers' access-log writes.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "server:create_app()"],
                                        cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                        stderr=self.log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.read_log()
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.05)
        raise AssertionError("gunicorn did not start")

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@pytest.fixture
def start_gunicorn(tmp_path, fake_upstream):
    servers: list[Gunicorn] = []

    def start(**env: str) -> Gunicorn:
        values = {"CACHE_DB_PATH": str(tmp_path / "cache.sqlite3"),
                  "UPSTREAM_BASE_URL": fake_upstream.base_url, "UPSTREAM_TIMEOUT_SECONDS": "20",
                  "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "32",
                  # The shared deployment: one cache for every client, whatever key it sends.
                  "UPSTREAM_API_KEY": "sk-upstream-test", **env}
        server = Gunicorn(values)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.terminate()


# gunicorn's --preload (an operator's GUNICORN_CMD_ARGS) builds the app before the fork: nothing
# may be opened there, or the workers would share the parent's SQLite and lock-file descriptors.
PRELOAD = pytest.mark.parametrize("preload", [{}, {"GUNICORN_CMD_ARGS": "--preload --log-level debug"}],
                                  ids=["", "preload"])


def assert_preloaded_as_asked(server, preload: dict) -> None:
    assert ("preload_app: True" in server.read_log()) == bool(preload)


@PRELOAD
def test_production_server__a_burst_across_workers_makes_one_upstream_call(start_gunicorn, fake_upstream, preload):
    server = start_gunicorn(**preload)
    fake_upstream.default_delay = 0.8

    replies = post_all(server.url, [chat_body("one call for all")] * 40)

    assert {reply.status_code for reply in replies} == {200}
    assert len(fake_upstream.calls()) == 1
    assert len({reply.content for reply in replies}) == 1
    assert sum(reply.headers["X-Computer-Use-Cache"] == "MISS" for reply in replies) == 1
    assert_preloaded_as_asked(server, preload)


def test_production_server__a_streamed_follower_gets_a_replayed_stream(start_gunicorn, fake_upstream):
    server = start_gunicorn()
    fake_upstream.default_delay = 0.6
    body = chat_body("replay for the follower")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)

    with ThreadPoolExecutor(1) as pool:
        leader = pool.submit(post_all, server.url, [body])
        assert fake_upstream.wait_for_requests(1)
        raw = client.chat.completions.with_raw_response.create(**body, stream=True)
        chunks = list(raw.parse())
        leader_reply = leader.result()[0]

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert raw.headers["X-Computer-Use-Cache"] == "HIT"
    assert raw.headers["X-Computer-Use-Cache-Coalesced"] == "true"
    assert text == leader_reply.json()["choices"][0]["message"]["content"]
    assert len(fake_upstream.calls()) == 1


def test_production_server__a_stream_longer_than_the_worker_timeout_survives(start_gunicorn, fake_upstream):
    server = start_gunicorn(GUNICORN_TIMEOUT="2")
    completion = chat_completion("a slow but healthy stream of many words", id="chatcmpl-slow")
    events = chunks_from_completion(completion)
    fake_upstream.enqueue(sse_reply(events, delay_between=5.0 / len(events)))  # timeout + 3 s
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)

    began = time.monotonic()
    stream = client.chat.completions.create(**chat_body("slow"), stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert time.monotonic() - began > 4.5
    assert text == "a slow but healthy stream of many words"
    assert requests.get(server.url + "/healthz", timeout=2).json()["cache"]["entries"] == 1


@PRELOAD
def test_production_server__sigterm_writes_every_hit_count(start_gunicorn, fake_upstream, tmp_path, preload):
    server = start_gunicorn(CACHE_HIT_FLUSH_SECONDS="600", **preload)  # only the shutdown can write them
    body = chat_body("count me")
    with requests.Session() as session:
        for _ in range(6):  # one miss, five hits, right before the signal
            assert session.post(server.url + "/v1/chat/completions", json=body, timeout=5).ok
    post_all(server.url, [body] * 4)  # on fresh connections, likely in the other worker too
    assert_preloaded_as_asked(server, preload)

    assert server.terminate() == 0
    with sqlite3.connect(tmp_path / "cache.sqlite3") as db:
        (hits,) = db.execute("SELECT hits FROM completions").fetchone()
    assert hits == 9
    assert len(fake_upstream.calls()) == 1


FRESH_BUFFERS = """
import resource, runpy, sys
conf = runpy.run_path("gunicorn.conf.py")
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        buffer = bytes(400_000) + b"x"  # a fresh 400 KB buffer, as each agent step brings
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(conf["malloc_tuned"], faults())
"""


def run_fresh_buffers(**env: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", FRESH_BUFFERS], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    tuned, faults = result.stdout.split()
    return tuned, int(faults)


def test_production_config__large_buffers_are_reused_not_faulted_in_again():
    tuned, faults = run_fresh_buffers()
    # The operator's own glibc settings win: here they are glibc's defaults.
    untouched, default_faults = run_fresh_buffers(MALLOC_TRIM_THRESHOLD_="131072")

    assert (tuned, untouched) == ("True", "False")
    assert default_faults > 5000  # ~100 page faults per 400 KB buffer
    assert faults < default_faults / 20


def test_production_config__threads_take_longer_turns_on_the_gil():
    result = subprocess.run([sys.executable, "-c", "import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
                             "print(sys.getswitchinterval())"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout) - 0.05) < 1e-6  # stored in microseconds
