"""The Responses half of the fake upstream: answers and their event streams, as OpenAI sends them.

Pure functions, stdlib only. ``responses_answer`` builds the ``response`` object a request gets
(an echo of its input, or scripted output items); ``responses_events`` is that answer as the
framed SSE events of ``stream: true`` (``event:`` line, ``data:`` JSON, blank line; no
``[DONE]``), with deltas cut about a token long and OpenAI's ``obfuscation`` padding on them.
``responses_event_payloads`` gives the same events as dicts, and the ``*_payloads`` variants the
streams that must never be stored: failed, incomplete, an ``error`` event, cut off midway.

Written from OpenAI's streaming-events reference independently of ``apis/responses_wire.py``,
so that tests of one against the other are not circular.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

DEFAULT_MODEL = "test/model-a"
BASE_CREATED = 1700000000
_TOKENISH = re.compile(r"\s*\S{1,6}|\s+")


# --------------------------------------------------------------------------- answers


def responses_answer(request: dict, call_number: int, scripted: list[dict] | None = None) -> dict:
    """The ``response`` object answering ``request``; ids are unique per ``call_number``.

    Without ``scripted``: one assistant message echoing the last input text. A ``background``
    request gets the queued job instead (no output yet), as OpenAI answers it. With ``scripted``: one
    output item per entry, each completed from a short spec (missing ids, call ids and statuses
    filled in): ``{"type": "message", "text": ...}``, ``{"type": "function_call", "name": ...,
    "arguments": str | dict}``, ``{"type": "computer_call", "action": {...},
    "pending_safety_checks": [...]}``, ``{"type": "reasoning", "summary": [str, ...],
    "encrypted_content": ...}``; any other item is taken as given.
    """
    specs = scripted if scripted is not None else [{"type": "message", "text": f"echo: {_input_text(request)}"}]
    output = [_output_item(spec, call_number, position) for position, spec in enumerate(specs)]
    input_tokens = _tokens(json.dumps(request.get("input"), sort_keys=True))
    output_tokens = sum(_tokens(json.dumps(item, sort_keys=True)) for item in output)
    reasoning_tokens = sum(_tokens(json.dumps(item.get("summary")))
                           for item in output if item["type"] == "reasoning")
    created = BASE_CREATED + call_number
    response = {
        "id": f"resp_{call_number:08x}fake{_hex(call_number, 32)}",
        "object": "response",
        "created_at": created,
        "status": "completed",
        "background": False,
        "completed_at": created + 1,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": request.get("model") or DEFAULT_MODEL,
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_logprobs": 0,
        "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation", "disabled"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": None,
        "metadata": request.get("metadata") or {},
    }
    if request.get("background") is True:
        # A background request is answered at once with the job queued; the output comes later.
        response.update(status="queued", background=True, completed_at=None, output=[], usage=None)
    return response


def _output_item(spec: dict, call_number: int, position: int) -> dict:
    suffix = f"{call_number:06x}{position:02x}{_hex(call_number * 31 + position, 40)}"
    kind = spec.get("type")
    if kind == "message":
        text = spec.get("text", "")
        parts = spec.get("content") or [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
        return {"id": spec.get("id", f"msg_{suffix}"), "type": "message", "status": "completed",
                "content": parts, "role": "assistant"}
    if kind == "function_call":
        arguments = spec.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"))
        return {"id": spec.get("id", f"fc_{suffix}"), "type": "function_call", "status": "completed",
                "arguments": arguments,
                "call_id": spec.get("call_id", f"call_{_hex(position + 7 * call_number, 24)}"),
                "name": spec["name"]}
    if kind == "computer_call":
        return {"id": spec.get("id", f"cu_{suffix}"), "type": "computer_call", "status": "completed",
                "action": spec["action"],
                "call_id": spec.get("call_id", f"call_{_hex(position + 11 * call_number, 24)}"),
                "pending_safety_checks": spec.get("pending_safety_checks", [])}
    if kind == "reasoning":
        item = {"id": spec.get("id", f"rs_{suffix}"), "type": "reasoning",
                "summary": [{"type": "summary_text", "text": text} for text in spec.get("summary", [])]}
        if "encrypted_content" in spec:
            item["encrypted_content"] = spec["encrypted_content"]
        return item
    return copy.deepcopy(spec)


def _input_text(request: dict) -> str:
    """The text of the last input item that has any."""
    items = request.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            return content
        texts = [part.get("text") for part in content if isinstance(part, dict)
                 and isinstance(part.get("text"), str)] if isinstance(content, list) else []
        if texts:
            return " ".join(texts)
    return ""


def _tokens(text: str) -> int:
    return 1 + len(text) // 4


def _hex(number: int, width: int) -> str:
    """A deterministic hex string of ``width`` digits, different for every number."""
    return format((number * 0x9E3779B97F4A7C15) % (16 ** width), f"0{width}x")


# --------------------------------------------------------------------------- streams


def responses_events(response: dict) -> list[str]:
    """The framed SSE events of ``response`` streamed, each ``event: ...\\ndata: ...\\n\\n``.

    Feed them to ``sse_reply(..., done=False)``: the Responses API sends no ``[DONE]``.
    """
    return [frame(payload) for payload in responses_event_payloads(response)]


def frame(payload: dict) -> str:
    """One event as OpenAI frames it: the event's type as its name, its JSON as data."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


