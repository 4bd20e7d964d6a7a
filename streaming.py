"""Server-sent events: the pieces every API's replay and capture share, and OpenAI-style chunk streams.

``SseCapture`` passes a live upstream stream through event by event while an API's subclass
assembles the answer to store, and knows whether the stream ended cleanly. ``StreamCapture`` is
the OpenAI-style one (``data:`` chunks, ``[DONE]``), used by chat and legacy completions with
their assemblers (``apis/chat.py``, ``apis/completions.py``), which fold chunks the way the
openai SDKs do (``openai/lib/streaming/chat/_completions.py``): strings are concatenated, so
anything sent twice (``role``, a tool call's ``id`` or ``name``) would come back doubled.
See ../shared/WIRE.md for the formats.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

DONE_EVENT = b"data: [DONE]\n\n"
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()

# Top-level completion fields that are not repeated on every chunk: the rest (id, created, model,
# system_fingerprint, service_tier, provider, ...) are. ``obfuscation`` is OpenAI's per-chunk padding.
NOT_CHUNK_HEADER = frozenset({"object", "choices", "usage", "obfuscation"})

# Replayed text is cut into at most this many pieces: enough to look like a stream, few enough
# to stay cheap. A client cannot tell, since accumulation concatenates them.
_MAX_PIECES = 8
_MIN_PIECE_CHARS = 16

# Choice fields that are not "extras" riding along with a choice (native_finish_reason is one).
CHOICE_FIELDS = frozenset({"index", "message", "delta", "text", "logprobs", "finish_reason"})
# Inside merged objects (tool calls, reasoning_details, audio) these strings name, they don't grow.
_SET_ONCE_KEYS = frozenset({"index", "type", "id", "name", "format"})


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, with one encoder made once (this runs for every replayed chunk)."""
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (possible in stored JSON) cannot be UTF-8; \u escapes carry it exactly.
        return _ASCII_ENCODER.encode(value).encode("ascii")


def sse_event(payload: Any) -> bytes:
    return b"data: " + json_bytes(payload) + b"\n\n"


def error_event(message: str, type: str = "upstream_error", code: str = "upstream_stream_failed") -> bytes:
    return sse_event({"error": {"message": message, "type": type, "param": None, "code": code}})


