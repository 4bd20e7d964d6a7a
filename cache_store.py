"""The store contract (``CacheStore``) and its SQLite backend: a narrow interface that knows
nothing of HTTP.

``CacheStore`` lists what the server, the proxy, the CLI, the metrics and the dashboard call on a
store; ``SQLiteStore`` (below) and ``stores.redis.RedisStore`` implement it, and the contract tests
(``tests/test_cache_store.py``, ``tests/test_store_contract.py``) run against both. The table is the
original server's ``completions`` table, so a database it wrote keeps serving hits; schema changes
after that go through the numbered migrations (``store_schema.py``).
Background maintenance (``store_maintenance.py``) and browsing and export (``store_browsing.py``)
are mixins of ``SQLiteStore``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from store_browsing import StoreBrowsing
from store_browsing import TopEntry as TopEntry  # the dashboard imports it from here
from store_errors import StoreBusy, StoreError
from store_maintenance import MaintenanceReport, StoreMaintenance
from store_schema import MIGRATIONS

log = logging.getLogger("computer_use_cache.store")


SQLITE_MAGIC = b"SQLite format 3\x00"
# SQLITE_BUSY / SQLITE_LOCKED: another connection holds a lock; passing, not a broken database.
_BUSY_ERROR_CODES = {5, 6}


@dataclass
class _Unavailable:
    """Why the database could not be opened, and when to try again."""

    reason: str
    retry_at: float


@dataclass(frozen=True)
class CachedEntry:
    key: str
    mode: str
    model: str
    response_json: str
    created_at: float
    updated_at: float
    hits: int


@dataclass(frozen=True)
class NewEntry:
    key: str
    mode: str
    model: str
    request_json: str
    response_json: str
    # What one hit on this entry saves: the upstream's usage and cost, and how long it took.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    upstream_seconds: float = 0.0
    unpriced: bool = False  # the upstream said no cost and the price table knows no such model


@dataclass(frozen=True)
class NearRecord:
    """What near matching needs to find an entry again (issue 11)."""
    group: str           # hex digest: the request with tool ids renumbered and images blanked,
                         # plus mode, model, partition and namespace (so groups never cross them)
    fingerprints: bytes  # opaque to the store: the per-image fingerprints, encoded by images.py


class CacheStore(ABC):
    """What every backend does: the calls server.py, proxy.py, cli.py, metrics.py and dashboard.py
    make on a store. Failures raise ``StoreError``; callers then answer without the cache.

    Attributes every backend has: ``clock`` (the time source, injectable in tests),
    ``ttl_seconds`` (the server's TTL), ``on_error`` (told "read"/"write" on each failure), and
    the periods of its background flusher and maintainer.
    """

    clock: Callable[[], float]
    ttl_seconds: float
    on_error: Callable[[str], None] | None
    hit_flush_seconds: float
    maintenance_seconds: float

    # -- the expiry rule, the same for every backend ---------------------------------------------

    def is_expired(self, created_at: float, now: float | None = None,
                   expires_at: float | None = None) -> bool:
        """An entry's own deadline (X-Cache-TTL) wins; else the server's TTL from created_at."""
        now = self.clock() if now is None else now
        if expires_at is not None:
            return now > expires_at
        if self.ttl_seconds <= 0:
            return False
        return now - created_at > self.ttl_seconds

    def expiry_time(self, created_at: float, expires_at: float | None) -> float | None:
        """When an entry stops being served (None: never)."""
        if expires_at is not None:
            return None if expires_at >= NEVER_EXPIRES else expires_at
        return created_at + self.ttl_seconds if self.ttl_seconds > 0 else None

    # -- the background threads' loops, the same for every backend -------------------------------

    # Maintenance failures logged quietly (debug) rather than with a traceback: the backend's
    # "cannot reach it right now" (Redis down is reported by /healthz already).
    quiet_maintenance_errors: tuple[type[Exception], ...] = ()

    def _flush_forever(self, stop: threading.Event, wake: threading.Event) -> None:
        """The hit flusher: every ``hit_flush_seconds``, or sooner when woken."""
        while True:
            # A period past what a wait can take (CACHE_HIT_FLUSH_SECONDS=1e10) means "only when
            # woken", not a dead flusher.
            wake.wait(min(self.hit_flush_seconds, threading.TIMEOUT_MAX))
            wake.clear()
            if stop.is_set():
                return
            try:
                self.flush()
            except Exception:  # keep flushing whatever one batch did
                log.exception("hit counter flush failed")
            self.after_flush()

    def after_flush(self) -> None:
        """What the backend does after each background flush (SQLite checkpoints its log)."""

    def _maintain_forever(self, stop: threading.Event, wake: threading.Event) -> None:
        """The maintainer: a pass at once (purge what expired while we were down), then every
        ``maintenance_seconds``; a pass woken early (over a bound) evicts without purging."""
        timeout = self.maintenance_seconds if self.maintenance_seconds > 0 else None
        periodic = True
        while not stop.is_set():
            try:
                self.maintain(purge=periodic, stop=stop)
            except self.quiet_maintenance_errors as exc:
                log.debug("cache maintenance skipped: %s", exc)
            except Exception:  # the next pass tries again
                log.exception("cache maintenance failed")
            woken = wake.wait(timeout)
            wake.clear()
            periodic = not woken

    # -- the request path ----------------------------------------------------------------------

    @abstractmethod
    def get(self, key: str, *, max_age: float | None = None) -> CachedEntry | None:
        """The live entry for key, or None (absent, expired, older than max_age, unreadable)."""

    @abstractmethod
    def put(self, entry: NewEntry, *, ttl_seconds: float | None = None,
            namespace: str | None = None, near: NearRecord | None = None) -> str:
        """Insert or replace: "stored" (new or expired) or "updated" (live; keeps created_at).
        ``ttl_seconds``: the entry's own lifetime (0 = never expires); ``near``: its near-matching
        record, replaced with the entry and gone with it."""

    # Both backends count in memory and write the counts in batches (``flush``): they keep
    # ``_lock``, ``_pending_hits`` (key -> [hits, last hit time]) and ``_pending_requests``.
    _lock: threading.Lock
    _pending_hits: dict[str, list[float]]
    _pending_requests: "RequestTally"

    def record_hit(self, key: str) -> None:
        """Count a hit in memory; written with the next batch, not on the request path."""
        now = self.clock()
        with self._lock:
            pending = self._pending_hits.get(key)
            if pending is None:
                self._pending_hits[key] = [1, now]
            else:
                pending[0] += 1
                pending[1] = now

    def record_request(self, status: str, model: str, *, route: str = "", key: str | None = None,
                       seconds: float = 0.0, coalesced: bool = False, api: str = "",
                       near: bool = False) -> None:
        """Count one answered request (HIT, MISS or BYPASS) of an API (its mode; ``near``: a near
        hit) in memory; written with the hits."""
        at = self.clock()
        with self._lock:
            self._pending_requests.add(at, route, status, model, key, seconds, coalesced, api, near)

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why the store cannot be used right now (cheap: asked on every request), or None."""

    def near_candidates(self, group: str, limit: int = 16) -> list[tuple[str, bytes]]:
        """(cache_key, fingerprints) of live entries stored with ``NearRecord(group, ...)``,
        most recently stored first, at most ``limit`` (issue 11's near matching)."""
        raise NotImplementedError(f"{type(self).__name__} has no near-matching index yet")

    def partition_secret(self) -> bytes | None:
        """The secret of client-key partitions kept in the store and shared by every instance
        using it, created once; None when this backend keeps none (a file beside it is used)."""
        return None

    # -- the operator's calls ------------------------------------------------------------------

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove one entry; False when there was none."""

    @abstractmethod
    def clear(self) -> int:
        """Remove every entry (and only the cache's own data); returns how many."""

    @abstractmethod
    def stats(self) -> dict:
        """The /cache/stats object: entries, hits, savings and request counts, by model too."""

    @abstractmethod
    def activity(self, since: float) -> dict:
        """Requests per time bucket by cache status since ``since``, and the latest requests."""

    @abstractmethod
    def list_entries(self, *, limit: int = 50, after: tuple[float, str] | None = None,
                     model: str | None = None, namespace: Any = ...) -> list[dict]:
        """Entries newest first (by last store), after the (updated_at, key) position ``after``;
        ``namespace``: ``...`` any, None the default key space, or a name."""

    @abstractmethod
    def entry(self, key: str) -> dict | None:
        """One entry with its stored request and response texts, or None."""

    @abstractmethod
    def top_entries(self, limit: int = 10) -> list[TopEntry]:
        """The most-hit entries, for the dashboard."""

    @abstractmethod
    def entry_count(self) -> int:
        """How many entries are stored (expired ones not yet purged included)."""

    @abstractmethod
    def export_rows(self) -> Iterator[dict]:
        """Every entry with the fields ``insert_new`` needs, oldest first."""

    @abstractmethod
    def insert_new(self, records: list[dict]) -> int:
        """Insert entries whose key is absent (existing ones are never touched); how many."""

    @abstractmethod
    def maintain(self) -> MaintenanceReport:
        """Purge expired entries, evict over the bounds, give space back (``flask cache purge``)."""

    @abstractmethod
    def vacuum(self) -> int:
        """Give freed space back where the backend can (pages freed; 0 when it has nothing to do)."""

    @abstractmethod
    def db_file_bytes(self) -> int:
        """Bytes the store takes where it lives (the SQLite file; Redis's used memory)."""

    @abstractmethod
    def flush(self) -> None:
        """Write the counters held in memory."""

    @abstractmethod
    def close(self) -> None:
        """Flush and let go of connections (graceful shutdown); usable again afterwards."""


REQUEST_STATUSES = ("HIT", "MISS", "BYPASS")
TIMELINE_BUCKET_SECONDS = 10
TIMELINE_KEEP_SECONDS = 24 * 3600
RECENT_REQUESTS_KEPT = 200


def _store_error(exc: sqlite3.Error) -> StoreError:
    error = StoreError(str(exc))
    error.__cause__ = exc
    return error


class _QueuedPut:
    """One store waiting for the write lock: whoever takes the lock first writes every queued
    one in its transaction, and hands each its outcome or its error."""

    __slots__ = ("entry", "now", "expires_at", "namespace", "near", "done", "outcome", "error", "size")

    def __init__(self, entry: NewEntry, now: float, expires_at: float | None, namespace: str | None,
                 near: NearRecord | None = None):
        self.entry = entry
        self.near = near
        self.size = len(entry.request_json) + len(entry.response_json) + \
            (len(near.fingerprints) if near is not None else 0)
        self.now = now
        self.expires_at = expires_at
        self.namespace = namespace
        self.done = False
        self.outcome: str | None = None
        self.error: BaseException | None = None

    def finish(self, outcome: str | None = None, error: BaseException | None = None) -> None:
        self.outcome, self.error, self.done = outcome, error, True


class RequestTally:
    """Requests counted in memory between two flushes: totals, per model, per time bucket, recent."""

    def __init__(self) -> None:
        self.by_model_status: dict[tuple[str, str], int] = {}
        self.coalesced: dict[str, int] = {}
        self.near_hits: dict[str, int] = {}
        self.by_api_status: dict[tuple[str, str], int] = {}
        self.api_coalesced: dict[str, int] = {}
        self.timeline: dict[tuple[int, str], int] = {}
        self.recent: list[tuple] = []

    def __bool__(self) -> bool:
        return bool(self.by_model_status or self.coalesced)

    def add(self, at: float, route: str, status: str, model: str, key: str | None, seconds: float,
            coalesced: bool, api: str = "", near: bool = False) -> None:
        model = storable_text(model)  # client text: counted under its escape if it must be
        pair = (model, status)
        self.by_model_status[pair] = self.by_model_status.get(pair, 0) + 1
        if coalesced:
            self.coalesced[model] = self.coalesced.get(model, 0) + 1
        if near:
            self.near_hits[model] = self.near_hits.get(model, 0) + 1
        if api:
            self.by_api_status[(api, status)] = self.by_api_status.get((api, status), 0) + 1
            if coalesced:
                self.api_coalesced[api] = self.api_coalesced.get(api, 0) + 1
        bucket = (int(at // TIMELINE_BUCKET_SECONDS) * TIMELINE_BUCKET_SECONDS, status)
        self.timeline[bucket] = self.timeline.get(bucket, 0) + 1
        self.recent.append((at, route, status, model, key, seconds, int(coalesced)))
        del self.recent[:-RECENT_REQUESTS_KEPT]

    def merge(self, other: "RequestTally") -> None:
        """Add ``other`` (counted later than self): a failed batch is put back for the next flush."""
        for pair, count in other.by_model_status.items():
            self.by_model_status[pair] = self.by_model_status.get(pair, 0) + count
        for model, count in other.coalesced.items():
            self.coalesced[model] = self.coalesced.get(model, 0) + count
        for model, count in other.near_hits.items():
            self.near_hits[model] = self.near_hits.get(model, 0) + count
        for pair, count in other.by_api_status.items():
            self.by_api_status[pair] = self.by_api_status.get(pair, 0) + count
        for api, count in other.api_coalesced.items():
            self.api_coalesced[api] = self.api_coalesced.get(api, 0) + count
        for bucket, count in other.timeline.items():
            self.timeline[bucket] = self.timeline.get(bucket, 0) + count
        self.recent = (self.recent + other.recent)[-RECENT_REQUESTS_KEPT:]

    def write(self, db: sqlite3.Connection, now: float, one_by_one: bool = False) -> int:
        """Add the counts to the database; returns how many rows were left out (``one_by_one``:
        see ``write_rows``)."""
        misses = sum(n for (_, status), n in self.by_model_status.items() if status == "MISS")
        bypasses = sum(n for (_, status), n in self.by_model_status.items() if status == "BYPASS")
        db.executemany(
            "UPDATE cache_counters SET value = value + ? WHERE name = ?",
            [(misses, "misses"), (bypasses, "bypasses"), (sum(self.coalesced.values()), "coalesced"),
             (sum(self.near_hits.values()), "near_hits")],
        )
        models = {model for model, _ in self.by_model_status} | set(self.coalesced)
        left_out = write_rows(
            db,
            """INSERT INTO model_stats(model, misses, bypasses, coalesced, near_hits) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(model) DO UPDATE SET misses = misses + excluded.misses,
                   bypasses = bypasses + excluded.bypasses, coalesced = coalesced + excluded.coalesced,
                   near_hits = near_hits + excluded.near_hits""",
            [(model, self.by_model_status.get((model, "MISS"), 0),
              self.by_model_status.get((model, "BYPASS"), 0), self.coalesced.get(model, 0),
              self.near_hits.get(model, 0))
             for model in models],
            one_by_one,
        )
        apis = {api for api, _ in self.by_api_status}
        db.executemany(
            """INSERT INTO api_stats(api, misses, bypasses, coalesced) VALUES (?, ?, ?, ?)
               ON CONFLICT(api) DO UPDATE SET misses = misses + excluded.misses,
                   bypasses = bypasses + excluded.bypasses, coalesced = coalesced + excluded.coalesced""",
            [(api, self.by_api_status.get((api, "MISS"), 0), self.by_api_status.get((api, "BYPASS"), 0),
              self.api_coalesced.get(api, 0)) for api in apis],
        )
        db.executemany(
            """INSERT INTO request_timeline(bucket, status, requests) VALUES (?, ?, ?)
               ON CONFLICT(bucket, status) DO UPDATE SET requests = requests + excluded.requests""",
            [(bucket, status, count) for (bucket, status), count in self.timeline.items()],
        )
        db.execute("DELETE FROM request_timeline WHERE bucket < ?", (now - TIMELINE_KEEP_SECONDS,))
        left_out += write_rows(
            db,
            "INSERT INTO recent_requests(at, route, status, model, cache_key, seconds, coalesced) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            self.recent,
            one_by_one,
        )
        db.execute(
            "DELETE FROM recent_requests WHERE id <= (SELECT max(id) FROM recent_requests) - ?",
            (RECENT_REQUESTS_KEPT,),
        )
        return left_out


def storable_text(text: str) -> str:
    """Text SQLite can hold: a lone surrogate (UTF-8 cannot encode one) becomes its escape,
    ``\\ud800``. The edge refuses such text in requests (wire.parse_request_json); counters
    and labels still never trust that."""
    if not isinstance(text, str) or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# What binding a value SQLite cannot take raises: text with a lone surrogate (UnicodeEncodeError),
# an int past 64 bits (OverflowError), a type it does not know (ProgrammingError).
_UNBINDABLE = (ValueError, OverflowError, TypeError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


def unbindable(exc: BaseException) -> bool:
    """The error came from a value SQLite cannot take (the row's fault, not the database's)."""
    if isinstance(exc, StoreError):
        exc = exc.__cause__  # type: ignore[assignment]
    return isinstance(exc, _UNBINDABLE)


def write_rows(db: sqlite3.Connection, sql: str, rows: list[tuple], one_by_one: bool) -> int:
    """``executemany``, or, once a batch failed on a value SQLite cannot take, each row on its
    own, leaving out only the rows that fail (a value fails while it is bound, before its row's
    statement runs, so nothing of a left-out row is written); returns how many were left out."""
    if not one_by_one:
        db.executemany(sql, rows)
        return 0
    left_out = 0
    for row in rows:
        try:
            db.execute(sql, row)
        except _UNBINDABLE:
            left_out += 1
    return left_out


# expires_at of an entry stored with X-Cache-TTL: 0 (never expires, whatever the server's TTL):
# the last second of year 9999, a finite number so exports stay plain JSON.
NEVER_EXPIRES = 253402300799.0


def stats_totals(counters: Mapping[str, Any], *, last_updated_at: float | None, db_path: str,
                 ttl_seconds: float, db_bytes: int) -> dict:
    """The whole-cache part of ``stats()`` from the store's running counters, in every backend's
    words (the per-model and per-API parts follow it)."""
    hits_served = int(counters.get("hits_served", 0))
    misses = int(counters.get("misses", 0))
    return {
        "entries": int(counters.get("entries", 0)),
        "hits": int(counters.get("hits", 0)),
        "last_updated_at": last_updated_at,
        "db_path": db_path,
        "ttl_seconds": ttl_seconds,
        "stored_bytes": int(counters.get("stored_bytes", 0)),
        "since": counters.get("since"),
        "hits_served": hits_served,
        "misses": misses,
        "bypasses": int(counters.get("bypasses", 0)),
        "coalesced": int(counters.get("coalesced", 0)),
        "near_hits": int(counters.get("near_hits", 0)),
        "hit_rate": hit_rate(hits_served, misses),
        "db_bytes": db_bytes,
        **savings(counters.get("prompt_tokens_saved", 0), counters.get("completion_tokens_saved", 0),
                  counters.get("cost_saved_usd", 0), counters.get("time_saved_seconds", 0)),
        "unpriced_hits": int(counters.get("unpriced_hits", 0)),
    }


def hit_rate(hits: int, misses: int) -> float | None:
    """Hits over cacheable lookups (hits + misses); None before the first one."""
    return round(hits / (hits + misses), 4) if hits + misses else None


def savings(prompt: float, completion: float, cost: float, seconds: float) -> dict:
    return {
        "tokens_saved": {"prompt": int(prompt), "completion": int(completion),
                         "total": int(prompt) + int(completion)},
        "cost_saved_usd": round(cost, 6),
        "time_saved_seconds": round(seconds, 3),
    }


# Checkpoints (copying the write-ahead log back into the database, with an fsync) run in the
# background flusher once this many bytes were stored since the last one, and at every flush.
# SQLite's own automatic checkpoint stays on as a safety net at a larger size: it runs inside
# the COMMIT of whichever request crosses it, holding the write lock (measured: up to ~370 ms
# under a burst, with every other store waiting behind it).
CHECKPOINT_AFTER_BYTES = 4 * 1024 * 1024
# One group-commit transaction holds at most this much (more if one store alone is larger).
MAX_BATCH_BYTES = CHECKPOINT_AFTER_BYTES
# After a checkpoint a WAL file larger than this is cut back (it otherwise keeps its peak size).
WAL_SIZE_LIMIT_BYTES = 4 * CHECKPOINT_AFTER_BYTES
WAL_AUTOCHECKPOINT_PAGES = 10000

# Stores written by one statement (14 values each: within SQLite's oldest limit of 999).
_ROWS_PER_STATEMENT = 50
_INSERT_SQL = (
    "INSERT INTO completions(cache_key, mode, model, request_json, response_json, created_at, "
    "updated_at, last_hit_at, hits, expires_at, namespace, prompt_tokens, completion_tokens, "
    "cost_usd, upstream_seconds, unpriced) VALUES "
)
_INSERT_ROW = "(?, ?, ?, ?, ?, ?, ?, NULL, 0, ?, ?, ?, ?, ?, ?, ?)"
_REPLACE_EXPIRED_SQL = (
    "UPDATE completions SET mode = ?, model = ?, request_json = ?, response_json = ?, "
    "created_at = ?, updated_at = ?, last_hit_at = NULL, hits = 0, expires_at = ?, namespace = ?, "
    "prompt_tokens = ?, completion_tokens = ?, cost_usd = ?, upstream_seconds = ?, unpriced = ? "
    "WHERE cache_key = ?"
)
_UPDATE_LIVE_SQL = (
    "UPDATE completions SET mode = ?, model = ?, request_json = ?, response_json = ?, "
    "updated_at = ?, expires_at = ?, namespace = ?, prompt_tokens = ?, completion_tokens = ?, "
    "cost_usd = ?, upstream_seconds = ?, unpriced = ? WHERE cache_key = ?"
)

# How long /cache/stats and /healthz wait for the write lock to add this process's counters.
STATS_FLUSH_WAIT_MS = 100


class SQLiteStore(StoreMaintenance, StoreBrowsing, CacheStore):
    """Cache entries in one SQLite file, shared safely by threads and worker processes.

    Lookups and writes take a connection from a pool per process, opened on first use (never
    before a fork) and shared by its threads; other reads (stats, listing, maintenance) keep a
    connection per thread. Hits only read: their counters are summed in memory and written in one batch every
    ``hit_flush_seconds`` and on ``flush``/``close``, so a hit never waits for a write lock.
    """

    def __init__(
        self,
        path: str,
        ttl_seconds: float = 0,
        *,
        clock: Callable[[], float] = time.time,
        hit_flush_seconds: float = 1.0,
        busy_timeout_ms: int = 5000,
        reopen_seconds: float = 5.0,
        on_write: Callable[[sqlite3.Connection], None] | None = None,
        max_entries: int = 0,
        max_bytes: int = 0,
        maintenance_seconds: float = 60.0,
    ):
        self.path = path
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.hit_flush_seconds = hit_flush_seconds
        self.busy_timeout_ms = busy_timeout_ms
        # While the database cannot be opened (corrupt, not SQLite, unreadable), try again at
        # most this often; in between every request is answered without the cache at once.
        self.reopen_seconds = reopen_seconds
        # Test hook, called on the connection before every write transaction: tests make real
        # SQLite faults here (PRAGMA max_page_count -> SQLITE_FULL, query_only -> SQLITE_READONLY).
        self.on_write = on_write
        self._unavailable: _Unavailable | None = None
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.maintenance_seconds = maintenance_seconds
        self._maintainer_pid: int | None = None
        self._maintainer_stop = threading.Event()
        self._maintainer_wake = threading.Event()
        self._maintenance_lock = threading.Lock()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._file_checked_pid: int | None = None
        # One writer per process at a time: threads queue on this lock and wake the moment it is
        # free, instead of meeting SQLite's busy handler, which sleeps in growing steps (up to
        # 100 ms) while another connection holds the write lock.
        self._write_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._queue: list[_QueuedPut] = []
        self._queue_lock = threading.Lock()
        self._pending_hits: dict[str, list[float]] = {}
        # The batch a flush has taken out of _pending_hits and not yet committed: eviction must
        # count these hits too, though they are in neither memory's batch nor the table yet.
        self._hits_in_flight: dict[str, list[float]] = {}
        self._pending_requests = RequestTally()
        # Told the operation name whenever the database fails (the metrics count store errors).
        self.on_error: Callable[[str], None] | None = None
        self._schema_ready_pid: int | None = None
        self._flusher_pid: int | None = None
        self._flusher_stop = threading.Event()
        self._flusher_wake = threading.Event()
        self._bytes_since_checkpoint = 0
        self._connections: list[sqlite3.Connection] = []
        # Connections for the request paths (lookups, writes), shared by the threads of a
        # process: opening one reads the whole schema (~0.5 ms of CPU), too much to pay again in
        # each of hundreds of threads. A lookup holds one for microseconds, so a few serve all.
        self._pool: list[sqlite3.Connection] = []
        self._pool_pid: int | None = None
        self._pool_generation = 0
        self._pool_lock = threading.Lock()

    # -- connections -------------------------------------------------------------------------

    def _prepare_file(self) -> bool:
        """Create the database file and its directory private (0600 / 0700), or check that the
        file there is a SQLite database. A file that is not is never opened, written or removed.
        True when the file is new (empty).

        Done once per process, before its first connection: closing any descriptor of the file
        would drop every POSIX lock SQLite holds on it in this process, and another process could
        then take the database for its own and reset the write-ahead log under our readers.
        """
        pid = os.getpid()
        with self._file_lock:
            if self._file_checked_pid == pid:
                return False
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            try:
                # An empty file is a new database to SQLite; the -wal and -shm files it creates
                # beside it take this file's mode, so they are private too.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                header = b""
            except FileExistsError:
                with open(self.path, "rb") as existing:
                    header = existing.read(len(SQLITE_MAGIC))
            if header and header != SQLITE_MAGIC:
                raise StoreError("the file at CACHE_DB_PATH is not a SQLite database (left untouched)")
            self._file_checked_pid = pid
            return not header

    def _connect(self) -> sqlite3.Connection:
        try:
            new_file = self._prepare_file()
            # timeout: the busy timeout from the first statement on, so that even switching a
            # new file to WAL waits for a competing process instead of failing as locked.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=self.busy_timeout_ms / 1000)
        except OSError as exc:
            raise StoreError(f"cannot open the cache database: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the cache database: {exc}") from exc
        try:
            if new_file:
                # Before WAL, which writes the file header: a new file gets incremental
                # auto-vacuum, so deleted entries' pages can be handed back to the file system
                # later. An existing file is converted once by the VACUUM in ``maintain``; the
                # pragma is not even tried there, since it would wait for the write lock.
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            # WAL: readers never block the writer nor each other, across processes.
            self._enter_wal(db)
            # Wait for a competing writer instead of failing at once with SQLITE_BUSY.
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            # NORMAL under WAL: a power cut may lose the last commits, never corrupt the file;
            # the right trade for a cache, and it takes the fsync off every commit.
            db.execute("PRAGMA synchronous=NORMAL")
            # A WAL that once held a large transaction is cut back at the next checkpoint.
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            if self.hit_flush_seconds > 0:
                # Checkpoints belong to the background flusher (CHECKPOINT_AFTER_BYTES above);
                # without one, SQLite's default (1000 pages) stays.
                db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot open the cache database: {exc}") from exc
        return db

    def _enter_wal(self, db: sqlite3.Connection) -> None:
        """Switch to (or confirm) WAL. While another connection is switching a new file at the
        same moment SQLite answers "locked" at once, without its busy handler: try again."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL").fetchall()
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) not in _BUSY_ERROR_CODES \
                        or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _db(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:
            # First use in this thread, or a connection inherited across fork: open our own.
            local.db = self._open(pid)
            local.pid = pid
        return local.db

    def _checkout(self) -> tuple[sqlite3.Connection, int]:
        """A connection from this process's pool (a new one when every one is in use), and the
        pool generation to hand back with it to ``_checkin``."""
        pid = os.getpid()
        with self._pool_lock:
            if self._pool_pid != pid:
                # A pool inherited across fork is the parent's: never used (nor closed) here.
                self._pool, self._pool_pid = [], pid
            generation = self._pool_generation
            db = self._pool.pop() if self._pool else None
        if db is None:
            db = self._open(pid)
        return db, generation

    def _checkin(self, db: sqlite3.Connection, generation: int) -> None:
        """Back to the pool; closed instead after ``close`` or when left inside a transaction."""
        with self._pool_lock:
            if generation == self._pool_generation and not db.in_transaction:
                self._pool.append(db)
                return
        db.close()

    def _open(self, pid: int) -> sqlite3.Connection:
        """A new connection for this thread or the pool, with the schema ready.

        While the database cannot be opened this fails fast with the reason, tries again at most
        every ``reopen_seconds``, and logs the cause once rather than once per request.
        """
        with self._lock:
            unavailable = self._unavailable
        if unavailable is not None and time.monotonic() < unavailable.retry_at:
            raise StoreError(unavailable.reason)
        try:
            db = self._connect()
            try:
                self._ensure_schema(db, pid)
            except BaseException:
                db.close()
                raise
        except StoreError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, sqlite3.Error)
                    and getattr(cause, "sqlite_errorcode", None) in _BUSY_ERROR_CODES):
                self._set_unavailable(str(exc))
            raise
        with self._lock:
            if self._flusher_pid != pid:
                self._connections = []
            self._connections.append(db)
            recovered, self._unavailable = self._unavailable, None
        if recovered is not None:
            log.warning("cache database %s is available again; caching resumes", self.path)
        return db

    def _set_unavailable(self, reason: str) -> None:
        with self._lock:
            first = self._unavailable is None
            self._unavailable = _Unavailable(reason, time.monotonic() + self.reopen_seconds)
        if first:
            log.error("cache database %s unavailable, every request is answered without the "
                      "cache until it is fixed (checked again every %gs): %s",
                      self.path, self.reopen_seconds, reason)

    def unavailable_reason(self) -> str | None:
        """Why this process cannot use the database right now, or None when it can."""
        try:
            db, generation = self._checkout()
        except StoreError as exc:
            return str(exc)
        self._checkin(db, generation)
        return None

    def _ensure_schema(self, db: sqlite3.Connection, pid: int) -> None:
        with self._lock:
            if self._schema_ready_pid == pid:
                return
            try:
                self._migrate(db)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot prepare the cache database: {exc}") from exc
            self._schema_ready_pid = pid
            self._start_flusher(pid)

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, name, migrate in MIGRATIONS:
                if version not in applied:
                    migrate(db)
                    db.execute(
                        "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _write(self, statements: Callable[[sqlite3.Connection], object],
               busy_timeout_ms: int | None = None) -> object:
        """Run one write transaction; BEGIN IMMEDIATE so read-then-write never fails as locked.

        ``busy_timeout_ms`` waits less than usual for another writer (a caller that can do
        without the write, such as stats catching up on counters).
        """
        # The same bound for this process's own writes (a group-commit batch can hold the lock
        # for a whole burst's stores) as for another process's.
        began = time.monotonic()
        db, generation = self._checkout()
        try:
            if not self._write_lock.acquire(timeout=-1 if busy_timeout_ms is None else busy_timeout_ms / 1000):
                raise StoreBusy(f"another write of this process took longer than {busy_timeout_ms} ms")
            try:
                if self.on_write is not None:
                    self.on_write(db)
                if busy_timeout_ms is None:
                    return self._transaction(db, statements)
                # One wait in all: what the lock took comes off what SQLite may wait.
                db.execute(f"PRAGMA busy_timeout={_left_of(busy_timeout_ms, began)}")
                try:
                    return self._transaction(db, statements)
                finally:
                    db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            finally:
                self._write_lock.release()
        except sqlite3.Error as exc:
            if busy_timeout_ms is not None and getattr(exc, "sqlite_errorcode", None) in _BUSY_ERROR_CODES:
                raise StoreBusy(f"another writer held the database longer than {busy_timeout_ms} ms") from exc
            self._report_error("write")
            raise StoreError(str(exc)) from exc
        finally:
            self._checkin(db, generation)

    def _write_queued(self, put: _QueuedPut) -> str:
        """Store through the queue: concurrent stores share one transaction (group commit).

        Under a burst the write lock, not SQLite, is the bottleneck: every transaction takes
        several turns of the GIL among hundreds of threads while it holds the lock. One
        transaction for everything queued meanwhile pays that once, up to MAX_BATCH_BYTES at a
        time. A batch that fails is written again one store per transaction, so each gets
        exactly its own outcome or error; one that found the database held by another writer
        past busy_timeout fails as a whole at once (a retry of each would wait as long again).
        """
        with self._queue_lock:
            self._queue.append(put)
        with self._write_lock:
            while not put.done:
                with self._queue_lock:
                    batch = self._next_batch()
                try:
                    self._write_batch(batch)
                finally:
                    for queued in batch:
                        if not queued.done:
                            queued.finish(error=StoreError("the cache write did not complete"))
        if put.error is not None:
            raise put.error
        return put.outcome  # type: ignore[return-value]

    def _next_batch(self) -> list[_QueuedPut]:
        """The oldest queued stores, at most MAX_BATCH_BYTES of them (always at least one), in
        queue order so two stores of one key land in the order they came. A transaction's pages
        stay in the WAL until it commits: an unbounded batch would grow it by a whole burst."""
        size, taken = 0, 0
        for queued in self._queue:
            size += queued.size
            if taken and size > MAX_BATCH_BYTES:
                break
            taken += 1
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch

    def _upsert(self, db: sqlite3.Connection, batch: list[_QueuedPut]) -> list[str]:
        """Insert or replace each queued store, in order, with as few statements as possible:
        one SELECT for every key and one INSERT for every new one. Each statement step hands
        the GIL over, and under a burst each hand-over can cost milliseconds while the write
        lock is held; a statement per store and per key paid that many times over.

        Replacing a live entry keeps its created_at (the TTL counts from the first store); an
        expired one is replaced as new. What one hit saves goes into the same row write as the
        texts: a second UPDATE would rewrite every page of a large (400 KB) row again.
        """
        keys = list(dict.fromkeys(put.entry.key for put in batch))
        known: dict[str, tuple[float, float | None]] = {}
        for start in range(0, len(keys), _ROWS_PER_STATEMENT):
            part = keys[start:start + _ROWS_PER_STATEMENT]
            known.update((key, (created_at, expires_at)) for key, created_at, expires_at in db.execute(
                "SELECT cache_key, created_at, expires_at FROM completions "
                f"WHERE cache_key IN ({','.join('?' * len(part))})", part))
        inserts: list[tuple] = []
        updates: list[tuple[str, tuple]] = []
        outcomes = []
        for put in batch:
            entry, now = put.entry, put.now
            texts = (entry.mode, entry.model, entry.request_json, entry.response_json)
            savings = (entry.prompt_tokens, entry.completion_tokens, entry.cost_usd,
                       entry.upstream_seconds, int(entry.unpriced))
            row = known.get(entry.key)
            if row is None:
                inserts.append((entry.key, *texts, now, now, put.expires_at, put.namespace, *savings))
                known[entry.key] = (now, put.expires_at)
                outcomes.append("stored")
            elif self.is_expired(row[0], now, row[1]):
                updates.append((_REPLACE_EXPIRED_SQL, (*texts, now, now, put.expires_at, put.namespace,
                                                       *savings, entry.key)))
                known[entry.key] = (now, put.expires_at)
                outcomes.append("stored")
            else:
                updates.append((_UPDATE_LIVE_SQL, (*texts, now, put.expires_at, put.namespace, *savings,
                                                   entry.key)))
                known[entry.key] = (row[0], put.expires_at)
                outcomes.append("updated")
        # New keys first: a later store of the same key in this batch updates the new row.
        for start in range(0, len(inserts), _ROWS_PER_STATEMENT):
            part = inserts[start:start + _ROWS_PER_STATEMENT]
            db.execute(_INSERT_SQL + ", ".join([_INSERT_ROW] * len(part)),
                       [value for row in part for value in row])
        for sql, params in updates:
            db.execute(sql, params)
        near_rows = [(put.entry.key, put.near.group, put.near.fingerprints, put.now)
                     for put in batch if put.near is not None]
        if near_rows:
            db.executemany("INSERT OR REPLACE INTO near_index(cache_key, near_group, fingerprints, "
                           "stored_at) VALUES (?, ?, ?, ?)", near_rows)
        return outcomes

    def _write_batch(self, batch: list[_QueuedPut]) -> None:
        """Called with the write lock held."""
        try:
            db, generation = self._checkout()
        except StoreError as exc:
            for put in batch:
                put.finish(error=StoreError(str(exc)))
            return
        try:
            if len(batch) > 1:
                try:
                    if self.on_write is not None:
                        self.on_write(db)
                    outcomes = self._transaction(db, lambda db: self._upsert(db, batch))
                except sqlite3.Error as exc:
                    if getattr(exc, "sqlite_errorcode", None) in _BUSY_ERROR_CODES:
                        # Another writer held the database past busy_timeout: no store of this
                        # batch caused it, and retrying each would wait that long again.
                        self._report_error("write")
                        for put in batch:
                            put.finish(error=_store_error(exc))
                        return
                except Exception:  # one at a time below: each gets its own outcome or error
                    pass
                else:
                    for put, outcome in zip(batch, outcomes):  # type: ignore[call-overload]
                        put.finish(outcome)
                    return
            for put in batch:
                try:
                    if self.on_write is not None:
                        self.on_write(db)
                    put.finish(self._transaction(db, lambda db: self._upsert(db, [put])[0]))  # type: ignore[arg-type]
                except sqlite3.Error as exc:
                    self._report_error("write")
                    put.finish(error=_store_error(exc))
                except _UNBINDABLE as exc:  # a StoreError like any write that failed: never a 500
                    put.finish(error=StoreError(f"the entry holds a value SQLite cannot store "
                                                f"({type(exc).__name__})"))
                except Exception as exc:
                    put.finish(error=exc)
        finally:
            self._checkin(db, generation)

    @staticmethod
    def _transaction(db: sqlite3.Connection, statements: Callable[[sqlite3.Connection], object]) -> object:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = statements(db)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return result

    def _report_error(self, operation: str) -> None:
        if self.on_error is not None:
            self.on_error(operation)

    # -- the contract ------------------------------------------------------------------------

    def get(self, key: str, *, max_age: float | None = None) -> CachedEntry | None:
        """The live entry for key, or None (absent, expired, or unreadable).

        ``max_age`` (Cache-Control: max-age) also refuses an entry whose answer was stored more
        than that many seconds ago (its updated_at: a forced refresh makes it young again).
        """
        self._start_maintainer()
        rows = self._pooled_read(
            "SELECT mode, model, response_json, created_at, updated_at, hits, expires_at "
            "FROM completions WHERE cache_key = ?",
            (key,),
        )
        if not rows:
            return None
        row = rows[0]
        now = self.clock()
        if self.is_expired(row[3], now, row[6]):
            return None
        if max_age is not None and now - row[4] > max_age:
            return None
        return CachedEntry(key, *row[:6])

    def put(self, entry: NewEntry, *, ttl_seconds: float | None = None,
            namespace: str | None = None, near: NearRecord | None = None) -> str:
        """Insert or replace; "stored" for a new (or expired) entry, "updated" otherwise.

        Replacing a live entry keeps its created_at, so the TTL counts from the first store.
        ``ttl_seconds`` gives this entry its own lifetime from now (0 = never expires); without
        it the server's TTL applies. The expiry follows the latest store of the key.
        ``near``: the entry's near-matching record, stored (or replaced) with it and deleted
        with it. A store without one leaves an earlier record of the key in place: the key is
        the same request, so the record still describes it.
        """
        self._start_maintainer()
        now = self.clock()
        if ttl_seconds is None:
            expires_at = None
        elif ttl_seconds <= 0:
            expires_at = NEVER_EXPIRES  # its own "never", not the server's TTL
        else:
            expires_at = now + ttl_seconds

        outcome = self._write_queued(_QueuedPut(entry, now, expires_at, namespace, near))
        self._bytes_since_checkpoint += len(entry.request_json) + len(entry.response_json)
        if self._bytes_since_checkpoint > CHECKPOINT_AFTER_BYTES:
            self._flusher_wake.set()
        if self.max_entries or self.max_bytes:
            self._maintainer_wake.set()  # eviction runs in the background, never here
        return outcome  # type: ignore[return-value]

    def near_candidates(self, group: str, limit: int = 16) -> list[tuple[str, bytes]]:
        """(cache_key, fingerprints) of the live entries in a near group, most recently stored
        first, at most ``limit``."""
        now = self.clock()
        rows = self._pooled_read(
            "SELECT n.cache_key, n.fingerprints FROM near_index n "
            "JOIN completions c ON c.cache_key = n.cache_key "
            "WHERE n.near_group = ? AND CASE WHEN c.expires_at IS NOT NULL THEN c.expires_at >= ? "
            "WHEN ? <= 0 THEN 1 ELSE ? - c.created_at <= ? END "
            "ORDER BY n.stored_at DESC LIMIT ?",
            (group, now, self.ttl_seconds, now, self.ttl_seconds, int(limit)),
        )
        return [(key, bytes(blob)) for key, blob in rows]

    def _pooled_read(self, sql: str, params: tuple) -> list[tuple]:
        """The rows of one query on a pooled connection (the request paths' reads)."""
        db, generation = self._checkout()
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self._report_error("read")
            raise StoreError(str(exc)) from exc
        finally:
            self._checkin(db, generation)

    def delete(self, key: str) -> bool:
        return bool(self._write(
            lambda db: db.execute("DELETE FROM completions WHERE cache_key = ?", (key,)).rowcount
        ))

    def clear(self) -> int:
        with self._lock:
            self._pending_hits.clear()
        return int(self._write(lambda db: db.execute("DELETE FROM completions").rowcount))  # type: ignore[arg-type]

    def stats(self) -> dict:
        """The original's stats fields and the savings, from running totals.

        O(1) in the number of entries (O(models) for the breakdown): counters kept by triggers
        and by the batched flush, never a scan of the completions table.
        """
        # This process's counters first, so the figures include its latest hits; but stats
        # never wait long for that (a long write elsewhere: they then lag by one flush).
        self.flush(busy_timeout_ms=STATS_FLUSH_WAIT_MS)
        try:
            db = self._db()
            counters = dict(db.execute("SELECT name, value FROM cache_counters"))
            (last_updated_at,) = db.execute("SELECT max(updated_at) FROM completions").fetchone()
            model_rows = db.execute(
                "SELECT model, hits, misses, bypasses, coalesced, near_hits, prompt_tokens_saved, "
                "completion_tokens_saved, cost_saved_usd, time_saved_seconds "
                "FROM model_stats ORDER BY model"
            ).fetchall()
            api_rows = db.execute(
                "SELECT api, hits, misses, bypasses, coalesced, prompt_tokens_saved, "
                "completion_tokens_saved, cost_saved_usd, time_saved_seconds, unpriced_hits "
                "FROM api_stats ORDER BY api"
            ).fetchall()
        except sqlite3.Error as exc:
            self._report_error("read")
            raise StoreError(str(exc)) from exc
        return {
            **stats_totals(counters, last_updated_at=last_updated_at, db_path=self.path,
                           ttl_seconds=self.ttl_seconds, db_bytes=self.db_bytes()),
            "by_model": {
                model: {"hits": hits, "misses": model_misses, "bypasses": bypasses,
                        "coalesced": coalesced, "near_hits": near_hits,
                        "hit_rate": hit_rate(hits, model_misses),
                        **savings(prompt, completion, cost, seconds)}
                for model, hits, model_misses, bypasses, coalesced, near_hits, prompt, completion, cost,
                seconds in model_rows
            },
            # Per API (the stored entries' mode): the same figures, and hits that saved money
            # the price table could not put a figure on.
            "by_api": {
                api: {"hits": hits, "misses": api_misses, "bypasses": bypasses,
                      "coalesced": coalesced, "hit_rate": hit_rate(hits, api_misses),
                      **savings(prompt, completion, cost, seconds), "unpriced_hits": unpriced}
                for api, hits, api_misses, bypasses, coalesced, prompt, completion, cost, seconds, unpriced
                in api_rows
            },
        }

    def db_bytes(self) -> int:
        """Size on disk: the database file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path + "-wal"):
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total

    def activity(self, since: float) -> dict:
        """Requests per time bucket by cache status since ``since``, and the latest requests."""
        self.flush()
        try:
            db = self._db()
            buckets = db.execute(
                "SELECT bucket, status, requests FROM request_timeline WHERE bucket >= ? ORDER BY bucket",
                (int(since // TIMELINE_BUCKET_SECONDS) * TIMELINE_BUCKET_SECONDS,),
            ).fetchall()
            recent = db.execute(
                "SELECT at, route, status, model, cache_key, seconds, coalesced FROM recent_requests "
                "ORDER BY id DESC LIMIT 50"
            ).fetchall()
        except sqlite3.Error as exc:
            self._report_error("read")
            raise StoreError(str(exc)) from exc
        timeline: dict[int, dict[str, int]] = {}
        for bucket, status, count in buckets:
            timeline.setdefault(bucket, dict.fromkeys(REQUEST_STATUSES, 0))[status] = count
        return {
            "bucket_seconds": TIMELINE_BUCKET_SECONDS,
            "timeline": [{"at": bucket, **counts} for bucket, counts in timeline.items()],
            "recent": [
                {"at": at, "route": route, "status": status, "model": model, "key": key,
                 "seconds": round(seconds, 6), "coalesced": bool(coalesced)}
                for at, route, status, model, key, seconds, coalesced in recent
            ],
        }

    def flush(self, busy_timeout_ms: int | None = None) -> None:
        """Write the hit and request counters gathered in memory, in one transaction.

        With ``busy_timeout_ms`` it gives up sooner while another writer holds the database;
        the counters then wait for the next flush.
        """
        # One flush at a time: a caller that needs the counters written (eviction ranks entries
        # by their last hit) must not find the pending batch empty while another flush holds
        # it, not yet written.
        began = time.monotonic()
        if not self._flush_lock.acquire(timeout=-1 if busy_timeout_ms is None else busy_timeout_ms / 1000):
            return
        try:
            self._flush_pending(_left_of(busy_timeout_ms, began))
        finally:
            self._flush_lock.release()

    def _flush_pending(self, busy_timeout_ms: int | None) -> None:
        with self._lock:
            if not self._pending_hits and not self._pending_requests:
                return
            batch, self._pending_hits = self._pending_hits, {}
            self._hits_in_flight = batch
            requests, self._pending_requests = self._pending_requests, RequestTally()
        rows = [(int(count), last_at, key) for key, (count, last_at) in batch.items()]
        now = self.clock()

        def write(db: sqlite3.Connection, one_by_one: bool = False) -> int:
            left_out = write_rows(
                db,
                "UPDATE completions SET hits = hits + ?, "
                "last_hit_at = max(coalesce(last_hit_at, 0), ?) WHERE cache_key = ?",
                rows,
                one_by_one,
            )
            return left_out + requests.write(db, now, one_by_one)

        try:
            try:
                self._write(write, busy_timeout_ms)
            except Exception as exc:
                if not unbindable(exc):
                    raise
                # One row SQLite cannot take must not cost every other counter (nor fail every
                # later flush, and the routes that flush first): the rest are written without it.
                left_out = self._write(lambda db: write(db, one_by_one=True), busy_timeout_ms)
                log.warning("left out %s counter rows SQLite cannot store (%s)", left_out,
                            type(exc.__cause__ if isinstance(exc, StoreError) else exc).__name__)
        except StoreError as exc:
            # Busy is expected under load when the caller would not wait (stats): not worth a warning.
            (log.debug if isinstance(exc, StoreBusy) else log.warning)(
                "could not write %d hit counters, will retry: %s", len(rows), exc)
            with self._lock:
                requests.merge(self._pending_requests)
                self._pending_requests = requests
                for key, (count, last_at) in batch.items():
                    pending = self._pending_hits.setdefault(key, [0, last_at])
                    pending[0] += count
                    pending[1] = max(pending[1], last_at)
        finally:
            with self._lock:
                self._hits_in_flight = {}

    def close(self) -> None:
        """Flush pending hits and close this process's connections (graceful shutdown)."""
        self._flusher_stop.set()
        self._flusher_wake.set()
        self._maintainer_stop.set()
        self._maintainer_wake.set()
        try:
            self.flush()
        except StoreError as exc:  # pragma: no cover - logged, the process is exiting anyway
            log.warning("hit counters lost on close: %s", exc)
        # Let a maintenance batch in progress finish before its connection goes away.
        maintenance_done = self._maintenance_lock.acquire(timeout=10)
        try:
            with self._lock:
                connections, self._connections = self._connections, []
            # Idle pooled connections are nobody's right now: closed here. One in use is
            # closed by its thread when handed back (the generation no longer matches).
            with self._pool_lock:
                idle = self._pool if self._pool_pid == os.getpid() else []
                self._pool = []
                self._pool_generation += 1
            for db in idle:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            # Only this thread's connection is closed here. Another thread may be inside a
            # statement on its own (a request still finishing, the flusher): closing a
            # connection under it can crash the interpreter. Dropping our references instead
            # lets each close as soon as its thread lets go of it.
            own = getattr(self._local, "db", None)
            if own is not None and getattr(self._local, "pid", None) == os.getpid():
                try:
                    own.close()
                except sqlite3.Error:
                    pass
            del connections
        finally:
            if maintenance_done:
                self._maintenance_lock.release()
        self._local = threading.local()
        self._schema_ready_pid = None
        self._file_checked_pid = None
        self._flusher_pid = None
        self._maintainer_pid = None

    # -- background hit flusher --------------------------------------------------------------

    def _start_flusher(self, pid: int) -> None:
        if self._flusher_pid == pid or self.hit_flush_seconds <= 0:
            return
        self._flusher_pid = pid
        self._flusher_stop = threading.Event()
        self._flusher_wake = threading.Event()
        thread = threading.Thread(
            target=self._flush_forever, args=(self._flusher_stop, self._flusher_wake),
            name="cache-hit-flusher", daemon=True,
        )
        thread.start()

    def after_flush(self) -> None:
        self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the write-ahead log back into the database, off the request path.

        PASSIVE never waits for readers or writers (stores go on meanwhile), so it runs outside
        the write lock; another process's checkpoint in progress just makes this one a no-op.
        """
        self._bytes_since_checkpoint = 0
        try:
            self._db().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (sqlite3.Error, StoreError) as exc:
            log.debug("background checkpoint skipped: %s", exc)


def _left_of(wait_ms: int | None, began: float) -> int | None:
    """What is left of a wait of ``wait_ms`` begun at ``began`` (at least 1 ms; None: no limit)."""
    if wait_ms is None:
        return None
    return max(1, int(wait_ms - (time.monotonic() - began) * 1000))


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: SQLite has already rolled back after errors
    such as SQLITE_FULL, and a second ROLLBACK would hide the real error behind its own."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the original error is the one worth reporting
            log.warning("rollback failed: %s", exc)
