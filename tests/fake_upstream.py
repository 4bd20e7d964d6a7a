"""A real OpenAI- (chat, completions, Responses, embeddings) and Anthropic-compatible HTTP server that plays "the upstream" for tests and benchmarks.

The proxy under test talks to it over real sockets, so everything that matters for a
caching proxy is exercised for real: keep-alive, chunked SSE framing, slow upstreams,
broken streams, and clients that hang up mid-stream.

Tests script answers with ``enqueue(reply, ...)``; when nothing is queued the server
answers deterministically (an "echo" completion whose id is unique per call, so a test
can tell a fresh upstream answer from a cached one).

Stdlib only.  Run ``python tests/fake_upstream.py --port 9100 --delay 1.0`` to serve
forever (the benchmark and ``make run`` use this).
"""

from __future__ import annotations

import argparse
import base64
import gzip as _gzip
import hashlib
import itertools
import json
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from fake_responses import responses_answer, responses_events

DEFAULT_MODEL = "test/model-a"
BASE_CREATED = 1700000000
SYSTEM_FINGERPRINT = "fp_fake"
MODELS_LIST = {
    "object": "list",
    "data": [{"id": DEFAULT_MODEL, "object": "model", "created": BASE_CREATED, "owned_by": "test"}],
}
# Top-level completion fields that real providers repeat on every stream chunk.
_REPEATED_CHUNK_FIELDS = ("system_fingerprint", "service_tier", "provider")
_DONE_FRAME = b"data: [DONE]\n\n"
MAX_CHOICES = 128  # the largest n a provider takes
_POLL_INTERVAL = 0.05  # how often long waits look at the stop flag / the client socket


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the upstream saw it, so tests can assert what the proxy forwarded."""

    method: str
    path: str
    headers: dict
    body: bytes
    time: float
    query: str = ""

    @property
    def json(self) -> Any:
        """The parsed body, or None when it is empty or not JSON (nested too deep for Python's
        parser included: a real provider refuses such a body, it does not hang up)."""
        try:
            return json.loads(self.body) if self.body else None
        except (ValueError, RecursionError):
            return None


# --------------------------------------------------------------------------- replies


class Reply:
    """A scripted answer.  Subclasses write (or deliberately fail to write) one response.

    ``delay`` is slept before anything is sent; None means "use the server's default_delay".
    """

    delay: float | None = None

    def send(self, exchange: _Handler) -> None:
        raise NotImplementedError


@dataclass
class _BodyReply(Reply):
    """A complete response with a Content-Length body (JSON, raw bytes, errors, redirects)."""

    status: int
    body: bytes
    headers: dict
    delay: float | None = None

    def send(self, exchange: _Handler) -> None:
        exchange.send_head(self.status, _merge_headers({"Content-Length": len(self.body)}, self.headers))
        exchange.wfile.write(self.body)


@dataclass
class _SseReply(Reply):
    """A chunked text/event-stream; ``truncate`` drops the connection instead of ending cleanly."""

    events: list
    delay_between: float = 0.0
    delay: float | None = None
    done: bool = True
    status: int = 200
    headers: dict = field(default_factory=dict)
    truncate: bool = False

    def send(self, exchange: _Handler) -> None:
        defaults = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Transfer-Encoding": "chunked"}
        exchange.send_head(self.status, _merge_headers(defaults, self.headers))
        frames = [encode_sse_event(event) for event in self.events]
        if self.done and not self.truncate:
            frames.append(_DONE_FRAME)
        for position, frame in enumerate(frames):
            if position and self.delay_between and not exchange.sleep(self.delay_between):
                return exchange.abort()
            if not exchange.stream_write(_chunk(frame)):
                return exchange.abort()
        if self.truncate:
            return exchange.abort()
        exchange.stream_write(b"0\r\n\r\n")


@dataclass
class _TruncatedBodyReply(Reply):
    """Promises ``declared_length`` bytes, sends fewer, hangs up (an upstream dying mid-body)."""

    body: bytes
    declared_length: int
    delay: float | None = None

    def send(self, exchange: _Handler) -> None:
        exchange.send_head(200, {"Content-Type": "application/json", "Content-Length": self.declared_length})
        exchange.wfile.write(self.body)
        exchange.abort()


@dataclass
class _CloseReply(Reply):
    """Hangs up without a status line (the client sees RemoteDisconnected)."""

    delay: float | None = None

    def send(self, exchange: _Handler) -> None:
        exchange.abort()


@dataclass
class _StallReply(Reply):
    """Says nothing for ``seconds`` (to trigger read timeouts), then hangs up."""

    seconds: float
    delay: float | None = None

    def send(self, exchange: _Handler) -> None:
        exchange.wait_watching_client(self.seconds)
        exchange.abort()


@dataclass
class _TrickleReply(Reply):
    """Sends a byte every ``interval`` so per-read timeouts never fire; only a total deadline does."""

    total_seconds: float
    interval: float = 0.2
    delay: float | None = None

    def send(self, exchange: _Handler) -> None:
        exchange.send_head(200, {"Content-Type": "application/json", "Content-Length": 1_000_000})
        deadline = time.monotonic() + self.total_seconds
        while time.monotonic() < deadline:
            if not exchange.stream_write(b" "):
                break
            if not exchange.sleep(min(self.interval, max(0.0, deadline - time.monotonic()))):
                break
        exchange.abort()


def json_reply(body: dict | list, status: int = 200, headers: dict | None = None, delay: float | None = None) -> Reply:
    """A JSON response with Content-Length."""
    return raw_reply(json.dumps(body), status=status, headers=headers, delay=delay)


def raw_reply(
    body: bytes | str,
    status: int = 200,
    content_type: str = "application/json",
    headers: dict | None = None,
    delay: float | None = None,
    gzip: bool = False,
) -> Reply:
    """Arbitrary bytes (malformed JSON, HTML error pages...); ``gzip`` compresses on the wire."""
    data = body.encode() if isinstance(body, str) else bytes(body)
    extra = {"Content-Type": content_type}
    if gzip:
        data = _gzip.compress(data)
        extra["Content-Encoding"] = "gzip"
    return _BodyReply(status, data, _merge_headers(extra, headers or {}), delay)


def error_reply(
    status: int = 429,
    message: str = "Rate limit exceeded",
    type: str = "rate_limit_error",
    code: str | None = None,
    headers: dict | None = None,
    delay: float | None = None,
) -> Reply:
    """An OpenAI-shaped error object, which the SDKs turn into typed exceptions."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return json_reply(body, status=status, headers=headers, delay=delay)


