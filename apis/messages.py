"""Anthropic Messages (``/v1/messages``): Claude Code, Claude's computer use, the anthropic SDKs.

What differs from chat: the client's key may come as ``x-api-key``; ``anthropic-version`` and
``anthropic-beta`` change answers, so they are forwarded and keyed; a top-level
``cache_control`` of Anthropic's own form (``{"type": "ephemeral"}``) is prompt caching, kept in
the key and forwarded; errors the proxy makes are ``{"type": "error", "error": {...}}``; streams
are named events ending with ``message_stop`` (no ``[DONE]``). The replay and ``MessageAssembler``
are inverses, and both follow the anthropic SDK's accumulator (``MessageStream``): text and
thinking grow by deltas, tool input arrives as pieces of its JSON, ``signature_delta`` sets the
signature, ``message_delta`` sets the stop fields and the cumulative usage.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Hashable, Iterator, Mapping
from urllib.parse import urlsplit

from apis.base import Api, require_model, require_objects, require_stream_flag, whole_number
from config import Settings
from errors import ApiError
from images import IdSlot, ImageSlot
from streaming import SseCapture, event_data, json_bytes, split_text
from upstream import UpstreamTarget, bearer_token

# Error types of Anthropic's error objects, by HTTP status (the SDK picks its class by status).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
                529: "overloaded_error"}
# Blocks whose ``input`` streams as ``input_json_delta`` pieces after a start with ``input: {}``.
_INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# message_delta's usage: the figures that are cumulative totals at the end of a stream.
_DELTA_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                "output_tokens", "server_tool_use", "output_tokens_details")
# Top-level message fields that message_delta carries (null or absent before it).
_DELTA_FIELDS = ("stop_reason", "stop_sequence", "stop_details", "container")


def anthropic_error(type: str, message: str) -> dict:
    return {"type": "error", "error": {"type": type, "message": message}}


def sse_named(payload: dict) -> bytes:
    """One Anthropic event: ``event: <type>`` then its JSON (whose ``type`` is the same name)."""
    return b"event: " + payload["type"].encode() + b"\ndata: " + json_bytes(payload) + b"\n\n"


# -- replaying a stored message ------------------------------------------------------------------


def replay_message(message: dict) -> Iterator[bytes]:
    """The event stream the anthropic SDKs accumulate back into ``message``."""
    opening: dict[str, Any] = {}
    for name, value in message.items():  # the stored order, with what deltas fill in emptied
        if name == "content":
            opening[name] = []
        elif name in ("stop_reason", "stop_sequence"):
            opening[name] = None
        elif name not in _DELTA_FIELDS:
            opening[name] = value
    yield sse_named({"type": "message_start", "message": opening})
    content = message.get("content")
    for index, block in enumerate(content if isinstance(content, list) else []):
        if isinstance(block, dict):
            yield from _block_events(index, block)
    delta = {name: message.get(name) for name in ("stop_reason", "stop_sequence")}
    delta.update((name, message[name]) for name in _DELTA_FIELDS[2:] if name in message)
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
    closing_usage = {name: usage[name] for name in _DELTA_USAGE if name in usage}
    closing_usage.setdefault("output_tokens", 0)
    yield sse_named({"type": "message_delta", "delta": delta, "usage": closing_usage})
    yield sse_named({"type": "message_stop"})


def _block_events(index: int, block: dict) -> Iterator[bytes]:
    """content_block_start, the deltas that grow the block, content_block_stop."""
    kind = block.get("type")
    deltas: list[dict] = []
    start = block
    if kind == "text" and isinstance(block.get("text"), str):
        start = {**block, "text": ""}
        citations = block.get("citations")
        if isinstance(citations, list) and citations:
            start["citations"] = None
            deltas += [{"type": "citations_delta", "citation": citation} for citation in citations]
        deltas += [{"type": "text_delta", "text": piece} for piece in split_text(block["text"])]
    elif kind == "thinking" and isinstance(block.get("thinking"), str):
        start = {**block, "thinking": ""}
        if "signature" in block:
            start["signature"] = ""
        deltas += [{"type": "thinking_delta", "thinking": piece} for piece in split_text(block["thinking"])]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in _INPUT_BLOCKS and isinstance(block.get("input"), dict):
        start = {**block, "input": {}}
        arguments = json.dumps(block["input"], ensure_ascii=False, separators=(",", ":"))
        pieces = split_text(arguments) if block["input"] else [""]
        deltas += [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
    # Anything else (redacted_thinking, server tool results, ...) arrives whole in its start.
    yield sse_named({"type": "content_block_start", "index": index, "content_block": start})
    for delta in deltas:
        yield sse_named({"type": "content_block_delta", "index": index, "delta": delta})
    yield sse_named({"type": "content_block_stop", "index": index})


# -- assembling a live stream --------------------------------------------------------------------


class MessageAssembler:
    """Folds Messages stream events into the message they describe, as the anthropic SDK does."""

    def __init__(self) -> None:
        self.message: dict | None = None
        self._json: dict[int, str] = {}
        self.stopped = False

    def add(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "message_start":
            if self.message is not None:
                raise ValueError("a second message_start")
            message = event["message"]
            if not isinstance(message, dict) or not isinstance(message.get("content"), list):
                raise ValueError("message_start without a message")
            self.message = copy.deepcopy(message)
            return
        if kind in ("ping", "message_stop"):
            self.stopped = self.stopped or kind == "message_stop"
            return
        if self.message is None:
            raise ValueError(f"{kind} before message_start")
        content = self.message["content"]
        if kind == "content_block_start":
            if event["index"] != len(content):
                raise ValueError("content blocks out of order")
            content.append(copy.deepcopy(event["content_block"]))
        elif kind == "content_block_delta":
            self._add_delta(event["index"], content[event["index"]], event["delta"])
        elif kind == "content_block_stop":
            index = event["index"]
            pieces = self._json.pop(index, "")
            if pieces:
                content[index]["input"] = json.loads(pieces)
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            self.message.update(delta)
            usage = self.message.setdefault("usage", {})
            for name, value in (event.get("usage") or {}).items():
                if value is not None:
                    usage[name] = value
        else:
            raise ValueError(f"unknown event {kind!r}")

    def _add_delta(self, index: int, block: dict, delta: dict) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] += delta["text"]
        elif kind == "thinking_delta":
            block["thinking"] += delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = delta["signature"]
        elif kind == "input_json_delta":
            self._json[index] = self._json.get(index, "") + delta["partial_json"]
        elif kind == "citations_delta":
            block["citations"] = (block.get("citations") or []) + [delta["citation"]]
        else:
            raise ValueError(f"unknown delta {kind!r}")  # cannot be assembled faithfully

    def complete(self) -> bool:
        return (self.stopped and self.message is not None and not self._json
                and self.message.get("stop_reason") is not None)


class MessageCapture(SseCapture):
    """Relays a Messages stream verbatim and assembles it; whole once ``message_stop`` came and no
    ``error`` event did."""

    def __init__(self) -> None:
        super().__init__()
        self.assembler = MessageAssembler()

    def _accept(self, event: bytes) -> bytes | bool | None:
        data, _ = event_data(event)
        if data is None:
            return True  # comments, retry hints
        payload = self.json_payload(data, lambda payload: payload.get("type") == "error" or "error" in payload)
        if payload is None:
            return True
        self.assemble(self.assembler.add, payload)
        if payload.get("type") == "message_stop":
            self.done = True
        return True

    def error_event(self, message: str, code: str) -> bytes:
        return sse_named(anthropic_error("api_error", message))

    def completion(self) -> dict | None:
        if not self.whole() or not self.assembler.complete():
            return None
        return self.assembler.message


# -- the request ---------------------------------------------------------------------------------


def _dicts(items: Any) -> Iterator[dict]:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                yield item


def _blocks_in_order(body: Mapping[str, Any]) -> Iterator[dict]:
    """Every content block of ``system`` and ``messages``, in the body's own order, with the
    blocks nested in ``tool_result`` right after their tool_result."""
    for name, value in body.items():
        if name == "system":
            yield from _with_nested(_dicts(value))
        elif name == "messages":
            for message in _dicts(value):
                yield from _with_nested(_dicts(message.get("content")))


def _with_nested(blocks: Iterator[dict]) -> Iterator[dict]:
    for block in blocks:
        yield block
        if block.get("type") == "tool_result":
            yield from _dicts(block.get("content"))


def message_images(body: Mapping[str, Any]) -> Iterator[ImageSlot]:
    """``{"type": "image", "source": {"type": "base64", "media_type", "data"}}`` blocks in
    messages, inside ``tool_result`` content (computer-use screenshots) and in ``system``."""
    for block in _blocks_in_order(body):
        source = block.get("source")
        if (block.get("type") == "image" and isinstance(source, dict)
                and source.get("type") == "base64" and isinstance(source.get("data"), str)):
            media_type = source.get("media_type")
            yield ImageSlot(source, "data", "base64", media_type if isinstance(media_type, str) else None,
                            "media_type" if "media_type" in source else None)


def message_tool_call_ids(body: Mapping[str, Any]) -> Iterator[IdSlot]:
    """``tool_use.id`` and ``tool_result.tool_use_id``, in document order."""
    for block in _blocks_in_order(body):
        if block.get("type") == "tool_use" and isinstance(block.get("id"), str):
            yield IdSlot(block, "id")
        elif block.get("type") == "tool_result" and isinstance(block.get("tool_use_id"), str):
            yield IdSlot(block, "tool_use_id")


class MessagesApi(Api):
    mode = "messages"
    routes = ("/v1/messages", "/messages", "/api/v1/messages")
    upstream_path = "/messages"
    key_headers = ("anthropic-version", "anthropic-beta")
    client_key_headers = ("Authorization", "x-api-key")
    # Token counting: forwarded as it is, never cached.
    forwarded_routes = {route + "/count_tokens": "/messages/count_tokens" for route in routes}

    def validate(self, body: Mapping[str, Any]) -> None:
        require_model(body)
        require_objects(body, "messages", "messages.{}")  # Anthropic names items with dots
        require_stream_flag(body)

    def key_extra(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> dict | None:
        """The version and beta headers, and a top-level ``cache_control`` of Anthropic's own
        form (only ``{"enabled": ...}`` is the proxy's switch, left out of every key)."""
        extra = super().key_extra(body, headers) or {}
        control = body.get("cache_control")
        if isinstance(control, dict) and not set(control) <= {"enabled"}:
            extra["cache_control"] = control
        return extra or None

    def client_key(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-api-key") or bearer_token(headers.get("Authorization"))

    def upstream_target(self, settings: Settings) -> UpstreamTarget:
        base_url = settings.anthropic_upstream_base_url or settings.upstream_base_url
        api_key = settings.anthropic_upstream_api_key
        if not api_key and not settings.anthropic_upstream_base_url:
            api_key = settings.upstream_api_key  # the same upstream as chat: the same key
        style = settings.anthropic_upstream_auth
        if style == "auto":
            host = urlsplit(base_url).hostname or ""
            style = "x-api-key" if host == "anthropic.com" or host.endswith(".anthropic.com") else "bearer"
        return UpstreamTarget(base_url, api_key, style, self.client_key_headers, self.key_headers)

    def inline_images(self, body: Mapping[str, Any]) -> Iterator[ImageSlot]:
        return message_images(body)

    def tool_call_ids(self, body: Mapping[str, Any]) -> Iterator[IdSlot]:
        return message_tool_call_ids(body)

    def error_body(self, error: ApiError) -> dict:
        kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return anthropic_error(kind, error.message)

    def uncacheable_reason(self, answer: Any) -> str | None:
        reason = super().uncacheable_reason(answer)
        if reason:
            return reason
        if answer.get("type") != "message" or not isinstance(answer.get("content"), list):
            return "upstream response is not a message"
        return None

    def usage_figures(self, answer: Any) -> dict[str, Any]:
        """Input tokens count those written to and read from Anthropic's prompt cache too."""
        usage = answer.get("usage") if isinstance(answer, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        prompt = sum(whole_number(usage.get(name)) for name in
                     ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        cost = usage.get("cost")
        return {"prompt_tokens": int(prompt), "completion_tokens": int(whole_number(usage.get("output_tokens"))),
                "cache_read_tokens": int(whole_number(usage.get("cache_read_input_tokens"))),
                "cache_write_tokens": int(whole_number(usage.get("cache_creation_input_tokens"))),
                "cost_usd": float(whole_number(cost)) if cost is not None else None}

    def replay(self, answer: dict, variant: Hashable) -> Iterator[bytes]:
        return replay_message(answer)

    def capture(self, body: Mapping[str, Any], drop_usage: bool) -> MessageCapture:
        return MessageCapture()


MESSAGES = MessagesApi()
