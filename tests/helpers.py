"""Small factories for request bodies used across the tests."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import requests


def chat_body(content: str = "Plan the next click.", **overrides) -> dict:
    """A realistic chat request; overrides replace or add top-level fields."""
    body = {"model": "test/model-a", "messages": [{"role": "user", "content": content}]}
    body.update(overrides)
    return body


def completion_body(prompt: str = "Say hello", **overrides) -> dict:
    body = {"model": "test/model-a", "prompt": prompt}
    body.update(overrides)
    return body


class FakeClock:
    """A clock the test moves by hand: time-dependent tests never sleep."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def holds_in_forked_child(check: Callable[[], bool]) -> bool:
    """Run ``check`` in a forked child (as a gunicorn worker is) and return its verdict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write_end, b"ok" if check() else b"no")
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    verdict = os.read(read_end, 8)
    os.close(read_end)
    return verdict == b"ok"


def post_all(url: str, bodies: list[dict], timeout: float = 15) -> list[requests.Response]:
    """POST every body to url's chat route at once, each on a connection of its own (so a
    burst spreads over a server's workers); the replies in order."""
    def post(body):
        with requests.Session() as session:
            return session.post(url + "/v1/chat/completions", json=body, timeout=timeout)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))
