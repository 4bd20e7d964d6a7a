"""The OpenAI-compatible APIs the proxy speaks: their routes, request checks and cacheable answers.

One ``Endpoint`` per API mode. Later APIs (Responses, Anthropic Messages, embeddings) add an
endpoint here and reuse the cache flow unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from errors import InvalidRequest


def _require_model(body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if model is None or (isinstance(model, str) and not model.strip()):
        raise InvalidRequest("model is required.", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string.", param="model")


def _require_stream_flag(body: Mapping[str, Any]) -> None:
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object.", param="stream_options")


def validate_chat(body: Mapping[str, Any]) -> None:
    _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array.", param="messages")
    _require_stream_flag(body)


def validate_completion(body: Mapping[str, Any]) -> None:
    _require_model(body)
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise InvalidRequest("prompt is required.", param="prompt")
    if not isinstance(prompt, (str, list)):
        raise InvalidRequest("prompt must be a string or an array.", param="prompt")
    _require_stream_flag(body)


@dataclass(frozen=True)
class Endpoint:
    """One cacheable API: its cache mode, upstream path and object names."""

    mode: str
    upstream_path: str
    object_name: str
    chunk_object_name: str
    validate: Callable[[Mapping[str, Any]], None]


CHAT = Endpoint("chat", "/chat/completions", "chat.completion", "chat.completion.chunk", validate_chat)
COMPLETION = Endpoint("completion", "/completions", "text_completion", "text_completion",
                      validate_completion)
ENDPOINTS = {endpoint.mode: endpoint for endpoint in (CHAT, COMPLETION)}

CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions", "/api/v1/chat/completions",
               "/api/chat/completions")
COMPLETION_ROUTES = ("/v1/completions", "/completions", "/api/v1/completions")
MODEL_ROUTES = ("/v1/models", "/models", "/api/v1/models")


def uncacheable_reason(data: Any) -> str | None:
    """Why a 2xx upstream answer must not be stored, or None when it may be."""
    if not isinstance(data, dict):
        return "response is not a JSON object"
    if data.get("error") is not None:
        return "upstream response carries an error"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "upstream response has no choices"
    return None


def wants_stream(body: Mapping[str, Any]) -> bool:
    return body.get("stream") is True


def wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
