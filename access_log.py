"""One access-log line per request, built only from facts that are safe to keep.

A line holds the method, the matched route (never the raw path or query string, which a client
controls), the status, the cache status, the first 12 characters of the cache key, the upstream
status and the latency. Headers, keys and bodies never reach it, so the log can be shipped
anywhere without carrying prompts or credentials.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from flask import Flask, Response, g, request

ACCESS_LOGGER = "computer_use_cache.access"
KEY_PREFIX_CHARS = 12

_KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def register_access_log(app: Flask, upstream_status: Callable[[], int | None],
                        reset_upstream_status: Callable[[], None]) -> None:
    """Log each request once, when its response is closed (so a stream's latency is its length).

    Register this before any other ``before_request`` hook: a hook that answers early (a CORS
    preflight, a refused key) skips the hooks after it.
    """
    log = logging.getLogger(ACCESS_LOGGER)

    @app.before_request
    def start_clock() -> None:
        g.access_started = time.monotonic()
        reset_upstream_status()

    @app.after_request
    def schedule_line(response: Response) -> Response:
        started = g.get("access_started", time.monotonic())
        method = request.method if request.method in _KNOWN_METHODS else "OTHER"
        route = request.url_rule.rule if request.url_rule is not None else "(no route)"
        cache = response.headers.get("X-Computer-Use-Cache", "-")
        key = response.headers.get("X-Computer-Use-Cache-Key", "")[:KEY_PREFIX_CHARS] or "-"
        status = response.status_code

        def write_line() -> None:
            upstream = upstream_status()
            log.info("%s %s %d cache=%s key=%s upstream=%s %.1fms", method, route, status, cache,
                     key, upstream if upstream is not None else "-",
                     (time.monotonic() - started) * 1000)

        response.call_on_close(write_line)
        return response
