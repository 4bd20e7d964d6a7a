"""One access-log line per request, built only from facts that are safe to keep.

A line holds the method, the matched route (never the raw path or query string, which a client
controls), the status, the cache status, the first 12 characters of the cache key, the upstream
status and the latency. Headers, keys and bodies never reach it, so the log can be shipped
anywhere without carrying prompts or credentials.
"""

from __future__ import annotations

import logging

ACCESS_LOGGER = "computer_use_cache.access"
KEY_PREFIX_CHARS = 12

_KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class AccessLog:
    """Writes the lines; the request hooks (server.py) and the known-hit lane gather the facts."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or logging.getLogger(ACCESS_LOGGER)

    def write(self, method: str, route: str | None, status: int, cache: str | None,
              key: str | None, upstream: int | None, seconds: float) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        self._log.info("%s %s %d cache=%s key=%s upstream=%s %.1fms",
                       method if method in _KNOWN_METHODS else "OTHER", route or "(no route)",
                       status, cache or "-", (key or "")[:KEY_PREFIX_CHARS] or "-",
                       upstream if upstream is not None else "-", seconds * 1000)