def responses_event_payloads(response: dict) -> list[dict]:
    """The event dicts of a completed stream, numbered from 0."""
    body = [event for index, item in enumerate(response["output"]) for event in _item_stream(item, index)]
    return _numbered([*_opening(response), *body, {"type": "response.completed", "response": response}])


def failed_payloads(response: dict, message: str = "The model failed to generate a response.",
                    code: str = "server_error") -> list[dict]:
    """A stream that ends in ``response.failed`` after the first output item."""
    failed = {**_lifecycle_view(response), "status": "failed", "output": response["output"][:1],
              "error": {"code": code, "message": message}}
    items = _item_stream(response["output"][0], 0) if response["output"] else []
    return _numbered([*_opening(response), *items, {"type": "response.failed", "response": failed}])


def incomplete_payloads(response: dict, reason: str = "max_output_tokens") -> list[dict]:
    """A stream that ends in ``response.incomplete`` (the token budget ran out)."""
    incomplete = {**response, "status": "incomplete", "incomplete_details": {"reason": reason}}
    body = [event for index, item in enumerate(response["output"]) for event in _item_stream(item, index)]
    return _numbered([*_opening(response), *body, {"type": "response.incomplete", "response": incomplete}])


def error_payloads(response: dict, message: str = "Too Many Requests",
                   code: str = "too_many_requests") -> list[dict]:
    """A stream broken off by an ``error`` event, nested as the live API sends it."""
    error = {"type": "error", "error": {"type": code, "code": code, "message": message, "param": None}}
    return _numbered([*_opening(response), error])


def truncated_payloads(response: dict) -> list[dict]:
    """The stream cut off halfway through, before ``response.completed`` (the connection died)."""
    events = responses_event_payloads(response)
    return events[: max(2, (len(events) - 1) // 2)]


def _numbered(events: list[dict]) -> list[dict]:
    return [{"type": event["type"], "sequence_number": number,
             **{k: v for k, v in event.items() if k != "type"}} for number, event in enumerate(events)]


def _lifecycle_view(response: dict) -> dict:
    return {**response, "status": "in_progress", "completed_at": None, "output": [], "usage": None}


def _opening(response: dict) -> list[dict]:
    view = _lifecycle_view(response)
    return [{"type": "response.created", "response": view}, {"type": "response.in_progress", "response": view}]


def _token_pieces(text: str) -> list[str]:
    return _TOKENISH.findall(text)


def _obfuscation(piece: str) -> str:
    """OpenAI pads each delta event to hide its length; clients ignore the field."""
    return "x" * (16 - len(piece) % 16)


def _item_stream(item: dict, index: int) -> list[dict]:
    kind = item["type"]
    item_id = item.get("id")
    ids = {"item_id": item_id, "output_index": index}
    started = copy.deepcopy(item)
    if "status" in started:
        started["status"] = "in_progress"
    events: list[dict] = []
    if kind == "message":
        started["content"] = []
        events.append({"type": "response.output_item.added", "output_index": index, "item": started})
        for content_index, part in enumerate(item["content"]):
            at = {**ids, "content_index": content_index}
            empty = {**part, "text": ""} if part["type"] == "output_text" else {**part, "refusal": ""}
            events.append({"type": "response.content_part.added", **at, "part": empty})
            if part["type"] == "output_text":
                events += [{"type": "response.output_text.delta", **at, "delta": piece, "logprobs": [],
                            "obfuscation": _obfuscation(piece)} for piece in _token_pieces(part["text"])]
                events.append({"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []})
            else:
                events += [{"type": "response.refusal.delta", **at, "delta": piece}
                           for piece in _token_pieces(part["refusal"])]
                events.append({"type": "response.refusal.done", **at, "refusal": part["refusal"]})
            events.append({"type": "response.content_part.done", **at, "part": part})
    elif kind == "function_call":
        started["arguments"] = ""
        events.append({"type": "response.output_item.added", "output_index": index, "item": started})
        events += [{"type": "response.function_call_arguments.delta", **ids, "delta": piece,
                    "obfuscation": _obfuscation(piece)} for piece in _token_pieces(item["arguments"])]
        events.append({"type": "response.function_call_arguments.done", **ids, "arguments": item["arguments"],
                       "name": item["name"]})
    elif kind == "reasoning":
        started["summary"] = []
        events.append({"type": "response.output_item.added", "output_index": index, "item": started})
        for summary_index, part in enumerate(item["summary"]):
            at = {**ids, "summary_index": summary_index}
            events.append({"type": "response.reasoning_summary_part.added", **at,
                           "part": {"type": "summary_text", "text": ""}})
            events += [{"type": "response.reasoning_summary_text.delta", **at, "delta": piece,
                        "obfuscation": _obfuscation(piece)} for piece in _token_pieces(part["text"])]
            events.append({"type": "response.reasoning_summary_text.done", **at, "text": part["text"]})
            events.append({"type": "response.reasoning_summary_part.done", **at, "part": part})
    else:  # computer_call and other tool calls arrive whole
        events.append({"type": "response.output_item.added", "output_index": index, "item": started})
    events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events
