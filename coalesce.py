"""Single flight: concurrent identical cacheable misses make one upstream call.

Threads of one process meet in a dict of in-flight keys; processes (gunicorn workers) meet on a
byte-range lock in one lock file beside the database, one byte per key. The leader calls the
upstream and stores the answer; followers wait, bounded in time, then read the store. A leader
whose answer was not stored simply releases: its followers then go upstream on their own, all at
once, rather than queueing behind one another.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from abc import ABC, abstractmethod

# Byte offsets are spread over this range; a collision only makes one request wait needlessly.
_OFFSET_SPACE = 2**62


class Flight:
    """One request's place in a flight: ``leader`` calls upstream, others ``wait`` then look up."""

    def __init__(self, coalescer: "SingleFlight", key: str, done: threading.Event, *, leader: bool,
                 watches_other_process: bool = False):
        self._coalescer = coalescer
        self.key = key
        self.leader = leader
        # The first follower in a process watches the other process's lock for its neighbours.
        self.watches_other_process = watches_other_process
        self._done = done
        self._released = False

    def wait(self) -> bool:
        """Follower: block until the leader finished (True) or the wait timed out (False)."""
        return self._coalescer._wait(self)

    def release(self) -> None:
        """Leader: the answer is stored (or will never be); let the followers look. Idempotent."""
        if self.leader and not self._released:
            self._released = True
            self._coalescer._release(self)


class SingleFlight(ABC):
    """What every coalescer shares: threads of one process meet in a dict of in-flight keys, and
    the first follower in a process watches the leader in another process (``_wait_for_other``)
    for its neighbours. Subclasses say how processes meet: ``begin`` and ``_release``."""

    def __init__(self, timeout_seconds: float):
        self.timeout_seconds = timeout_seconds
        self._mutex = threading.Lock()
        self._in_flight: dict[str, threading.Event] = {}

    @abstractmethod
    def begin(self, key: str) -> Flight:
        """Join the flight for key: the first caller anywhere leads, the others follow."""

    @abstractmethod
    def _release(self, flight: Flight) -> None:
        """The leader is done: let the other processes' followers go, then this process's."""

    @abstractmethod
    def _wait_for_other(self, key: str) -> bool:
        """True once the leader in another process let go, False at the timeout or when it cannot
        be watched (the followers then go upstream)."""

    def _after_fork(self) -> None:
        """Called under the mutex when the process is not the one that last joined a flight."""

    def _join_here(self, key: str) -> Flight | threading.Event:
        """A follower's Flight when this process already has key in flight; else key is now in
        flight here and its event is returned (the caller finds out who leads across processes)."""
        with self._mutex:
            self._after_fork()
            event = self._in_flight.get(key)
            if event is not None:
                return Flight(self, key, event, leader=False)
            event = threading.Event()
            self._in_flight[key] = event
            return event

    def _finish(self, key: str) -> None:
        with self._mutex:
            event = self._in_flight.pop(key, None)
        if event is not None:
            event.set()

    def _wait(self, flight: Flight) -> bool:
        if not flight.watches_other_process:
            return flight._done.wait(self.timeout_seconds)
        try:
            return self._wait_for_other(flight.key)
        finally:
            self._finish(flight.key)


class Coalescer(SingleFlight):
    """Processes meet on a byte-range lock in one lock file (the SQLite store's)."""

    def __init__(self, lock_path: str, timeout_seconds: float, poll_seconds: float = 0.005):
        super().__init__(timeout_seconds)
        self.lock_path = lock_path
        self.poll_seconds = poll_seconds
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def _lock_fd(self) -> int:
        pid = os.getpid()
        if self._fd_pid != pid:
            # Never closed while the process lives: closing any descriptor of the file would drop
            # every POSIX lock this process holds on it.
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._fd_pid = pid
            self._in_flight = {}
        return self._fd  # type: ignore[return-value]

    @staticmethod
    def _offset(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % _OFFSET_SPACE

    def _after_fork(self) -> None:
        self._lock_fd()

    def begin(self, key: str) -> Flight:
        joined = self._join_here(key)
        if isinstance(joined, Flight):
            return joined
        event = joined
        try:
            locked = self._try_lock(self._lock_fd(), key)
        except OSError:
            self._finish(key)  # let this process's followers go on without us
            raise
        if locked:
            return Flight(self, key, event, leader=True)
        return Flight(self, key, event, leader=False, watches_other_process=True)

    def _try_lock(self, fd: int, key: str) -> bool:
        """True when we hold the key's byte now; False when another process does."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(key), os.SEEK_SET)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise  # the lock itself is broken: never wait on it

    def _unlock(self, key: str) -> None:
        fcntl.lockf(self._lock_fd(), fcntl.LOCK_UN, 1, self._offset(key), os.SEEK_SET)

    def _release(self, flight: Flight) -> None:
        try:
            self._unlock(flight.key)
        finally:
            self._finish(flight.key)

    def _wait_for_other(self, key: str) -> bool:
        deadline = time.monotonic() + self.timeout_seconds
        # Poll the other process's lock; when it is free the answer is stored or never will be.
        try:
            while time.monotonic() < deadline:
                if self._try_lock(self._lock_fd(), key):
                    self._unlock(key)
                    return True
                time.sleep(self.poll_seconds)
            return False
        except OSError:
            return False  # cannot watch the other process: stop waiting, go upstream