def split_text(text: str) -> list[str]:
    if not text:
        return []
    size = max(_MIN_PIECE_CHARS, -(-len(text) // _MAX_PIECES))
    return [text[start:start + size] for start in range(0, len(text), size)]


def _chunk_header(completion: dict, object_name: str) -> dict:
    header = {"id": completion.get("id"), "object": object_name}
    header.update((name, value) for name, value in completion.items()
                  if name not in NOT_CHUNK_HEADER and name != "id")
    return header


def choice_extras(choice: dict) -> dict:
    """Provider fields on a choice (OpenRouter's native_finish_reason)."""
    return {name: value for name, value in choice.items() if name not in CHOICE_FIELDS}


def sorted_choices(completion: dict) -> list[tuple[int, dict]]:
    choices = [choice for choice in completion.get("choices") or [] if isinstance(choice, dict)]
    numbered = [(choice.get("index", position), choice) for position, choice in enumerate(choices)]
    return sorted(numbered, key=lambda item: item[0] if isinstance(item[0], int) else 0)


# -- replaying a stored completion --------------------------------------------------------------

class ChunkFrame:
    """The bytes of one chunk around its choice: the stored header fields (id, created, model,
    ...) are encoded once per replay, not once per chunk."""

    def __init__(self, completion: dict, object_name: str, include_usage: bool) -> None:
        header = json_bytes(_chunk_header(completion, object_name))
        self.prefix = b"data: " + header[:-1] + b',"choices":['
        self.suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def __call__(self, choice: dict) -> bytes:
        return self.prefix + json_bytes(choice) + self.suffix

    def usage(self, usage: Any) -> bytes:
        return self.prefix + b'],"usage":' + json_bytes(usage) + b"}\n\n"


def merge_piece(target: dict, piece: dict) -> None:
    """Folds a delta object into ``target``: strings grow (except names and ids), lists of
    indexed objects merge by ``index``, other lists extend, objects merge, other values replace."""
    for name, value in piece.items():
        current = target.get(name)
        if value is None:
            target.setdefault(name, None)
        elif current is None:
            target[name] = _fresh(value)
        elif name in _SET_ONCE_KEYS:
            continue
        elif isinstance(current, str) and isinstance(value, str):
            target[name] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            merge_piece(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            _merge_list(current, value)
        else:
            target[name] = value


def _fresh(value: Any) -> Any:
    """A copy that later merges may change without touching the chunk it came from."""
    if isinstance(value, dict):
        return {name: _fresh(item) for name, item in value.items()}
    if isinstance(value, list):
        if _indexed(value):
            merged: list = []
            _merge_list(merged, value)
            return merged
        return [_fresh(item) for item in value]
    return value


def _indexed(items: list) -> bool:
    return any(isinstance(item, dict) and isinstance(item.get("index"), int) for item in items)


def _merge_list(current: list, items: list) -> None:
    if not _indexed(items):
        current.extend(_fresh(item) for item in items)
        return
    by_index = {entry.get("index"): entry for entry in current if isinstance(entry, dict)}
    for item in items:
        existing = by_index.get(item.get("index")) if isinstance(item, dict) else None
        if existing is None:
            current.append(_fresh(item))
            if isinstance(item, dict):
                by_index[item.get("index")] = current[-1]
        else:
            merge_piece(existing, item)

class ChoicesAssembler:
    """Folds OpenAI-style chunks (a ``choices`` list each) into one answer, as the SDKs do;
    each API says how one choice grows (``_new_choice``, ``_add_choice``)."""

    object_name = ""

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict] = {}
        self.usage: Any = None

    def add(self, chunk: dict) -> None:
        for name, value in chunk.items():
            if name not in NOT_CHUNK_HEADER and (value is not None or name not in self.top):
                self.top[name] = value
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise ValueError("choices is not a list")
        for piece in choices:
            index = piece.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError("a choice index is not a whole number")
            self._add_choice(index, piece)

    def _new_choice(self, index: int) -> dict:
        raise NotImplementedError

    def _add_choice(self, index: int, piece: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def _add_logprobs(choice: dict, logprobs: Any) -> None:
        if isinstance(logprobs, dict):
            merged = choice["logprobs"] or {name: None for name in logprobs}
            for name, items in logprobs.items():
                if isinstance(items, list):
                    merged[name] = (merged.get(name) or []) + items
                elif name not in merged:
                    merged[name] = items
            choice["logprobs"] = merged

    @staticmethod
    def _add_choice_fields(choice: dict, piece: dict) -> None:
        for name, value in piece.items():
            if name not in CHOICE_FIELDS and (value is not None or name not in choice):
                choice[name] = value
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]

    def complete(self) -> bool:
        """Every choice 0..n-1 is there and finished."""
        return (bool(self.choices) and sorted(self.choices) == list(range(len(self.choices)))
                and all(choice["finish_reason"] is not None for choice in self.choices.values()))

    def result(self) -> dict:
        completion: dict[str, Any] = {"id": self.top.get("id"), "object": self.object_name}
        completion.update((k, v) for k, v in self.top.items() if k != "id")
        completion["choices"] = [self.choices[index] for index in sorted(self.choices)]
        if self.usage is not None:
            completion["usage"] = self.usage
        return completion

class SseCapture:
    """Passes upstream SSE through event by event and records what it saw; subclasses per wire
    format say what one event means (``_accept``) and how a stream ends in error (``fail``).

    ``feed`` returns the bytes to send to the client at once (whole events only: a partial one
    waits for its end). ``finish``/``fail`` say what to send when the upstream body ends or
    breaks off. ``done``: the terminal event came; ``failed``: something made the answer
    unstorable; ``error_relayed``: the client has already been sent an error event.
    """

    def __init__(self) -> None:
        self.done = False
        self.failed = False
        self.error_relayed = False
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        separator = b"\n\n" if b"\r" not in buffer else None
        out = []
        start = 0
        while True:
            if separator is not None:
                end = buffer.find(separator, start)
                length = 2
            else:
                end, length = _event_end(buffer, start)
            if end < 0:
                break
            event = buffer[start:end + length]
            relayed = self._accept(buffer[start:end])
            if relayed is not None:
                out.append(event if relayed is True else relayed)
            start = end + length
        self._buffer = buffer[start:]
        return b"".join(out)

    def _accept(self, event: bytes) -> bytes | bool | None:
        """Record one event (without its blank line); True: relay as is, bytes: relay these
        instead, None: drop it."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """The last bytes for the client once the upstream body ended: an unterminated last event,
        and an error event when the stream stopped before its end without saying why."""
        out = b""
        tail, self._buffer = self._buffer, b""
        if tail.strip() and _is_whole_event(tail):
            relayed = self._accept(tail.rstrip(b"\r\n"))
            if relayed is not None:
                out = (tail.rstrip(b"\r\n") + b"\n\n") if relayed is True else relayed
        if not self.done and not self.error_relayed:
            out += self.fail("The upstream stream ended before it was complete.")
        return out

    def fail(self, message: str, code: str = "upstream_stream_failed") -> bytes:
        """The error event that ends a stream the upstream broke off (nothing if already ended)."""
        self.failed = True
        if self.done or self.error_relayed:
            return b""
        self.error_relayed = True
        # An unfinished event is dropped: appending to it would corrupt the error event.
        self._buffer = b""
        return self.error_event(message, code)

    def error_event(self, message: str, code: str) -> bytes:
        raise NotImplementedError

    def json_payload(self, data: bytes, is_error: Callable[[dict], bool]) -> dict | None:
        """The event's JSON object, or None once the stream is marked failed: data that is not a
        JSON object, or an error event (then the client has been sent an error already)."""
        try:
            payload = decode_event_json(data)
        except ValueError:
            self.failed = True
            return None
        if not isinstance(payload, dict) or is_error(payload):
            self.failed = True
            self.error_relayed = self.error_relayed or isinstance(payload, dict)
            return None
        return payload

    def assemble(self, add: Callable[[dict], None], payload: dict) -> None:
        """Fold one payload into the answer; one that does not fit makes the stream unstorable
        (it is still relayed as it came)."""
        try:
            add(payload)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError):
            self.failed = True

    def completion(self) -> dict | None:
        """The assembled answer, only if the stream was whole and clean."""
        raise NotImplementedError

    def whole(self) -> bool:
        """The stream ended with its terminal event, nothing broken or left over."""
        return not self.failed and self.done and not self._buffer.strip()


def event_data(event: bytes) -> tuple[bytes | None, bool]:
    """(the data of one SSE event, whether it is the usual single ``data:`` line); None data for
    an event without any (comments, retry hints)."""
    one_line = event.startswith(b"data:") and b"\n" not in event and b"\r" not in event
    if one_line:
        return event[5:].lstrip(b" "), True  # the usual event: one data line (this runs per event)
    data_lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not data_lines:
        return None, False
    return b"\n".join(data_lines), False


def decode_event_json(data: bytes) -> Any:
    """The JSON of an event's data; ValueError when it is not JSON."""
    # What json.loads does with bytes that open an object (UTF-8), minus its detection.
    if data[:1] == b"{" and data[1:2] != b"\x00":
        return _DECODER.decode(data.decode("utf-8", "surrogatepass"))
    return json.loads(data)


class StreamCapture(SseCapture):
    """The OpenAI-style stream (``data:`` chunks, then ``data: [DONE]``) folded by ``assembler``.

    Every whole event goes to the client verbatim, except the usage the proxy asked for on its
    own account (``drop_usage_chunk``): then the usage-only chunk is dropped and ``"usage": null``
    is taken off the other chunks, so the client sees the stream it asked for. Keep-alive
    comments are forwarded but never assembled.
    """

    def __init__(self, assembler: ChoicesAssembler, *, drop_usage_chunk: bool = False) -> None:
        super().__init__()
        self.assembler = assembler
        self.drop_usage_chunk = drop_usage_chunk

    def _accept(self, event: bytes) -> bytes | bool | None:
        data, one_line = event_data(event)
        if data is None:
            return True  # comments, event names, retry hints
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        utf8 = data[:1] == b"{" and data[1:2] != b"\x00"
        chunk = self.json_payload(data, lambda payload: payload.get("error") is not None)
        if chunk is None:
            return True
        self.assemble(self.assembler.add, chunk)
        if self.drop_usage_chunk and "usage" in chunk:
            if chunk.get("choices") == []:
                return None
            # Cut only text read as UTF-8: in UTF-16 or -32 (json.loads reads those too) the
            # bytes of '"usage"' could belong to other characters.
            trimmed = _without_null_usage(event) if one_line and utf8 and chunk["usage"] is None else None
            if trimmed is not None:
                return trimmed + b"\n\n"
            without_usage = {name: value for name, value in chunk.items() if name != "usage"}
            return sse_event(without_usage)
        return True

    def error_event(self, message: str, code: str) -> bytes:
        return error_event(message, code=code)

    def completion(self) -> dict | None:
        """The assembled completion, only if the stream was whole and clean."""
        if not self.whole() or not self.assembler.complete():
            return None
        return self.assembler.result()


_ESCAPED_USAGE_LETTER = re.compile(rb"\\u00(?:7[35]|6[157])", re.IGNORECASE)  # u s a e g
# A "usage": null member with the comma that joins it to its neighbour (before it, or after it
# when it comes first); the lookahead keeps "null" from matching the start of a longer token.
_NULL_USAGE_MEMBER = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')


def _without_null_usage(event: bytes) -> bytes | None:
    """The event without its top-level ``"usage": null``, every other byte as the upstream sent
    it (its spacing, number formats and escapes), which re-encoding would not keep; and cheaper
    than encoding every chunk again. None where the member cannot be told apart for
    sure, and the caller re-encodes: "usage" written more than once (a nested key, or a value)
    or a \\u escape of one of its letters (the top-level key could be the one written so)."""
    if event.count(b'"usage"') != 1 or _ESCAPED_USAGE_LETTER.search(event):
        return None
    trimmed, found = _NULL_USAGE_MEMBER.subn(b"", event, count=1)
    return trimmed if found else None


def _is_whole_event(event: bytes) -> bool:
    """An event the upstream did not terminate with a blank line, but that is whole nonetheless."""
    data = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    if not data or data.strip() == b"[DONE]":
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _event_end(buffer: bytes, start: int) -> tuple[int, int]:
    """Where the first whole event after ``start`` ends and how long its blank-line separator is."""
    candidates = [(buffer.find(sep, start), len(sep)) for sep in (b"\r\n\r\n", b"\n\n", b"\r\r")]
    found = [(index, length) for index, length in candidates if index >= 0]
    return min(found) if found else (-1, 0)