def sse_reply(
    events: list,
    delay_between: float = 0.0,
    first_delay: float | None = None,
    done: bool = True,
    status: int = 200,
    headers: dict | None = None,
) -> Reply:
    """An SSE stream, one chunk per event (dict -> ``data: json``; ":..." comment; raw "...\\n\\n")."""
    return _SseReply(
        list(events),
        delay_between=delay_between,
        delay=first_delay,
        done=done,
        status=status,
        headers=dict(headers or {}),
    )


def truncated_sse_reply(events: list, delay_between: float = 0.0) -> Reply:
    """Sends ``events`` then drops the connection without [DONE] or the final zero-length chunk."""
    return _SseReply(list(events), delay_between=delay_between, done=False, truncate=True)


def truncated_body_reply(body: bytes, declared_length: int) -> Reply:
    """Declares ``declared_length`` bytes but sends only ``body`` before closing."""
    return _TruncatedBodyReply(body.encode() if isinstance(body, str) else body, declared_length)


def close_reply() -> Reply:
    """Reads the request, then closes without any response."""
    return _CloseReply()


def stall_reply(seconds: float) -> Reply:
    """Reads the request, stays silent for ``seconds``, then closes."""
    return _StallReply(seconds)


def trickle_reply(total_seconds: float, interval: float = 0.2) -> Reply:
    """200 + a large Content-Length, then one byte per ``interval`` for ``total_seconds``, then close."""
    return _TrickleReply(total_seconds, interval)


def redirect_reply(location: str, status: int = 302) -> Reply:
    """A redirect with an empty body (a proxy must not follow it to a foreign host)."""
    return _BodyReply(status, b"", {"Location": location})


# --------------------------------------------------------------------------- payload builders


