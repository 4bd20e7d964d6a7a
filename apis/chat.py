"""Chat completions (``/v1/chat/completions``): the API the proxy began with.

Also the home of what the OpenAI-style ``choices`` APIs share (``ChoicesApi``): legacy completions
(``apis/completions.py``) differ only in how a choice looks. The replay and the assembler are
inverses: a stored completion replayed as chunks folds back into the same completion in the
openai SDKs (``ChatCompletionStreamState``) and in ``ChatAssembler``.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator, Mapping

from apis.base import Api, require_model, require_objects, require_stream_flag
from errors import InvalidRequest
from images import IdSlot, ImageSlot
from streaming import (DONE_EVENT, ChoicesAssembler, ChunkFrame, StreamCapture, choice_extras, merge_piece,
                       sorted_choices, split_text)

# Message fields replay sends in pieces (in this order: providers stream reasoning first).
_TEXT_FIELDS = ("reasoning", "content", "refusal")
_MESSAGE_FIELDS_STREAMED = frozenset({"role", "tool_calls", "function_call", "reasoning_details",
                                      *_TEXT_FIELDS})


class ChoicesApi(Api):
    """What chat and legacy completions share: ``choices`` answers, ``n``, and usage on a stream
    only when asked for with ``stream_options.include_usage``."""

    usage_option = "stream_options"
    chunk_assembler: type[ChoicesAssembler] = ChoicesAssembler

    def validate(self, body: Mapping[str, Any]) -> None:
        require_model(body)
        self.validate_input(body)
        require_stream_flag(body)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object.", param="stream_options")

    def validate_input(self, body: Mapping[str, Any]) -> None:
        """The API's own input field (chat: messages; legacy: prompt)."""

    def replay_variant(self, body: Mapping[str, Any]) -> Hashable:
        """include_usage: whether the replay ends with the usage chunk."""
        return wants_usage(body)

    def usage_request(self, body: Mapping[str, Any]) -> dict | None:
        if wants_usage(body):
            return None
        return {"stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}

    def uncacheable_reason(self, answer: Any) -> str | None:
        reason = super().uncacheable_reason(answer)
        if reason:
            return reason
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices:
            return "upstream response has no choices"
        return None

    def assembled_refusal(self, body: Mapping[str, Any], answer: dict) -> str | None:
        expected = self.expected_choice_count(body)
        if expected is not None and len(answer["choices"]) != expected:
            return f"{len(answer['choices'])} choices, the request asked for {expected}"
        return None

    def expected_choice_count(self, body: Mapping[str, Any]) -> int | None:
        """How many choices a whole answer to ``body`` has, None when unsure."""
        return requested_n(body)

    def capture(self, body: Mapping[str, Any], drop_usage: bool) -> StreamCapture:
        return StreamCapture(self.chunk_assembler(), drop_usage_chunk=drop_usage)


def wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def requested_n(body: Mapping[str, Any]) -> int | None:
    """``n`` (default 1), None when it is not a positive whole number."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    return n


# -- replaying a stored completion --------------------------------------------------------------


def _chat_deltas(choice: dict) -> Iterator[tuple[dict, Any]]:
    """(delta, logprobs) pairs after the opening delta that rebuild one stored chat choice.

    Logprobs ride on the first text piece, never on a choice's first chunk: the Python SDK copies
    the first chunk's logprobs AND appends them again for a choice that is not in the first chunk.
    """
    message = choice.get("message") or {}
    logprobs = choice.get("logprobs")
    if message.get("reasoning_details") is not None:
        yield {"reasoning_details": message["reasoning_details"]}, None
    for name in _TEXT_FIELDS:
        value = message.get(name)
        for piece in split_text(value) if isinstance(value, str) else ():
            if name == "reasoning":
                yield {name: piece}, None
            else:
                yield {name: piece}, logprobs
                logprobs = None
    if logprobs is not None:
        yield {}, logprobs
    tool_calls = message.get("tool_calls")
    for position, call in enumerate(tool_calls if isinstance(tool_calls, list) else []):
        yield from _tool_call_deltas(position, call)
    function_call = message.get("function_call")
    if isinstance(function_call, dict):
        yield {"function_call": {"name": function_call.get("name"), "arguments": ""}}, None
        for piece in split_text(function_call.get("arguments") or ""):
            yield {"function_call": {"arguments": piece}}, None
    for name, value in message.items():
        # Provider extras (annotations, audio, images...) arrive whole in one delta.
        if name not in _MESSAGE_FIELDS_STREAMED and value is not None and value != "":
            yield {name: value}, None  # (null and "" went in the opening delta)


def _tool_call_deltas(position: int, call: Any) -> Iterator[tuple[dict, Any]]:
    """One opening delta (index, id, type, name, empty arguments), then argument pieces only.

    The wire index is the call's position: the SDKs accumulate into ``tool_calls[index]``.
    """
    if not isinstance(call, dict):
        return
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        yield {"tool_calls": [{**call, "index": position}]}, None  # custom tools: whole, once
        return
    opening = {"index": position, "id": call.get("id"), "type": "function",
               "function": {"name": function.get("name"), "arguments": ""}}
    opening.update((k, v) for k, v in call.items() if k not in ("index", "id", "type", "function"))
    yield {"tool_calls": [opening]}, None
    for piece in split_text(function.get("arguments") or ""):
        yield {"tool_calls": [{"index": position, "function": {"arguments": piece}}]}, None


def _chat_opening(message: dict) -> dict:
    """role (once), the content seed, and every field the stored message has as null or ""."""
    content = message.get("content")
    opening: dict[str, Any] = {"role": message.get("role") or "assistant",
                               "content": "" if isinstance(content, str) else None}
    if isinstance(message.get("refusal"), str):
        opening["refusal"] = ""
    for name, value in message.items():
        if name not in opening and (value is None or value == ""):
            opening[name] = value
    return opening

def replay_chat(completion: dict, include_usage: bool) -> Iterator[bytes]:
    frame = ChunkFrame(completion, "chat.completion.chunk", include_usage)
    for index, choice in sorted_choices(completion):
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        extras = choice_extras(choice)
        # The SDKs take a choice's extra fields from its first chunk only.
        yield frame({"index": index, "delta": _chat_opening(message), "logprobs": None,
                     "finish_reason": None, **extras})
        for delta, logprobs in _chat_deltas(choice):
            yield frame({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
        yield frame({"index": index, "delta": {}, "logprobs": None,
                     "finish_reason": choice.get("finish_reason"), **extras})
    if include_usage and completion.get("usage") is not None:
        yield frame.usage(completion["usage"])
    yield DONE_EVENT


class ChatAssembler(ChoicesAssembler):
    """Folds chat.completion.chunk objects into one chat.completion, as the SDKs do."""

    object_name = "chat.completion"

    def _new_choice(self, index: int) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": None, "refusal": None},
                "logprobs": None, "finish_reason": None}

    def _add_choice(self, index: int, piece: dict) -> None:
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = self._new_choice(index)
        message = choice["message"]
        delta = piece.get("delta") or {}
        for name, value in delta.items():
            if name == "role":
                if value:
                    message["role"] = value
            elif name == "tool_calls":
                if value is not None:
                    self._add_tool_calls(message, value)
                else:
                    message.setdefault(name, None)
            else:
                merge_piece(message, {name: value})
        self._add_logprobs(choice, piece.get("logprobs"))
        self._add_choice_fields(choice, piece)

    @staticmethod
    def _add_tool_calls(message: dict, deltas: list) -> None:
        calls = message.get("tool_calls")
        if calls is None:
            calls = message["tool_calls"] = []
        for delta in deltas:
            index = delta.get("index")
            if not isinstance(index, int):
                # Some providers omit the index and send each call whole: a new id is a new call.
                same = calls and (not delta.get("id") or calls[-1].get("id") == delta.get("id"))
                index = len(calls) - 1 if same else len(calls)
            while len(calls) <= index:
                calls.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            merge_piece(calls[index], {k: v for k, v in delta.items() if k != "index"})


def chat_images(body: Mapping[str, Any]) -> Iterator[ImageSlot]:
    """``messages[].content[]`` parts ``{"type": "image_url", "image_url": {"url": "data:..."}}``
    (or the bare-string form ``"image_url": "data:..."``)."""
    for message in _dicts(body.get("messages")):
        for part in _dicts(message.get("content")):
            if part.get("type") != "image_url":
                continue
            image = part.get("image_url")
            if isinstance(image, dict) and _is_data_url(image.get("url")):
                yield ImageSlot(image, "url", "data_url", None)
            elif _is_data_url(image):
                yield ImageSlot(part, "image_url", "data_url", None)


def chat_tool_call_ids(body: Mapping[str, Any]) -> Iterator[IdSlot]:
    """``messages[].tool_calls[].id`` and ``messages[].tool_call_id``, in document order."""
    for message in _dicts(body.get("messages")):
        for call in _dicts(message.get("tool_calls")):
            if isinstance(call.get("id"), str):
                yield IdSlot(call, "id")
        if isinstance(message.get("tool_call_id"), str):
            yield IdSlot(message, "tool_call_id")


def _dicts(items: Any) -> Iterator[dict]:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                yield item


def _is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value[:5].lower() == "data:"


class ChatApi(ChoicesApi):
    mode = "chat"
    routes = ("/v1/chat/completions", "/chat/completions", "/api/v1/chat/completions",
              "/api/chat/completions")
    upstream_path = "/chat/completions"
    chunk_assembler = ChatAssembler

    def validate_input(self, body: Mapping[str, Any]) -> None:
        require_objects(body, "messages", "messages[{}]")

    def inline_images(self, body: Mapping[str, Any]) -> Iterator[ImageSlot]:
        return chat_images(body)

    def tool_call_ids(self, body: Mapping[str, Any]) -> Iterator[IdSlot]:
        return chat_tool_call_ids(body)

    def replay(self, answer: dict, variant: Hashable) -> Iterator[bytes]:
        """Per choice, in ascending index order, an opening chunk with the role, text in a
        handful of pieces, each tool call opened once then argument pieces, a finish chunk; then
        the usage chunk only when include_usage (``variant``); then ``[DONE]``."""
        return replay_chat(answer, bool(variant))


CHAT = ChatApi()
