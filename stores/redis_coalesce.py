"""Single flight across instances: concurrent identical misses on every instance sharing a Redis
make one upstream call.

Threads of one process meet in a dict of in-flight keys, as with the lock file (coalesce.py).
Between processes and machines the leader holds a lease in Redis (``SET NX PX``, a token of its
own), renewed while it works; when its answer is stored (or never will be) it deletes the lease
and publishes on the key's channel. The first follower in a process subscribes to that channel
and waits for the message, never polling: it only looks at the lease again when the lease would
have expired, so a leader that died (and stopped renewing) frees its followers within
``lease_seconds``, and they go upstream. While Redis cannot be reached, flights stay within the
process.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time

from coalesce import Flight, SingleFlight
from store_errors import StoreError
from stores.redis import SOCKET_TIMEOUT_SECONDS, RedisStore

log = logging.getLogger("computer_use_cache.coalesce")

LEASE_SECONDS = 10.0


class RedisCoalescer(SingleFlight):
    def __init__(self, store: RedisStore, timeout_seconds: float, lease_seconds: float = LEASE_SECONDS):
        super().__init__(timeout_seconds)
        self.store = store
        self.lease_seconds = lease_seconds
        self._held: dict[str, str] = {}  # key -> token of the leases this process holds
        self._pid: int | None = None

    def _lease(self, key: str) -> str:
        return self.store.key("lease:", key)

    def _channel(self, key: str) -> str:
        return self.store.key("done:", key)

    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # the parent's flights are not ours
            self._pid, self._in_flight, self._held = os.getpid(), {}, {}
            threading.Thread(target=self._renew_forever, name="cache-lease-renewer", daemon=True).start()

    def begin(self, key: str) -> Flight:
        joined = self._join_here(key)
        if isinstance(joined, Flight):
            return joined
        event = joined
        token = secrets.token_hex(16)
        store = self.store
        try:
            acquired = store.run("write", lambda: store.client.set(
                self._lease(key), token, nx=True, px=int(self.lease_seconds * 1000)))
        except StoreError as exc:
            log.debug("coalescing within this process only: %s", exc)
            return Flight(self, key, event, leader=True)
        if acquired:
            with self._mutex:
                self._held[key] = token
            return Flight(self, key, event, leader=True)
        return Flight(self, key, event, leader=False, watches_other_process=True)

    def _release(self, flight: Flight) -> None:
        with self._mutex:
            token = self._held.pop(flight.key, None)
        try:
            if token is not None:
                self.store.run("write", lambda: self.store.release_script(
                    keys=[self._lease(flight.key), self._channel(flight.key)], args=[token]))
        except StoreError as exc:  # the lease expires by itself; its followers then go upstream
            log.debug("could not release the lease of %s: %s", flight.key[:12], exc)
        finally:
            self._finish(flight.key)

    def _wait_for_other(self, key: str) -> bool:
        """True once the leader elsewhere let go (or its lease expired), False at the timeout."""
        try:
            return self._watch_lease(key)
        except StoreError:
            return False  # cannot watch the leader: stop waiting, go upstream

    def _watch_lease(self, key: str) -> bool:
        store, lease = self.store, self._lease(key)
        deadline = time.monotonic() + self.timeout_seconds
        pubsub = store.client.pubsub()
        try:
            store.run("read", lambda: pubsub.subscribe(self._channel(key)))
            # Subscribed for sure before looking at the lease: a release in between is not missed.
            store.run("read", lambda: pubsub.get_message(timeout=SOCKET_TIMEOUT_SECONDS))
            while True:
                left_ms = store.run("read", lambda: store.client.pttl(lease))
                if left_ms == -2:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = left if left_ms < 0 else min(left, left_ms / 1000 + 0.01)
                message = store.run("read", lambda: pubsub.get_message(timeout=wait))
                if message is not None and message.get("type") == "message":
                    return True
        finally:
            try:
                pubsub.close()
            except Exception:  # closing a connection to a dead server
                pass

    def _renew_forever(self) -> None:
        """Keep this process's leases alive while their leaders work (a third of the lease)."""
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.lease_seconds / 3)
            with self._mutex:
                held = list(self._held.items())
            if not held:
                continue
            try:
                self.store.run("write", lambda: self.store.renew_script(
                    keys=[self._lease(key) for key, _ in held],
                    args=[int(self.lease_seconds * 1000), *(token for _, token in held)]))
            except StoreError as exc:
                log.debug("could not renew %d leases: %s", len(held), exc)
