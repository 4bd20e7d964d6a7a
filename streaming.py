"""Server-sent events for chat and legacy completions: replaying a stored answer, capturing a live one.

``replay`` turns one stored completion into the chunk stream an official SDK accumulates back into
exactly that completion. ``StreamCapture`` passes a live upstream stream through event by event
while assembling the completion to store, and knows whether the stream ended cleanly.
See ../shared/WIRE.md for the formats.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

DONE_EVENT = b"data: [DONE]\n\n"

# Fields every chunk repeats from the stored completion when present.
_CHUNK_HEADER_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier", "provider")

# Replayed text is cut into at most this many pieces: enough to look like a stream, few enough
# to stay cheap. A client cannot tell, since accumulation concatenates them.
_MAX_PIECES = 8
_MIN_PIECE_CHARS = 16


def sse_event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n\n"


def error_event(message: str, type: str = "upstream_error", code: str = "upstream_stream_failed") -> bytes:
    return sse_event({"error": {"message": message, "type": type, "param": None, "code": code}})


def split_text(text: str) -> list[str]:
    if not text:
        return []
    size = max(_MIN_PIECE_CHARS, -(-len(text) // _MAX_PIECES))
    return [text[start:start + size] for start in range(0, len(text), size)]


def _chunk_header(completion: dict, object_name: str) -> dict:
    header = {"id": completion.get("id"), "object": object_name}
    for name in _CHUNK_HEADER_FIELDS[1:]:
        if name in completion:
            header[name] = completion[name]
    return header


def _chat_deltas(choice: dict) -> Iterator[tuple[dict, dict]]:
    """(delta, extra choice fields) pairs that rebuild one stored chat choice."""
    message = choice.get("message") or {}
    content = message.get("content")
    refusal = message.get("refusal")
    tool_calls = message.get("tool_calls") or []
    logprobs = choice.get("logprobs")

    opening: dict[str, Any] = {"role": message.get("role") or "assistant",
                               "content": "" if isinstance(content, str) else None}
    if refusal is not None:
        opening["refusal"] = ""
    yield opening, {}

    pending_logprobs = {"logprobs": logprobs} if logprobs is not None else {}
    if isinstance(message.get("reasoning"), str):
        for piece in split_text(message["reasoning"]):
            yield {"reasoning": piece}, {}
    if message.get("reasoning_details"):
        yield {"reasoning_details": message["reasoning_details"]}, {}
    for name in ("content", "refusal"):
        value = message.get(name)
        if isinstance(value, str):
            for piece in split_text(value):
                yield {name: piece}, pending_logprobs
                pending_logprobs = {}
    if pending_logprobs:
        yield {}, pending_logprobs
    for position, call in enumerate(tool_calls):
        index = call.get("index", position)
        function = call.get("function") or {}
        opening_call = {"index": index, "id": call.get("id"), "type": call.get("type", "function"),
                        "function": {"name": function.get("name"), "arguments": ""}}
        yield {"tool_calls": [opening_call]}, {}
        for piece in split_text(function.get("arguments") or ""):
            yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, {}
    function_call = message.get("function_call")
    if isinstance(function_call, dict):
        yield {"function_call": {"name": function_call.get("name"), "arguments": ""}}, {}
        for piece in split_text(function_call.get("arguments") or ""):
            yield {"function_call": {"arguments": piece}}, {}
    for name, value in message.items():
        # Provider extras (audio, annotations, images...) arrive whole in one delta.
        if name not in _CHAT_MESSAGE_STREAMED and value is not None:
            yield {name: value}, {}


_CHAT_MESSAGE_STREAMED = {"role", "content", "refusal", "tool_calls", "function_call", "reasoning",
                          "reasoning_details"}


def _finish_fields(choice: dict) -> dict:
    fields = {"finish_reason": choice.get("finish_reason")}
    if "native_finish_reason" in choice:
        fields["native_finish_reason"] = choice["native_finish_reason"]
    return fields


def replay_chat(completion: dict, include_usage: bool) -> Iterator[bytes]:
    header = _chunk_header(completion, "chat.completion.chunk")
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, extra: dict, finish: dict | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        choice.update(extra)
        if finish:
            choice.update(finish)
        return sse_event({**header, "choices": [choice], **usage_field})

    choices = sorted(completion.get("choices") or [], key=lambda c: c.get("index", 0))
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        for delta, extra in _chat_deltas(choice):
            yield chunk(index, delta, extra)
        yield chunk(index, {}, {}, _finish_fields(choice))
    if include_usage and completion.get("usage") is not None:
        yield sse_event({**header, "choices": [], "usage": completion["usage"]})
    yield DONE_EVENT


def replay_text_completion(completion: dict, include_usage: bool) -> Iterator[bytes]:
    header = _chunk_header(completion, "text_completion")
    usage_field = {"usage": None} if include_usage else {}
    choices = sorted(completion.get("choices") or [], key=lambda c: c.get("index", 0))
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        logprobs = choice.get("logprobs")
        for piece in split_text(choice.get("text") or ""):
            yield sse_event({**header, "choices": [
                {"text": piece, "index": index, "logprobs": logprobs, "finish_reason": None}
            ], **usage_field})
            logprobs = None
        yield sse_event({**header, "choices": [
            {"text": "", "index": index, "logprobs": logprobs, **_finish_fields(choice)}
        ], **usage_field})
    if include_usage and completion.get("usage") is not None:
        yield sse_event({**header, "choices": [], "usage": completion["usage"]})
    yield DONE_EVENT


def replay(mode: str, completion: dict, include_usage: bool) -> Iterator[bytes]:
    """The SSE byte stream that rebuilds ``completion`` in any official client."""
    if mode == "completion":
        return replay_text_completion(completion, include_usage)
    return replay_chat(completion, include_usage)


# -- capturing a live stream ------------------------------------------------------------------


class ChatAssembler:
    """Folds chat.completion.chunk objects into one chat.completion, as the SDKs do."""

    object_name = "chat.completion"

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict] = {}
        self.usage: Any = None

    def add(self, chunk: dict) -> None:
        for name in _CHUNK_HEADER_FIELDS:
            if chunk.get(name) is not None:
                self.top[name] = chunk[name]
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            self._add_choice(choice)

    def _choice(self, index: int) -> dict:
        if index not in self.choices:
            self.choices[index] = {"index": index, "message": {"role": "assistant", "content": None,
                                                               "refusal": None},
                                   "logprobs": None, "finish_reason": None}
        return self.choices[index]

    def _add_choice(self, piece: dict) -> None:
        choice = self._choice(piece.get("index", 0))
        message = choice["message"]
        delta = piece.get("delta") or {}
        for name, value in delta.items():
            if value is None:
                continue
            if name == "role":
                message["role"] = value
            elif name == "tool_calls":
                self._add_tool_calls(message, value)
            elif name == "function_call":
                call = message.setdefault("function_call", {"name": None, "arguments": ""})
                if value.get("name"):
                    call["name"] = call["name"] or value["name"]
                call["arguments"] += value.get("arguments") or ""
            elif isinstance(value, str):
                message[name] = (message.get(name) or "") + value
            elif isinstance(value, list):
                message.setdefault(name, []).extend(value)
            else:
                message[name] = value
        logprobs = piece.get("logprobs")
        if isinstance(logprobs, dict):
            merged = choice["logprobs"] or {"content": None, "refusal": None}
            for name, items in logprobs.items():
                if isinstance(items, list):
                    merged[name] = (merged.get(name) or []) + items
            choice["logprobs"] = merged
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]
        if piece.get("native_finish_reason") is not None:
            choice["native_finish_reason"] = piece["native_finish_reason"]

    @staticmethod
    def _add_tool_calls(message: dict, deltas: list) -> None:
        calls = message.setdefault("tool_calls", [])
        by_index = {call["index"]: call for call in calls}
        for delta in deltas:
            index = delta.get("index", 0)
            call = by_index.get(index)
            if call is None:
                call = {"index": index, "id": None, "type": "function",
                        "function": {"name": None, "arguments": ""}}
                calls.append(call)
                by_index[index] = call
            if delta.get("id"):
                call["id"] = call["id"] or delta["id"]
            if delta.get("type"):
                call["type"] = delta["type"]
            function = delta.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = call["function"]["name"] or function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""

    def complete(self) -> bool:
        return bool(self.choices) and all(c["finish_reason"] is not None for c in self.choices.values())

    def result(self) -> dict:
        completion: dict[str, Any] = {"id": self.top.get("id"), "object": self.object_name}
        completion.update({k: v for k, v in self.top.items() if k != "id"})
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            calls = choice["message"].get("tool_calls")
            if calls:
                # The index only orders deltas on the wire; a whole message does not carry it.
                choice["message"]["tool_calls"] = [
                    {k: v for k, v in call.items() if k != "index"}
                    for call in sorted(calls, key=lambda c: c["index"])
                ]
            choices.append(choice)
        completion["choices"] = choices
        if self.usage is not None:
            completion["usage"] = self.usage
        return completion


class TextCompletionAssembler(ChatAssembler):
    """Folds legacy text_completion chunks into one text_completion."""

    object_name = "text_completion"

    def _choice(self, index: int) -> dict:
        if index not in self.choices:
            self.choices[index] = {"text": "", "index": index, "logprobs": None, "finish_reason": None}
        return self.choices[index]

    def _add_choice(self, piece: dict) -> None:
        choice = self._choice(piece.get("index", 0))
        choice["text"] += piece.get("text") or ""
        logprobs = piece.get("logprobs")
        if isinstance(logprobs, dict):
            merged = choice["logprobs"] or {}
            for name, items in logprobs.items():
                if isinstance(items, list):
                    merged[name] = (merged.get(name) or []) + items
            choice["logprobs"] = merged
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]

    def result(self) -> dict:
        completion: dict[str, Any] = {"id": self.top.get("id"), "object": self.object_name}
        completion.update({k: v for k, v in self.top.items() if k != "id"})
        completion["choices"] = [self.choices[index] for index in sorted(self.choices)]
        if self.usage is not None:
            completion["usage"] = self.usage
        return completion


class StreamCapture:
    """Passes upstream SSE through event by event and assembles what it saw.

    ``feed`` returns the bytes to send to the client at once: every whole event verbatim, except
    the usage-only chunk when the proxy asked for usage on its own account (``drop_usage_chunk``).
    Keep-alive comments are forwarded but never assembled.
    """

    def __init__(self, mode: str, *, drop_usage_chunk: bool = False) -> None:
        self.assembler = TextCompletionAssembler() if mode == "completion" else ChatAssembler()
        self.drop_usage_chunk = drop_usage_chunk
        self.done = False
        self.failed = False
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while True:
            end, separator_length = _event_end(self._buffer)
            if end < 0:
                break
            event = self._buffer[:end + separator_length]
            self._buffer = self._buffer[end + separator_length:]
            if self._accept(event[:end]):
                out.append(event)
        return b"".join(out)

    def _accept(self, event: bytes) -> bool:
        """Record one event; False when it must not reach the client."""
        data_lines = []
        for line in event.splitlines():
            if line.startswith(b"data:"):
                data_lines.append(line[5:].lstrip(b" "))
        if not data_lines:
            return True  # comments, event names, retry hints
        data = b"\n".join(data_lines)
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            self.failed = True
            return True
        if not isinstance(chunk, dict) or chunk.get("error") is not None:
            self.failed = True
            return True
        self.assembler.add(chunk)
        if self.drop_usage_chunk and chunk.get("choices") == [] and chunk.get("usage") is not None:
            return False
        return True

    def leftover(self) -> bytes:
        """Bytes after the last whole event (a stream that ended mid-event)."""
        return self._buffer

    def completion(self) -> dict | None:
        """The assembled completion, only if the stream was whole and clean."""
        if self.failed or not self.done or self._buffer.strip() or not self.assembler.complete():
            return None
        return self.assembler.result()


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first whole event ends and how long its blank-line separator is."""
    candidates = [(buffer.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r")]
    found = [(index, length) for index, length in candidates if index >= 0]
    return min(found) if found else (-1, 0)
