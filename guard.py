"""Checks every request passes before its body is read: client key, header sanity, size, type.

They run in a ``before_request`` hook, so a refused request costs no body read, no JSON parsing,
no cache lookup and no upstream call. The order is the order a gateway user expects: who you are
(401), then what you sent (431/400 headers, 413 size, 400 content type).
"""

from __future__ import annotations

import hmac
import re
from typing import Any, Mapping

from werkzeug.wsgi import get_content_length

from errors import AuthenticationFailed, HeaderTooLarge, InvalidRequest, PayloadTooLarge
from upstream import bearer_token

# Routes that stay open when PROXY_API_KEYS is set: the service card and the health probe.
# Admin routes under /cache/ are guarded by CACHE_ADMIN_TOKEN instead.
PUBLIC_PATHS = frozenset({"/", "/healthz"})
ADMIN_PREFIX = "/cache/"

# Far above any real Authorization/JWT header, far below what lets one request eat memory.
MAX_HEADER_VALUE_CHARS = 16384
MAX_HEADERS_TOTAL_CHARS = 65536

# Control characters other than TAB. Header values containing them (CR/LF via obsolete line
# folding, NUL) are refused outright: nothing built from them may reach a log or the upstream.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def is_api_path(path: str) -> bool:
    """Every route but the public ones and the admin ones: completions, models, later APIs."""
    return path not in PUBLIC_PATHS and not path.startswith(ADMIN_PREFIX)


def check_request(environ: Mapping[str, Any], proxy_api_keys: tuple[str, ...], max_request_bytes: int,
                  *, api_path: bool, json_route: bool) -> None:
    """Every check in order, on the raw WSGI values: this runs on every request, hits included,
    and going through a Flask request's headers would re-parse the environ each time.

    ``json_route``: the request reached a route that takes a JSON body (a wrong route or method
    still gets its own 404/405, not a complaint about its content type).
    """
    if api_path:
        check_client_key(proxy_api_keys, environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_X_API_KEY"))
    check_headers({name: value for name, value in environ.items()
                   if name.startswith("HTTP_") and isinstance(value, str)})
    check_declared_size(declared_length(environ), max_request_bytes)
    if json_route:
        check_content_type(environ.get("CONTENT_TYPE"))


def declared_length(environ: Mapping[str, Any]) -> int | None:
    """The body's Content-Length; None when it has none (chunked) or it is not a number."""
    return get_content_length(environ)


def check_client_key(proxy_api_keys: tuple[str, ...], authorization: str | None,
                     api_key: str | None = None) -> None:
    """401 unless the bearer token (or, without one, the ``x-api-key`` header Anthropic clients
    send) is one of PROXY_API_KEYS (when any are configured).

    Every configured key is compared, each in constant time, so neither the answer time nor an
    early exit tells a caller how close a guess was or which key matched.
    """
    if not proxy_api_keys:
        return
    offered = (bearer_token(authorization) or api_key or "").encode("utf-8", "surrogateescape")
    matched = False
    for key in proxy_api_keys:
        matched |= hmac.compare_digest(offered, key.encode("utf-8"))
    if not matched:
        raise AuthenticationFailed(
            "Missing or invalid proxy API key. Send one of the keys in PROXY_API_KEYS as "
            "'Authorization: Bearer <key>'.")


def check_headers(headers: Mapping[str, str]) -> None:
    """No control characters in any value, no absurdly long value or header block."""
    items = list(headers.items())
    # One pass of the regex over all of it: this runs on every request, hits included.
    block = " ".join(f"{name} {value}" for name, value in items)
    if (len(block) > MAX_HEADERS_TOTAL_CHARS
            or any(len(value) > MAX_HEADER_VALUE_CHARS for _, value in items)):
        raise HeaderTooLarge(
            f"Request headers are too large (at most {MAX_HEADER_VALUE_CHARS} characters per "
            f"value and {MAX_HEADERS_TOTAL_CHARS} in all).")
    if _CONTROL_CHARS.search(block):
        raise InvalidRequest("A request header contains control characters (CR, LF or NUL).",
                             code="invalid_header")


def check_declared_size(content_length: int | None, limit: int) -> None:
    """413 from the Content-Length alone; bodies without one are capped while they are read."""
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(body_too_large_message(limit))


def body_too_large_message(limit: int) -> str:
    return f"Request body is too large: the limit is {limit} bytes (MAX_REQUEST_BYTES)."


def check_content_type(content_type: str | None) -> None:
    """JSON APIs take application/json (parameters such as charset=utf-8 allowed), as OpenAI does."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = (content_type or "")[:100] or "none"
        raise InvalidRequest(
            f"Content-Type must be application/json (got {shown!r}); with curl add "
            "-H 'Content-Type: application/json'.", code="invalid_content_type")
