"""OpenAI Responses (``/v1/responses``): OpenAI's computer use, the Agents SDK, Codex.

The wire itself (validation, replay, stream assembly, images and ids) is ``apis/responses_wire.py``;
this module puts it behind the proxy's interface. What the proxy does besides: a ``background``
request is forwarded and never cached, and every stored response can be retrieved again by its
id (``GET /v1/responses/{id}``) within the partition that stored it, since a replayed run
chains on ids the cache handed out (``previous_response_id``).
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator, Mapping

from apis import responses_wire as wire
from apis.base import Api
from images import IdSlot, ImageSlot


class ResponsesApi(Api):
    mode = "responses"
    routes = ("/v1/responses", "/responses", "/api/v1/responses")
    upstream_path = "/responses"
    # GET <route>/<id>: a stored response by id, else the upstream's.
    retrieval_routes = tuple(route + "/<item_id>" for route in routes)

    def validate(self, body: Mapping[str, Any]) -> None:
        wire.validate_responses(body)

    def bypass_reason(self, body: Mapping[str, Any]) -> str | None:
        return wire.bypass_reason(body)

    def inline_images(self, body: Mapping[str, Any]) -> Iterator[ImageSlot]:
        return wire.inline_images(body)

    def tool_call_ids(self, body: Mapping[str, Any]) -> Iterator[IdSlot]:
        return wire.tool_call_ids(body)

    def uncacheable_reason(self, answer: Any) -> str | None:
        return wire.storable_reason(answer)

    def usage_figures(self, answer: Any) -> dict[str, Any]:
        figures = wire.usage_figures(answer)
        return {"prompt_tokens": figures.input_tokens, "completion_tokens": figures.output_tokens,
                "cache_read_tokens": figures.cached_input_tokens, "cost_usd": figures.cost_usd}

    def retrieval_ids(self, answer: Any) -> tuple[str, ...]:
        response_id = answer.get("id") if isinstance(answer, dict) else None
        return (response_id,) if isinstance(response_id, str) and response_id else ()

    def retrieval_path(self, item_id: str) -> str:
        return f"{self.upstream_path}/{item_id}"

    def replay(self, answer: dict, variant: Hashable) -> Iterator[bytes]:
        return wire.replay_response(answer)

    def capture(self, body: Mapping[str, Any], drop_usage: bool) -> wire.ResponsesStreamAssembler:
        return wire.ResponsesStreamAssembler()


RESPONSES = ResponsesApi()
