"""The one small interface every API the proxy serves implements.

``proxy.py``, ``server.py`` and the known-hit lane call only this; what differs per API (routes,
key mode, validation, error shape, where images live, how a stored answer is replayed as that
API's stream and how a live stream is assembled into a storable answer) lives in its module.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator, Mapping

from config import Settings
from errors import ApiError, InvalidRequest
from images import IdSlot, ImageSlot
from streaming import SseCapture
from upstream import UpstreamTarget, bearer_token


def require_model(body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if model is None or (isinstance(model, str) and not model.strip()):
        raise InvalidRequest("model is required.", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string.", param="model")


def require_stream_flag(body: Mapping[str, Any]) -> None:
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream must be a boolean.", param="stream")


def require_objects(body: Mapping[str, Any], name: str, item_name: str) -> None:
    """body[name] is a non-empty array of objects (``item_name`` formats an item's position)."""
    items = body.get(name)
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"{name} must be a non-empty array.", param=name)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            where = item_name.format(index)
            raise InvalidRequest(f"{where} must be an object.", param=where)


def require_text_or_list(body: Mapping[str, Any], name: str) -> None:
    """body[name] is a non-empty string or array (a prompt, an input)."""
    value = body.get(name)
    if value is None or value == "" or value == []:
        raise InvalidRequest(f"{name} is required.", param=name)
    if not isinstance(value, (str, list)):
        raise InvalidRequest(f"{name} must be a string or an array.", param=name)


def whole_number(value: Any) -> float:
    """A usage figure as a non-negative number; anything else (missing, text, bool) is 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return 0
    return value


def environ_key(header: str) -> str:
    """The WSGI environ key of a request header ("anthropic-version" -> "HTTP_ANTHROPIC_VERSION")."""
    return "HTTP_" + header.upper().replace("-", "_")


class Api:
    """One API: a subclass sets the class attributes and overrides what its wire needs."""

    mode: str = ""                      # the key's mode and the stored entry's API
    routes: tuple[str, ...] = ()        # the proxy's POST routes for it
    upstream_path: str = ""             # appended to the upstream base URL
    streams: bool = True                # False: JSON only, ``stream`` is never honoured
    # Request headers whose values change the answer: forwarded and part of the key.
    key_headers: tuple[str, ...] = ()
    # Request headers that carry the client's own upstream key: forwarded when the proxy holds
    # none, and then they partition the cache.
    client_key_headers: tuple[str, ...] = ("Authorization",)
    # The body field the proxy adds to a stream to have it report usage (None: always reported).
    usage_option: str | None = None
    # Other POST routes of the API, forwarded uncached: {proxy route: upstream path}.
    forwarded_routes: Mapping[str, str] = {}
    # GET routes (with an ``<item_id>``) answered from the store by ids of stored answers.
    retrieval_routes: tuple[str, ...] = ()

    # -- requests -------------------------------------------------------------------------------

    def validate(self, body: Mapping[str, Any]) -> None:
        """InvalidRequest for a body the upstream would refuse anyway (checked before the cache)."""
        require_model(body)
        require_stream_flag(body)

    def wants_stream(self, body: Mapping[str, Any]) -> bool:
        return self.streams and body.get("stream") is True

    def bypass_reason(self, body: Mapping[str, Any]) -> str | None:
        """Why a request of this API is forwarded and never cached, beyond the usual reasons."""
        return None

    def replay_variant(self, body: Mapping[str, Any]) -> Hashable:
        """What besides the stored answer shapes its replayed stream (chat: include_usage)."""
        return None

    def key_extra(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> dict | None:
        """Key material beyond the body less the ignored fields: the key headers, when sent."""
        sent = {name: headers.get(name) for name in self.key_headers if headers.get(name)}
        return {"http_headers": sent} if sent else None

    def client_key(self, headers: Mapping[str, str]) -> str | None:
        """The client's own upstream key, which partitions the cache when the proxy holds none."""
        return bearer_token(headers.get("Authorization"))

    def upstream_target(self, settings: Settings) -> UpstreamTarget:
        """Where misses go and how they authenticate (the OpenAI-compatible upstream)."""
        return UpstreamTarget(settings.upstream_base_url, settings.upstream_api_key,
                              client_key_headers=self.client_key_headers, forwarded_headers=self.key_headers)

    def inline_images(self, body: Mapping[str, Any]) -> Iterator[ImageSlot]:
        """Every inline image of the request, in document order."""
        return iter(())

    def tool_call_ids(self, body: Mapping[str, Any]) -> Iterator[IdSlot]:
        """Every tool-call id the request echoes, in document order."""
        return iter(())

    # -- answers --------------------------------------------------------------------------------

    def error_body(self, error: ApiError) -> dict:
        """The body of an error the proxy itself answers on this API's routes."""
        return error.body()

    def uncacheable_reason(self, answer: Any) -> str | None:
        """Why a 2xx upstream answer must not be stored, or None when it may be."""
        if not isinstance(answer, dict):
            return "response is not a JSON object"
        if answer.get("error") is not None:
            return "upstream response carries an error"
        return None

    def assembled_refusal(self, body: Mapping[str, Any], answer: dict) -> str | None:
        """Why an answer assembled from a whole stream still must not be stored (None: store it)."""
        return None

    def usage_figures(self, answer: Any) -> dict[str, Any]:
        """What one hit on this answer saves: prompt tokens (cached ones included, and also
        counted in ``cache_read_tokens`` / ``cache_write_tokens`` for pricing), completion
        tokens, and ``cost_usd`` when the upstream says it (OpenRouter's ``usage.cost``), else
        None (then ``pricing`` prices the tokens)."""
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if not isinstance(usage, dict):
            usage = {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        cost = usage.get("cost")
        return {
            "prompt_tokens": int(whole_number(usage.get("prompt_tokens"))),
            "completion_tokens": int(whole_number(usage.get("completion_tokens"))),
            "cache_read_tokens": int(whole_number(cached)),
            "cost_usd": float(whole_number(cost)) if cost is not None else None,
        }

    def retrieval_ids(self, answer: Any) -> tuple[str, ...]:
        """Ids a stored answer can be fetched again by (``retrieval_routes``)."""
        return ()

    def retrieval_path(self, item_id: str) -> str:
        """The upstream path of a retrieval the store cannot answer."""
        raise NotImplementedError

    # -- streams --------------------------------------------------------------------------------

    def usage_request(self, body: Mapping[str, Any]) -> dict | None:
        """Body fields that make a stream report usage the client did not ask for, or None."""
        return None

    def replay(self, answer: dict, variant: Hashable) -> Iterator[bytes]:
        """The SSE byte stream that rebuilds ``answer`` in the API's official clients."""
        raise NotImplementedError

    def capture(self, body: Mapping[str, Any], drop_usage: bool) -> SseCapture:
        """A capture that relays a live stream and assembles it into a storable answer
        (``drop_usage``: the usage the proxy asked for on its own is kept from the client)."""
        raise NotImplementedError
