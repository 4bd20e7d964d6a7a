"""Shared checks for the streaming tests: reading raw SSE, the wire rules, field-for-field comparison."""

from __future__ import annotations

import json
from typing import Any

import requests

# Deltas strings the official SDKs set rather than concatenate.
_SET_ONCE_KEYS = ("index", "type")


def read_sse(response: requests.Response) -> list[str]:
    """The ``data:`` payloads of a streamed response in order (comments dropped)."""
    payloads = []
    for block in response.content.decode("utf-8").split("\n\n"):
        lines = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if lines:
            payloads.append("\n".join(lines))
    return payloads


def sse_comments(response_bytes: bytes) -> list[str]:
    return [line for line in response_bytes.decode("utf-8").split("\n") if line.startswith(":")]


def assert_matches(expected: Any, actual: Any, path: str = "$") -> None:
    """Every field ``expected`` has is in ``actual`` with the same value; lists match item by item.

    ``actual`` may carry more keys (an SDK model adds ``parsed``, ``audio``...); it may not lack,
    add to, reorder or change anything ``expected`` has.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{path}.{key} missing (have {sorted(actual)})"
            assert_matches(value, actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), f"{path}: {len(actual)} items, expected {len(expected)}"
        for position, (want, have) in enumerate(zip(expected, actual)):
            assert_matches(want, have, f"{path}[{position}]")
    else:
        assert actual == expected and type(actual) is type(expected), f"{path}: {actual!r} != {expected!r}"


def fold_delta(acc: dict, delta: dict) -> dict:
    """Folds one delta into ``acc`` the way agents and the SDKs do: strings are concatenated
    (so a repeated ``role``/``id``/``name`` shows up as a doubled value), ``index``/``type`` set,
    lists of indexed objects merged by ``index``, other lists extended."""
    for key, value in delta.items():
        if key not in acc or acc[key] is None:
            if _indexed(value):
                acc[key] = []
            else:
                acc[key] = json.loads(json.dumps(value))
                continue
        current = acc[key]
        if key in _SET_ONCE_KEYS:
            acc[key] = value
        elif isinstance(current, str) and isinstance(value, str):
            acc[key] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            fold_delta(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            if _indexed(value):
                for entry in value:
                    position = entry["index"]
                    if position < len(current):
                        fold_delta(current[position], entry)
                    else:
                        current.insert(position, json.loads(json.dumps(entry)))
            else:
                current.extend(value)
        else:
            acc[key] = value
    return acc


def _indexed(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(entry, dict) and "index" in entry for entry in value)


def accumulate_chat_chunks(chunks: list[dict]) -> dict:
    """One chat.completion from chunk dicts, folded by hand the way an agent loop does it."""
    completion: dict[str, Any] = {}
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for key, value in chunk.items():
            if key not in ("choices", "object", "usage"):
                completion.setdefault(key, value)
        if chunk.get("usage") is not None:
            completion["usage"] = chunk["usage"]
        for piece in chunk["choices"]:
            index = piece["index"]
            if index not in choices:
                # Like the SDKs, other choice fields (native_finish_reason) come from the first chunk.
                choices[index] = {k: v for k, v in piece.items() if k not in ("delta", "logprobs")}
                choices[index].update(message={}, logprobs=None)
            choice = choices[index]
            fold_delta(choice["message"], piece.get("delta") or {})
            if piece.get("finish_reason"):
                choice["finish_reason"] = piece["finish_reason"]
            logprobs = piece.get("logprobs")
            if logprobs is not None:
                if choice["logprobs"] is None:
                    choice["logprobs"] = json.loads(json.dumps(logprobs))
                else:
                    for name, items in logprobs.items():
                        if items:
                            choice["logprobs"][name] = (choice["logprobs"].get(name) or []) + items
    completion["object"] = "chat.completion"
    completion["choices"] = [choices[index] for index in sorted(choices)]
    return completion


def check_chat_wire_rules(payloads: list[str], stored: dict, include_usage: bool) -> list[dict]:
    """Asserts the chat stream rules of WIRE.md on raw SSE payloads; returns the chunk dicts."""
    assert payloads and payloads[-1] == "[DONE]", "the stream must end with data: [DONE]"
    assert "[DONE]" not in payloads[:-1]
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    return _check_common_rules(chunks, stored, include_usage, "chat.completion.chunk", _check_chat_choice)


def check_text_wire_rules(payloads: list[str], stored: dict, include_usage: bool) -> list[dict]:
    assert payloads and payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    return _check_common_rules(chunks, stored, include_usage, "text_completion", None)


def _check_common_rules(chunks, stored, include_usage, object_name, check_choice) -> list[dict]:
    for chunk in chunks:
        assert chunk["object"] == object_name
        for key in ("id", "created", "model", "system_fingerprint", "service_tier", "provider"):
            if key in stored:
                assert chunk[key] == stored[key], f"chunk {key} {chunk.get(key)!r} != stored {stored[key]!r}"
    if include_usage:
        assert all("usage" in chunk for chunk in chunks), "with include_usage every chunk carries usage"
        assert all(chunk["usage"] is None for chunk in chunks[:-1]), "usage is null until the last chunk"
        if stored.get("usage") is not None:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == stored["usage"]
            chunks = chunks[:-1]
    else:
        assert all("usage" not in chunk for chunk in chunks), "no usage field without include_usage"
    assert all(len(chunk["choices"]) == 1 for chunk in chunks), "one choice per chunk, no empty chunks"
    first_seen: list[int] = []
    for chunk in chunks:
        index = chunk["choices"][0]["index"]
        if index not in first_seen:
            first_seen.append(index)
    assert first_seen == list(range(len(first_seen))), f"choices first appear as {first_seen}"
    if check_choice is not None:
        for index in first_seen:
            check_choice([chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == index])
    for index in first_seen:
        finishes = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index
                    and c["choices"][0]["finish_reason"] is not None]
        assert len(finishes) == 1, "exactly one finish chunk per choice"
    return chunks


def _check_chat_choice(pieces: list[dict]) -> None:
    deltas = [piece["delta"] for piece in pieces]
    assert deltas[0].get("role") == "assistant", "the first delta of a choice carries the role"
    assert all("role" not in delta for delta in deltas[1:]), "role is sent once per choice"
    assert deltas[-1] == {} and pieces[-1]["finish_reason"], "a choice ends with delta {} and finish_reason"
    assert all(piece["finish_reason"] is None for piece in pieces[:-1])
    opened: set[int] = set()
    function_named = False
    for delta in deltas:
        for call in delta.get("tool_calls") or []:
            if call["index"] not in opened:
                opened.add(call["index"])
                assert call["id"] and call["type"] and call["function"]["name"], call
                assert call["function"]["arguments"] == ""
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}, call
        function_call = delta.get("function_call")
        if function_call is not None and "name" in function_call:
            assert not function_named, "function_call name sent twice"
            function_named = True
