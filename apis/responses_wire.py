"""The OpenAI Responses API on the wire (``POST /v1/responses``), independent of the proxy.

What the proxy needs to cache this API like chat completions: checking a request, deciding whether
an answer may be stored, replaying a stored response as the event stream OpenAI sends, passing a
live event stream through while keeping the response it ends with, and where a request keeps its
inline images and echoed ids. The grammar follows OpenAI's streaming-events reference and the
openai-python SDK's accumulator (``openai/lib/streaming/responses/_responses.py``), which takes
the final object only from ``response.completed`` and checks every output item's identity
(type, id, call_id) against the items it saw added and done. See ../shared/WIRE.md.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, NamedTuple

from errors import InvalidRequest
from images import IdSlot, ImageSlot
from streaming import json_bytes, split_text

# The events that end a Responses stream (there is no [DONE]); only the first holds an answer to store.
COMPLETED = "response.completed"
_ENDINGS = frozenset({COMPLETED, "response.failed", "response.incomplete"})

# Built-in tool calls whose progress OpenAI reports as in_progress -> searching -> completed.
_SEARCH_CALLS = frozenset({"web_search_call", "file_search_call"})


# -- requests ---------------------------------------------------------------------------------


def validate_responses(body: Mapping[str, Any]) -> None:
    """InvalidRequest (with the parameter's name) for a body the upstream would reject as malformed.

    ``model`` may be left out only when a stored prompt (``prompt``) supplies it, and ``input``
    may be left out (a stored prompt or a conversation can carry it), as the API allows.
    """
    model = body.get("model")
    if model is None or (isinstance(model, str) and not model.strip()):
        if body.get("prompt") is None:
            raise InvalidRequest("model is required.", param="model")
    elif not isinstance(model, str):
        raise InvalidRequest("model must be a string.", param="model")
    items = body.get("input")
    if items is not None and not isinstance(items, (str, list)):
        raise InvalidRequest("input must be a string or an array.", param="input")
    for index, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{index}] must be an object.", param=f"input[{index}]")
        if "role" in item and not isinstance(item.get("content"), (str, list)):
            raise InvalidRequest(f"input[{index}].content must be a string or an array.",
                                 param=f"input[{index}].content")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean.", param="stream")


def bypass_reason(body: Mapping[str, Any]) -> str | None:
    """Why a request must go upstream uncached, or None. A background request starts a job whose
    first answer is only "queued": forwarded, never stored, never answered from the store."""
    if body.get("background") is True:
        return "background responses are not cached"
    return None


def _input_items(body: Mapping[str, Any]) -> Iterator[dict]:
    items = body.get("input")
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            yield item


def _is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value[:5].lower() == "data:"


def _image_parts(parts: Any) -> Iterator[ImageSlot]:
    for part in parts if isinstance(parts, list) else ():
        if isinstance(part, dict) and part.get("type") == "input_image" and _is_data_url(part.get("image_url")):
            yield ImageSlot(part, "image_url", "data_url", None)


def inline_images(body: Mapping[str, Any]) -> Iterator[ImageSlot]:
    """Every inline (data: URL) image of the request, in document order: ``input_image`` parts
    of input messages, the screenshot of a ``computer_call_output``, and ``input_image`` parts of
    a tool output given as a list of parts. Images by URL or file id are not inline."""
    for item in _input_items(body):
        yield from _image_parts(item.get("content"))
        output = item.get("output")
        if isinstance(output, list):
            yield from _image_parts(output)
        elif (isinstance(output, dict) and output.get("type") == "computer_screenshot"
              and _is_data_url(output.get("image_url"))):
            yield ImageSlot(output, "image_url", "data_url", None)


def tool_call_ids(body: Mapping[str, Any]) -> Iterator[IdSlot]:
    """Every id the request echoes from earlier answers, in document order.

    ``call_id`` of calls and their outputs; the ``id`` of every input item (only items the
    model made carry one: echoed messages, function/computer calls, reasoning; or an
    ``item_reference`` pointing at one); and safety-check ids (a ``computer_call``'s
    ``pending_safety_checks``, echoed in the output's ``acknowledged_safety_checks``). All of
    them are new after a live answer, so all of them break a replayed chain alike.
    """
    for item in _input_items(body):
        for key, value in item.items():
            if key in ("id", "call_id") and isinstance(value, str):
                yield IdSlot(item, key)
            elif key in ("pending_safety_checks", "acknowledged_safety_checks") and isinstance(value, list):
                for check in value:
                    if isinstance(check, dict) and isinstance(check.get("id"), str):
                        yield IdSlot(check, "id")


# -- answers ----------------------------------------------------------------------------------


def storable_reason(data: Any) -> str | None:
    """Why a 2xx JSON answer must not be stored, or None when it may be."""
    if not isinstance(data, dict):
        return "response is not a JSON object"
    if data.get("error") is not None:
        return "upstream response carries an error"
    if data.get("background") is True:
        return "background responses are not stored"
    status = data.get("status")
    if status != "completed":
        return f"response status is {status!r}, not 'completed'"
    if not isinstance(data.get("output"), list):
        return "upstream response has no output"
    return None


class UsageFigures(NamedTuple):
    """What one answer cost, as the Responses API reports it."""
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: float | None  # OpenRouter adds usage.cost; OpenAI itself does not


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_figures(response: Any) -> UsageFigures:
    """Token counts (0 where missing or malformed) and the upstream's own cost if it sent one."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return UsageFigures(0, 0, 0, None)
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    cost = usage.get("cost")
    if not isinstance(cost, (int, float)) or isinstance(cost, bool) or cost != cost or cost < 0:
        cost = None
    return UsageFigures(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")), _count(cached),
                        None if cost is None else float(cost))


# -- replaying a stored response ----------------------------------------------------------------


def sse_frame(event_type: str, payload: Any) -> bytes:
    """One Responses event: its ``event:`` name line, then its JSON."""
    return b"event: " + event_type.encode() + b"\ndata: " + json_bytes(payload) + b"\n\n"


def _in_progress(response: dict) -> dict:
    """The response as ``response.created`` / ``response.in_progress`` show it: no output yet."""
    view = {**response, "status": "in_progress", "output": []}
    for name in ("usage", "completed_at", "error", "incomplete_details"):
        if name in view:
            view[name] = None
    return view


def _opened(item: dict, **empty: Any) -> dict:
    """An output item as ``response.output_item.added`` shows it: in progress, its content empty."""
    opened = {**item, **empty}
    if "status" in item:
        opened["status"] = "in_progress"
    return opened


def _text_events(where: dict, delta_type: str, done_type: str, done_key: str, text: Any,
                 **done_extra: Any) -> Iterator[tuple[str, dict]]:
    text = text if isinstance(text, str) else ""
    for piece in split_text(text):
        yield delta_type, {**where, "delta": piece}
    yield done_type, {**where, done_key: text, **done_extra}


def _message_events(item: dict, where: dict) -> Iterator[tuple[str, dict]]:
    item_id = where["item_id"]
    content = item.get("content")
    for content_index, part in enumerate(content if isinstance(content, list) else ()):
        at = {"item_id": item_id, "output_index": where["output_index"], "content_index": content_index}
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "output_text":
            logprobs = part.get("logprobs") if isinstance(part.get("logprobs"), list) else []
            opening = {**part, "text": "", "annotations": []}
            if "logprobs" in part:
                opening["logprobs"] = []
            yield "response.content_part.added", {**at, "part": opening}
            text = part.get("text") if isinstance(part.get("text"), str) else ""
            for position, piece in enumerate(split_text(text)):
                # A client that collects logprobs concatenates them: all of them ride on one delta.
                yield "response.output_text.delta", {**at, "delta": piece,
                                                     "logprobs": logprobs if position == 0 else []}
            annotations = part.get("annotations")
            for annotation_index, annotation in enumerate(annotations if isinstance(annotations, list) else ()):
                yield "response.output_text.annotation.added", {**at, "annotation_index": annotation_index,
                                                                "annotation": annotation}
            yield "response.output_text.done", {**at, "text": text, "logprobs": logprobs}
        elif kind == "refusal":
            yield "response.content_part.added", {**at, "part": {**part, "refusal": ""}}
            yield from _text_events(at, "response.refusal.delta", "response.refusal.done", "refusal",
                                    part.get("refusal"))
        else:
            yield "response.content_part.added", {**at, "part": part}
        yield "response.content_part.done", {**at, "part": part}


def _reasoning_events(item: dict, where: dict) -> Iterator[tuple[str, dict]]:
    summary = item.get("summary")
    for summary_index, part in enumerate(summary if isinstance(summary, list) else ()):
        if not isinstance(part, dict):
            continue
        at = {**where, "summary_index": summary_index}
        yield "response.reasoning_summary_part.added", {**at, "part": {**part, "text": ""}}
        yield from _text_events(at, "response.reasoning_summary_text.delta",
                                "response.reasoning_summary_text.done", "text", part.get("text"))
        yield "response.reasoning_summary_part.done", {**at, "part": part}
    content = item.get("content")
    for content_index, part in enumerate(content if isinstance(content, list) else ()):
        at = {**where, "content_index": content_index}
        if not isinstance(part, dict):
            continue
        if part.get("type") == "reasoning_text":
            yield "response.content_part.added", {**at, "part": {**part, "text": ""}}
            yield from _text_events(at, "response.reasoning_text.delta", "response.reasoning_text.done",
                                    "text", part.get("text"))
        else:
            yield "response.content_part.added", {**at, "part": part}
        yield "response.content_part.done", {**at, "part": part}


def _item_events(item: Any, output_index: int) -> Iterator[tuple[str, dict]]:
    """The events from ``response.output_item.added`` to ``response.output_item.done`` of one item."""
    if not isinstance(item, dict):
        item = {}
    kind = item.get("type")
    where = {"item_id": item.get("id"), "output_index": output_index}
    at_index = {"output_index": output_index}
    if kind == "message":
        yield "response.output_item.added", {**at_index, "item": _opened(item, content=[])}
        yield from _message_events(item, where)
    elif kind == "function_call":
        yield "response.output_item.added", {**at_index, "item": _opened(item, arguments="")}
        yield from _text_events(where, "response.function_call_arguments.delta",
                                "response.function_call_arguments.done", "arguments", item.get("arguments"),
                                name=item.get("name"))  # the current reference has the name here too
    elif kind == "custom_tool_call":
        yield "response.output_item.added", {**at_index, "item": _opened(item, input="")}
        yield from _text_events(where, "response.custom_tool_call_input.delta",
                                "response.custom_tool_call_input.done", "input", item.get("input"))
    elif kind == "reasoning":
        empty = {"summary": []}
        if isinstance(item.get("content"), list):
            empty["content"] = []
        yield "response.output_item.added", {**at_index, "item": _opened(item, **empty)}
        yield from _reasoning_events(item, where)
    else:  # computer_call and the other built-in tool calls arrive whole
        yield "response.output_item.added", {**at_index, "item": _opened(item)}
        if kind in _SEARCH_CALLS:
            for stage in ("in_progress", "searching", "completed"):
                yield f"response.{kind}.{stage}", dict(where)
    yield "response.output_item.done", {**at_index, "item": item}


def replay_response(response: dict) -> Iterator[bytes]:
    """The Responses SSE stream that rebuilds the stored ``response`` in any official client.

    ``response.created`` and ``response.in_progress`` (status in_progress, no output), then per
    output item its added event, its content in a handful of delta pieces with the matching done
    events, and its done event carrying the whole item; last ``response.completed`` carrying the
    stored response unchanged. ``sequence_number`` counts from 0.
    """
    def events() -> Iterator[tuple[str, dict]]:
        opening = _in_progress(response)
        yield "response.created", {"response": opening}
        yield "response.in_progress", {"response": opening}
        output = response.get("output")
        for output_index, item in enumerate(output if isinstance(output, list) else ()):
            yield from _item_events(item, output_index)
        yield COMPLETED, {"response": response}

    for sequence_number, (event_type, fields) in enumerate(events()):
        yield sse_frame(event_type, {"type": event_type, "sequence_number": sequence_number, **fields})


# -- assembling a live stream -------------------------------------------------------------------


_DECODER = json.JSONDecoder()
_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")


def _event_end(buffer: bytes, start: int) -> tuple[int, int]:
    """Where the first whole event after ``start`` ends and how long its blank-line separator is."""
    found = [(index, len(sep)) for sep in _SEPARATORS if (index := buffer.find(sep, start)) >= 0]
    return min(found) if found else (-1, 0)


def _fields(event: bytes) -> tuple[str | None, bytes | None]:
    """The ``event:`` name and the joined ``data:`` lines of one event (None when absent)."""
    head, newline, data_line = event.partition(b"\n")
    if head.startswith(b"event:") and data_line.startswith(b"data:") and b"\n" not in data_line:
        # The usual event: a name line and one data line (this runs for every event).
        return head[6:].strip().decode("utf-8", "replace"), data_line[5:].removeprefix(b" ")
    name = None
    data_lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data_lines.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, (b"\n".join(data_lines) if data_lines else None)


class ResponsesStreamAssembler:
    """Passes a live Responses event stream through unchanged and keeps the response it ends with.

    The same interface as ``streaming.StreamCapture``: ``feed`` returns the bytes to send on at
    once (every whole event, verbatim), ``finish``/``fail`` what to send when the upstream body
    ends or breaks off, ``done`` tells that the stream reached its end event, and ``completion``
    gives the response to store, only when ``response.completed`` came and nothing went wrong.
    """

    def __init__(self) -> None:
        self.done = False           # an end event came: response.completed / .failed / .incomplete
        self.failed = False         # an error, a failed or incomplete response, or a malformed event
        self.error_relayed = False  # the client has already been told the stream went wrong
        self.response: dict | None = None
        self._items: dict[int, Any] = {}  # output_item.done items, for a completed event without output
        self._next_sequence = 0
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        if b"\r" not in buffer:  # then only one separator can occur: one search per event
            while (end := buffer.find(b"\n\n", start)) >= 0:
                self._accept(buffer[start:end])
                start = end + 2
        else:
            while (found := _event_end(buffer, start))[0] >= 0:
                self._accept(buffer[start:found[0]])
                start = found[0] + found[1]
        self._buffer = buffer[start:]
        return buffer[:start]

    def _accept(self, event: bytes) -> None:
        name, data = _fields(event)
        if data is None or data.strip() == b"[DONE]":
            return  # comments, retry hints, a stray [DONE]
        try:
            # What json.loads does with bytes that open an object (UTF-8), minus its detection.
            utf8 = data[:1] == b"{" and data[1:2] != b"\x00"
            payload = _DECODER.decode(data.decode("utf-8", "surrogatepass")) if utf8 else json.loads(data)
        except ValueError:  # UnicodeDecodeError is one
            self.failed = True
            return
        if not isinstance(payload, dict):
            self.failed = True
            return
        sequence = payload.get("sequence_number")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            self._next_sequence = max(self._next_sequence, sequence + 1)
        event_type = payload.get("type") if isinstance(payload.get("type"), str) else name
        if event_type == "error" or name == "error" or payload.get("error") is not None:
            self.failed = self.error_relayed = True
        elif event_type == "response.output_item.done":
            index = payload.get("output_index")
            if isinstance(index, int):
                self._items[index] = payload.get("item")
        elif event_type in _ENDINGS:
            self.done = True
            if event_type == COMPLETED and isinstance(payload.get("response"), dict) and self.response is None:
                self.response = payload["response"]
            else:
                self.failed = True  # failed, incomplete, or a completed event without a response

    def finish(self) -> bytes:
        """The last bytes for the client once the upstream body ended: an unterminated last event,
        and an error event when the stream stopped before its end event without saying why."""
        out = b""
        tail, self._buffer = self._buffer, b""
        if tail.strip():
            name, data = _fields(tail)
            try:
                whole = data is not None and isinstance(json.loads(data), dict)
            except ValueError:
                whole = False
            if whole:
                self._accept(tail.rstrip(b"\r\n"))
                out = tail.rstrip(b"\r\n") + b"\n\n"
        if not self.done and not self.error_relayed:
            out += self.fail("The upstream stream ended before it was complete.")
        return out

    def fail(self, message: str, code: str = "upstream_stream_failed") -> bytes:
        """The ``error`` event that ends a stream the upstream broke off (nothing if already ended).

        Both shapes at once: the fields at the top level, as OpenAI's reference documents them,
        and nested under ``error``, as the live API sends them and the openai SDK raises on.
        """
        self.failed = True
        if self.done or self.error_relayed:
            return b""
        self.error_relayed = True
        self._buffer = b""  # an unfinished event is dropped: appending to it would corrupt the error
        return sse_frame("error", {
            "type": "error", "sequence_number": self._next_sequence, "code": code, "message": message,
            "param": None, "error": {"type": "upstream_error", "code": code, "message": message, "param": None}})

    def completion(self) -> dict | None:
        """The response to store: only from a whole, clean stream that ended in response.completed."""
        response = self.response
        if self.failed or not self.done or response is None or self._buffer.strip():
            return None
        if response.get("output") is None and self._items:
            # Some upstreams leave output out of the completed event; the SDK rebuilds it likewise.
            response = {**response, "output": [self._items[index] for index in sorted(self._items)]}
        return response if storable_reason(response) is None else None
