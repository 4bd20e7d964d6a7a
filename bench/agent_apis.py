"""Bench scenario for the agent APIs: a Messages hit and a Responses hit cost about what a chat hit
costs (issue 12). Called by run.py with a proxy already running; prints its rows through run.py's
``row`` and needs nothing else from it.
"""

from __future__ import annotations

import json
from typing import Callable

from loadgen import Connection, build_request

TEXT = "Open the settings page, find the display section and report the current resolution. " * 14
SYSTEM = f"You are a careful computer-use agent. {TEXT}"


def chat_body() -> bytes:
    return json.dumps({"model": "test/model-a", "temperature": 0, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Next action? api-step"}]}).encode()


def messages_body() -> bytes:
    """The same ~1.3 KB step as Anthropic Messages (system as a block, the computer tool)."""
    return json.dumps({"model": "claude-test", "max_tokens": 1024, "temperature": 0,
                       "system": [{"type": "text", "text": SYSTEM}],
                       "tools": [{"type": "computer_20250124", "name": "computer", "display_width_px": 1024,
                                  "display_height_px": 768}],
                       "messages": [{"role": "user", "content": "Next action? api-step"}]}).encode()


def responses_body() -> bytes:
    """The same step as a Responses request (instructions, the computer-use tool)."""
    return json.dumps({"model": "computer-use-preview", "instructions": SYSTEM, "truncation": "auto",
                       "tools": [{"type": "computer_use_preview", "display_width": 1024,
                                  "display_height": 768, "environment": "browser"}],
                       "input": "Next action? api-step"}).encode()


REQUESTS = {"chat": ("/v1/chat/completions", chat_body),
            "messages": ("/v1/messages", messages_body),
            "responses": ("/v1/responses", responses_body)}


def agent_api_hits(proxy_port: int, seconds: float, in_turn: Callable, p50: Callable, row: Callable,
                   ms: Callable) -> None:
    """p50 of a Messages hit and of a Responses hit against a chat hit, asked in turn on the same
    proxy (target: each within 1.2x of chat), JSON and streamed."""
    for stream in (False, True):
        sides = []
        for api, (path, body) in REQUESTS.items():
            raw = body()
            if stream:
                raw = json.dumps({**json.loads(raw), "stream": True}).encode()
            request = build_request(path, raw)
            reply = Connection(proxy_port).send(request)  # stores it
            if reply.status != 200:
                raise RuntimeError(f"{api}: status {reply.status}: {reply.body[:200]!r}")
            sides.append((proxy_port, request))
        chat, messages, responses = in_turn(sides, seconds / 2, 2000)
        kind = "streamed hit" if stream else "hit"
        for api, latencies in (("Messages", messages), ("Responses", responses)):
            ratio = p50(latencies) / p50(chat)
            row(f"{api} {kind} p50 vs chat {kind}, concurrency 1", "<= 1.2x chat",
                f"{ms(p50(latencies))} (chat {ms(p50(chat))})", ratio, ratio <= 1.2)