def chat_completion(
    content: str | None = "Hello",
    *,
    id: str = "chatcmpl-x",
    model: str = DEFAULT_MODEL,
    tool_calls: list | None = None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    **extra: Any,
) -> dict:
    """A realistic single-choice ``chat.completion``; ``extra`` sets or overrides top-level keys."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    completion = {
        "id": id,
        "object": "chat.completion",
        "created": BASE_CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
        "usage": usage or _usage(10, _token_estimate(content or "")),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    completion.update(extra)
    return completion


def chunks_from_completion(completion: dict, include_usage: bool = False, piece: int = 4) -> list[dict]:
    """Splits a ``chat.completion`` into the ``chat.completion.chunk`` list a provider would stream.

    Follows WIRE.md: an opening delta per choice (role once), content/refusal/reasoning in
    ``piece``-sized bits, tool calls opened once with id/type/name then argument pieces
    carrying only index + arguments, a ``delta: {}`` finish chunk per choice, and with
    ``include_usage`` a ``usage: null`` on every chunk plus a final ``choices: []`` chunk.
    Choices are interleaved (as real providers do) but first appear in ascending index order.
    """
    header = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
    }
    header.update({key: completion[key] for key in _REPEATED_CHUNK_FIELDS if key in completion})
    choices = sorted(completion.get("choices", []), key=lambda choice: choice.get("index", 0))
    per_choice = [_chat_choice_chunks(choice, piece) for choice in choices]
    return _assemble_chunks(header, per_choice, include_usage, completion.get("usage"))


def text_completion(prompts: list[str], *, id: str, model: str, created: int, n: int = 1) -> dict:
    """A legacy ``text_completion`` echoing each prompt (``n`` choices per prompt)."""
    texts = [_numbered(f"echo: {prompt}", copy) for prompt in prompts for copy in range(n)]
    choices = [
        {"text": text, "index": index, "logprobs": None, "finish_reason": "stop"} for index, text in enumerate(texts)
    ]
    prompt_tokens = sum(_token_estimate(prompt) for prompt in prompts)
    completion_tokens = sum(_token_estimate(text) for text in texts)
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def chunks_from_text_completion(completion: dict, include_usage: bool = False, piece: int = 4) -> list[dict]:
    """Splits a legacy ``text_completion`` into stream chunks (last chunk per choice: text "" + finish)."""
    header = {key: completion[key] for key in ("id", "object", "created", "model")}
    per_choice = []
    for choice in sorted(completion["choices"], key=lambda choice: choice["index"]):
        index = choice["index"]
        parts = [
            {"text": text, "index": index, "logprobs": None, "finish_reason": None}
            for text in _pieces(choice["text"], piece)
        ]
        parts.append({"text": "", "index": index, "logprobs": None, "finish_reason": choice.get("finish_reason")})
        per_choice.append(parts)
    return _assemble_chunks(header, per_choice, include_usage, completion.get("usage"))


def anthropic_message(
    content: list | str = "Hello",
    *,
    id: str = "msg_fake",
    model: str = "claude-test",
    stop_reason: str | None = None,
    usage: dict | None = None,
    **extra: Any,
) -> dict:
    """A Messages API ``message`` (text given as a string becomes one text block)."""
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    text = " ".join(block.get("text", "") for block in blocks if isinstance(block, dict))
    message = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason or ("tool_use" if any(b.get("type") == "tool_use" for b in blocks) else "end_turn"),
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                           "output_tokens": _token_estimate(text)},
    }
    message.update(extra)
    return message


def message_stream_events(message: dict, piece: int = 4, ping: bool = True) -> list[str]:
    """The named events Anthropic streams for ``message``, per its streaming docs.

    ``message_start`` (content [], stop fields null, usage with output_tokens so far), a ``ping``,
    per block ``content_block_start`` (text/thinking empty, tool input {}), its deltas
    (``text_delta``, ``thinking_delta`` then ``signature_delta``, ``input_json_delta`` pieces of
    the input's JSON, starting with an empty one), ``content_block_stop``; then ``message_delta``
    with the stop fields and the cumulative output tokens, and ``message_stop``. No ``[DONE]``.
    """
    usage = dict(message.get("usage") or {})
    start = {k: v for k, v in message.items() if k not in ("content", "stop_reason", "stop_sequence")}
    start.update(content=[], stop_reason=None, stop_sequence=None, usage={**usage, "output_tokens": 1})
    events = [_named({"type": "message_start", "message": start})]
    if ping:
        events.append(_named({"type": "ping"}))
    for index, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        deltas: list[dict] = []
        opening = dict(block)
        if kind == "text":
            opening["text"] = ""
            deltas = [{"type": "text_delta", "text": bit} for bit in _pieces(block["text"], piece)]
        elif kind == "thinking":
            opening = {"type": "thinking", "thinking": ""}
            deltas = [{"type": "thinking_delta", "thinking": bit} for bit in _pieces(block["thinking"], piece)]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind in ("tool_use", "server_tool_use"):
            opening["input"] = {}
            arguments = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": bit} for bit in ["", *_pieces(arguments, piece)]]
        events.append(_named({"type": "content_block_start", "index": index, "content_block": opening}))
        events += [_named({"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas]
        events.append(_named({"type": "content_block_stop", "index": index}))
    events.append(_named({"type": "message_delta",
                          "delta": {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
                          "usage": {"output_tokens": usage.get("output_tokens", 0)}}))
    events.append(_named({"type": "message_stop"}))
    return events


def anthropic_sse_reply(events: list, **options: Any) -> Reply:
    """A Messages stream: named events, never a ``[DONE]``."""
    return sse_reply(events, done=False, **options)


def anthropic_error_reply(status: int = 529, type: str = "overloaded_error", message: str = "Overloaded") -> Reply:
    """Anthropic's error object, which the anthropic SDK turns into typed exceptions."""
    return json_reply({"type": "error", "error": {"type": type, "message": message}}, status=status)


def _named(payload: dict) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


def _echo_message(request: dict, call_number: int) -> dict:
    """The default Messages answer: echoes the last message's text, id unique per call."""
    messages = request.get("messages") or []
    last_text = _message_text(messages[-1]) if messages else ""
    prompt_tokens = sum(_token_estimate(_message_text(message)) for message in messages)
    text = f"echo: {last_text}"
    return anthropic_message(text, id=f"msg_fake_{call_number}", model=request.get("model") or "claude-test",
                             usage={"input_tokens": prompt_tokens, "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 0, "output_tokens": _token_estimate(text)})


def embeddings_answer(request: dict, dimensions: int = 8) -> dict:
    """An embeddings ``list``: one deterministic vector per input (from its text), as floats or
    as base64 of little-endian float32s, the way OpenAI encodes them."""
    inputs = request.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    size = request.get("dimensions") or dimensions
    data = []
    for index, item in enumerate(inputs):
        seed = hashlib.sha256(json.dumps(item).encode()).digest()
        vector = [round((seed[i % 32] - 128) / 128, 4) for i in range(size)]
        if request.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(_token_estimate(json.dumps(item)) for item in inputs)
    return {"object": "list", "data": data, "model": request.get("model") or DEFAULT_MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def encode_sse_event(event: dict | list | str | bytes) -> bytes:
    """One SSE frame: JSON as ``data:``, ``:`` comments and raw ``\\n\\n``-terminated text verbatim."""
    if isinstance(event, bytes):
        return event
    if isinstance(event, str):
        if event.startswith(":"):
            return (event if event.endswith("\n\n") else event.rstrip("\n") + "\n\n").encode()
        if event.endswith("\n\n"):
            return event.encode()
        return f"data: {event}\n\n".encode()
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def _chat_choice_chunks(choice: dict, piece: int) -> list[dict]:
    """The per-chunk ``choices[]`` entries for one choice, opening delta to finish chunk."""
    index = choice.get("index", 0)
    message = choice.get("message") or {}
    content = message.get("content")
    refusal = message.get("refusal")
    reasoning = message.get("reasoning")

    opening: dict[str, Any] = {
        "role": message.get("role", "assistant"),
        "content": "" if isinstance(content, str) else None,
    }
    if isinstance(refusal, str):
        opening["refusal"] = ""
    deltas: list[dict] = [opening]
    if isinstance(reasoning, str):
        deltas += [{"reasoning": bit} for bit in _pieces(reasoning, piece)]
    if isinstance(content, str):
        deltas += [{"content": bit} for bit in _pieces(content, piece)]
    if isinstance(refusal, str):
        deltas += [{"refusal": bit} for bit in _pieces(refusal, piece)]
    for call_index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        opener = {
            "index": call_index,
            "id": call["id"],
            "type": call.get("type", "function"),
            "function": {"name": function.get("name", ""), "arguments": ""},
        }
        deltas.append({"tool_calls": [opener]})
        deltas += [
            {"tool_calls": [{"index": call_index, "function": {"arguments": bit}}]}
            for bit in _pieces(function.get("arguments") or "", piece)
        ]

    entries = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
    finish = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
    if "native_finish_reason" in choice:
        finish["native_finish_reason"] = choice["native_finish_reason"]
    entries.append(finish)
    return entries


def _assemble_chunks(header: dict, per_choice: list[list[dict]], include_usage: bool, usage: dict | None) -> list[dict]:
    """Wraps interleaved choice entries in chunk envelopes and adds the usage chunk if asked."""
    chunks = []
    for entry in _interleave(per_choice):
        chunk = {**header, "choices": [entry]}
        if include_usage:
            chunk["usage"] = None
        chunks.append(chunk)
    if include_usage:
        chunks.append({**header, "choices": [], "usage": usage})
    return chunks


def _echo_chat_completion(request: dict, call_number: int) -> dict:
    """The default answer: echoes the last message, ``n`` choices, id unique per call."""
    messages = request.get("messages") or []
    last_text = _message_text(messages[-1]) if messages else ""
    contents = [_numbered(f"echo: {last_text}", index) for index in range(_choice_count(request))]
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for index, content in enumerate(contents)
    ]
    prompt_tokens = sum(_token_estimate(_message_text(message)) for message in messages)
    return chat_completion(
        contents[0],
        id=f"chatcmpl-fake-{call_number}",
        model=request.get("model") or DEFAULT_MODEL,
        usage=_usage(prompt_tokens, sum(_token_estimate(content) for content in contents)),
        created=BASE_CREATED + call_number,
        choices=choices,
    )


def _message_text(message: Any) -> str:
    """A message's text; list content (text + image parts) contributes its text parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _prompt_list(prompt: Any) -> list[str]:
    """Legacy ``prompt`` may be a string, a list of strings, or token arrays."""
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return prompt
    if isinstance(prompt, str):
        return [prompt]
    return [json.dumps(prompt) if prompt is not None else ""]


def _choice_count(request: dict) -> int:
    count = request.get("n")
    return count if isinstance(count, int) and count > 0 else 1


def _numbered(text: str, copy: int) -> str:
    """Choice 0 keeps the plain text; extra choices get " [i]" so they differ."""
    return f"{text} [{copy}]" if copy else text


def _token_estimate(text: str) -> int:
    return 1 + len(text) // 4


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _pieces(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[start : start + size] for start in range(0, len(text), size)]


def _interleave(lists: list[list]) -> list:
    """Round-robin merge, so choice 0 starts first but choices then alternate."""
    sentinel = object()
    return [
        item for group in itertools.zip_longest(*lists, fillvalue=sentinel) for item in group if item is not sentinel
    ]


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk, built as a single buffer so it leaves in one write."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _merge_headers(defaults: dict, overrides: dict) -> dict:
    """Defaults plus overrides, where an override replaces a default of any letter case."""
    overridden = {name.lower() for name in overrides}
    merged = {name: value for name, value in defaults.items() if name.lower() not in overridden}
    merged.update(overrides)
    return merged


def _route(path: str) -> str:
    """Routes are served with or without the ``/v1`` prefix."""
    return path[3:] if path == "/v1" or path.startswith("/v1/") else path


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    """Thread per connection with a deep accept backlog: the benchmark keeps 256 requests in flight."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream: FakeUpstream):
        self.upstream = upstream
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Skips HTTPServer's getfqdn() reverse-DNS lookup, which can stall start-up for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """Clients hanging up is routine here; only real bugs deserve a traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _HeadersOnly:
    """A HEAD answer's output: the first write (http.server sends the status line and headers
    in one) goes out, whatever a reply writes after it is dropped."""

    def __init__(self, out: Any):
        self.out = out
        self.head_sent = False

    def write(self, data: bytes) -> int:
        if not self.head_sent:
            self.head_sent = True
            return self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


class _Handler(BaseHTTPRequestHandler):
    """Reads and records each request, then lets a Reply write the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive: the proxy reuses pooled connections
    disable_nagle_algorithm = True  # small SSE chunks must leave immediately
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.upstream._track_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.upstream._untrack_connection(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: test and benchmark output should not drown in access logs."""

    def handle_request(self) -> None:
        body = self._read_body()
        record = RecordedRequest(
            method=self.command,
            path=urlsplit(self.path).path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            time=time.monotonic(),
            query=urlsplit(self.path).query,
        )
        upstream = self.server.upstream
        # HEAD is answered as GET would be, without the body (do_HEAD drops it).
        answered_as = replace(record, method="GET") if record.method == "HEAD" else record
        reply = upstream._accept(record) or upstream._default_reply(answered_as)
        delay = upstream.default_delay if reply.delay is None else reply.delay
        if delay and not self.sleep(delay):
            return self.abort()
        try:
            reply.send(self)
            self.wfile.flush()
        except ConnectionError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = handle_request

    def do_HEAD(self) -> None:
        """GET's status and headers without its body (RFC 9110 9.3.2), as real servers answer
        HEAD; http.server itself would say 501."""
        body_writer = self.wfile
        self.wfile = _HeadersOnly(body_writer)
        try:
            self.handle_request()
        finally:
            self.wfile = body_writer

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked_body(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    # ---- helpers used by Reply.send

    def send_head(self, status: int, headers: dict) -> None:
        """Status line plus headers, flushed as one write."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.end_headers()

    def stream_write(self, data: bytes) -> bool:
        """Writes part of a streamed body; False (and a recorded disconnect) if the client left."""
        if self._client_gone():
            return self._note_disconnect()
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except ConnectionError:
            return self._note_disconnect()

    def sleep(self, seconds: float) -> bool:
        """Waits unless the server is stopping; False means stop now."""
        return not self.server.upstream._stopping.wait(seconds)

    def wait_watching_client(self, seconds: float) -> None:
        """Waits ``seconds`` but returns early (recording a disconnect) if the client hangs up."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.sleep(min(_POLL_INTERVAL, remaining)):
                return
            if self._client_gone():
                self._note_disconnect()
                return

    def abort(self) -> None:
        """Ends this connection after the handler returns, whatever has been sent so far."""
        self.close_connection = True

    def _client_gone(self) -> bool:
        """True if the peer closed its end: a non-blocking peek reads EOF.

        A peek (not select()) so it works for file descriptors above 1024 under heavy load.
        """
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _note_disconnect(self) -> bool:
        self.close_connection = True
        self.server.upstream._record_disconnect(urlsplit(self.path).path)
        return False


# --------------------------------------------------------------------------- the server object


class FakeUpstream:
    """An OpenAI-compatible upstream on a real socket; use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, default_delay: float = 0.0):
        self.host = host
        self.port = port
        self.default_delay = default_delay
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[str] = []
        self.responses_by_id: dict[str, dict] = {}  # Responses answered, for GET /responses/{id}
        self._replies: deque[Reply] = deque()
        self._changed = threading.Condition()
        self._call_count = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeUpstream has no port until start() is called")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeUpstream:
        """Binds (a free port when port=0; the same port again after a stop) and serves in a thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting and also cuts open keep-alive connections, like a real upstream going down."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._changed:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Forgets recorded requests, queued replies and disconnects (the call counter keeps going)."""
        with self._changed:
            self.requests.clear()
            self._replies.clear()
            self.disconnects.clear()

    def enqueue(self, *replies: Reply) -> None:
        """Queues scripted replies, consumed FIFO, one per POST request."""
        for reply in replies:
            if not isinstance(reply, Reply):
                raise TypeError(f"expected a Reply, got {type(reply).__name__}")
        with self._changed:
            self._replies.extend(replies)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """True once at least ``n`` requests have arrived."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.requests) >= n, timeout)

    def wait_for_disconnect(self, timeout: float = 5.0, count: int = 1) -> bool:
        """True once at least ``count`` mid-stream client disconnects were noticed."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.disconnects) >= count, timeout)

    def calls(self, path_suffix: str = "/chat/completions") -> list[RecordedRequest]:
        """Recorded requests whose path ends with ``path_suffix`` ("/completions" also matches chat)."""
        with self._changed:
            return [request for request in self.requests if request.path.endswith(path_suffix)]

    # ---- called from handler threads

    def _accept(self, record: RecordedRequest) -> Reply | None:
        """Records a request and hands out the next scripted reply if it is a POST."""
        with self._changed:
            self.requests.append(record)
            reply = self._replies.popleft() if record.method == "POST" and self._replies else None
            self._changed.notify_all()
        return reply

    def _record_disconnect(self, label: str) -> None:
        if self._stopping.is_set():
            return  # stop() cut the connection; the client did not leave
        with self._changed:
            self.disconnects.append(label)
            self._changed.notify_all()

    def _track_connection(self, connection: socket.socket) -> None:
        with self._changed:
            self._connections.add(connection)

    def _untrack_connection(self, connection: socket.socket) -> None:
        with self._changed:
            self._connections.discard(connection)

    def _next_call_number(self) -> int:
        with self._changed:
            self._call_count += 1
            return self._call_count

    def _default_reply(self, record: RecordedRequest) -> Reply:
        """What a real provider would answer when the test scripted nothing."""
        route = _route(record.path)
        if record.method == "GET" and route == "/models":
            return json_reply(MODELS_LIST, delay=0.0)
        if record.method == "POST" and route == "/embeddings" and isinstance(record.json, dict):
            return json_reply(embeddings_answer(record.json))
        if route == "/responses" or route.startswith("/responses/"):
            return self._responses_reply(route, record)
        if record.method == "POST" and route in ("/messages", "/messages/count_tokens"):
            return self._anthropic_reply(route, record)
        if record.method != "POST" or route not in ("/chat/completions", "/completions"):
            return error_reply(
                404, f"Unknown path: {record.method} {record.path}", "invalid_request_error", "not_found", delay=0.0
            )
        request = record.json
        if not isinstance(request, dict):
            return error_reply(400, "Request body must be a JSON object", "invalid_request_error", delay=0.0)
        if _choice_count(request) > MAX_CHOICES:  # as OpenAI refuses it: never a 10**300-choice answer
            return error_reply(400, f"Invalid 'n': integer above maximum value. Expected a value <= "
                               f"{MAX_CHOICES}.", "invalid_request_error", "integer_above_max_value", delay=0.0)

        call_number = self._next_call_number()
        if route == "/chat/completions":
            completion = _echo_chat_completion(request, call_number)
            split = chunks_from_completion
        else:
            completion = text_completion(
                _prompt_list(request.get("prompt")),
                id=f"cmpl-fake-{call_number}",
                model=request.get("model") or DEFAULT_MODEL,
                created=BASE_CREATED + call_number,
                n=_choice_count(request),
            )
            split = chunks_from_text_completion
        if not request.get("stream"):
            return json_reply(completion)
        include_usage = (request.get("stream_options") or {}).get("include_usage") is True
        return sse_reply(split(completion, include_usage=include_usage))


    def _responses_reply(self, route: str, record: RecordedRequest) -> Reply:
        """Responses (tests/fake_responses.py builds them), and GET or DELETE of one it answered."""
        if record.method == "DELETE":
            response_id = route.removeprefix("/responses/")
            if self.responses_by_id.pop(response_id, None) is None:
                return error_reply(404, "No response with that id.", "invalid_request_error", delay=0.0)
            return json_reply({"id": response_id, "object": "response", "deleted": True}, delay=0.0)
        if record.method == "GET":
            answer = self.responses_by_id.get(route.removeprefix("/responses/"))
            if answer is None:
                return error_reply(404, "No response with that id.", "invalid_request_error", delay=0.0)
            return json_reply(answer, delay=0.0)
        request = record.json
        if record.method != "POST" or route != "/responses" or not isinstance(request, dict):
            return error_reply(400, "Not a Responses request.", "invalid_request_error", delay=0.0)
        answer = responses_answer(request, self._next_call_number())
        self.responses_by_id[answer["id"]] = answer
        if not request.get("stream"):
            return json_reply(answer)
        return sse_reply(responses_events(answer), done=False)

    def _anthropic_reply(self, route: str, record: RecordedRequest) -> Reply:
        """Messages and token counting, as Anthropic answers them (its error shape included)."""
        request = record.json
        if not isinstance(request, dict):
            return anthropic_error_reply(400, "invalid_request_error", "Request body must be a JSON object")
        if route == "/messages/count_tokens":
            messages = request.get("messages")
            if not isinstance(messages, list):
                return anthropic_error_reply(400, "invalid_request_error", "messages: Input should be a valid list")
            return json_reply({"input_tokens": sum(_token_estimate(_message_text(m)) for m in messages)}, delay=0.0)
        message = _echo_message(request, self._next_call_number())
        if not request.get("stream"):
            return json_reply(message)
        return anthropic_sse_reply(message_stream_events(message))


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI-compatible upstream until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each completion reply")
    args = parser.parse_args(argv)
    upstream = FakeUpstream(args.host, args.port, default_delay=args.delay).start()
    print(upstream.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
