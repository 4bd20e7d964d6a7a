"""Small factories for request bodies used across the tests."""

from __future__ import annotations


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
