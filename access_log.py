"""One access-log line per request, built only from facts that are safe to keep.

A line holds the method, the matched route (never the raw path or query string, which a client
controls), the status, the cache status, the first 12 characters of the cache key, the upstream
status and the latency. Headers, keys and bodies never reach it, so the log can be shipped
anywhere without carrying prompts or credentials.

Writing a line through ``logging`` costs tens of microseconds, as much as the rest of a cache hit,
so a server process may hand the writing to a background thread (``start_background_writer``):
the request thread then only queues the record.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from typing import Any

ACCESS_LOGGER = "computer_use_cache.access"
KEY_PREFIX_CHARS = 12

_KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class AccessLog:
    """Writes the lines; the app's request hooks (server.py) gather the facts."""

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


class _RecordQueueHandler(logging.handlers.QueueHandler):
    """Queues the record as it is: formatting happens on the writer thread, not the request's."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def start_background_writer(logger: logging.Logger, handler: logging.Handler) -> Any:
    """Route ``logger``'s records through a queue to ``handler`` on one writer thread.

    Returns the listener; ``stop()`` it before the process exits, which writes what is queued.
    """
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    logger.addHandler(_RecordQueueHandler(records))
    listener.start()
    return listener
