"""Embeddings (``/v1/embeddings``): JSON only, never streamed.

``input``, ``encoding_format`` and ``dimensions`` are body fields, so they are in the key as sent:
the openai SDK asks for ``base64`` by default, and a float answer must never be handed to it.
"""

from __future__ import annotations

from typing import Any, Mapping

from apis.base import Api, require_model, require_text_or_list, whole_number
from errors import InvalidRequest

ENCODING_FORMATS = ("float", "base64")


class EmbeddingsApi(Api):
    mode = "embeddings"
    routes = ("/v1/embeddings", "/embeddings", "/api/v1/embeddings")
    upstream_path = "/embeddings"
    streams = False

    def validate(self, body: Mapping[str, Any]) -> None:
        require_model(body)
        require_text_or_list(body, "input")
        encoding = body.get("encoding_format")
        if encoding is not None and encoding not in ENCODING_FORMATS:
            raise InvalidRequest("encoding_format must be 'float' or 'base64'.", param="encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or dimensions < 1):
            raise InvalidRequest("dimensions must be a positive integer.", param="dimensions")

    def uncacheable_reason(self, answer: Any) -> str | None:
        reason = super().uncacheable_reason(answer)
        if reason:
            return reason
        data = answer.get("data")
        if not isinstance(data, list) or not data:
            return "upstream response has no embeddings"
        return None

    def usage_figures(self, answer: Any) -> dict[str, Any]:
        """Embeddings bill input tokens only."""
        figures = super().usage_figures(answer)
        if not figures["prompt_tokens"]:
            usage = answer.get("usage") if isinstance(answer, dict) else None
            if isinstance(usage, dict):
                figures["prompt_tokens"] = int(whole_number(usage.get("total_tokens")))
        return figures


EMBEDDINGS = EmbeddingsApi()
