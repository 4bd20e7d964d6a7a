"""A small thread-safe LRU, for what the proxy remembers between requests (rendered replays,
request bytes already seen, screenshot fingerprints)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class RecentItems:
    """A small thread-safe LRU (values of at most ``max_bytes`` when they are bytes)."""

    def __init__(self, max_entries: int, max_bytes: int = 64 * 1024):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: Any) -> Any:
        with self._lock:
            value = self._items.get(name)
            if value is not None:
                self._items.move_to_end(name)
            return value

    def put(self, name: Any, value: Any) -> None:
        if isinstance(value, bytes) and len(value) > self.max_bytes:
            return
        with self._lock:
            self._items[name] = value
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
