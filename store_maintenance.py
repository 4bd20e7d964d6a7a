"""Background maintenance of the SQLite store: purging expired entries, evicting over the bounds
and handing free pages back. It lives apart from cache_store.py because none of it runs on a
request; one thread per process does it through the store's own connections and writes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass

from store_errors import StoreError

log = logging.getLogger("computer_use_cache.store")

# Rows deleted per write transaction by eviction and purging: short transactions let request
# writes interleave, and readers (hits) are never blocked under WAL anyway.
MAINTENANCE_BATCH = 500
# Free pages handed back per incremental_vacuum step, for the same reason.
VACUUM_BATCH_PAGES = 2000
# Bytes of one entry, as the stored_bytes counter measures them.
ENTRY_SIZE_SQL = "length(CAST(request_json AS BLOB)) + length(CAST(response_json AS BLOB))"


@dataclass(frozen=True)
class MaintenanceReport:
    """What one maintenance pass did."""

    purged: int = 0
    evicted: int = 0
    vacuumed_pages: int = 0
    converted_to_incremental: bool = False


class StoreMaintenance:
    """SQLiteStore's background maintainer, as a mixin: it relies on the store's settings
    (``ttl_seconds``, ``max_entries``, ``max_bytes``, ``maintenance_seconds``), its locks and
    its ``_db``, ``_write`` and ``flush``, and its hits not yet written (``_pending_hits``,
    ``_hits_in_flight``)."""

    @property
    def bounded(self) -> bool:
        return bool(self.max_entries or self.max_bytes)

    def _start_maintainer(self) -> None:
        """One maintenance thread per process, started by the first lookup or store after fork."""
        pid = os.getpid()
        if self._maintainer_pid == pid:
            return
        if self.maintenance_seconds <= 0 and not self.bounded:
            return
        with self._lock:
            if self._maintainer_pid == pid:
                return
            self._maintainer_pid = pid
            self._maintainer_stop = threading.Event()
            self._maintainer_wake = threading.Event()
            thread = threading.Thread(
                target=self._maintain_forever, args=(self._maintainer_stop, self._maintainer_wake),
                name="cache-maintainer", daemon=True,
            )
            thread.start()

    def maintain(self, *, purge: bool = True,
                 stop: threading.Event | None = None) -> MaintenanceReport:
        """Purge expired entries, evict over the bounds, hand free pages back to the file system.

        Runs in the background thread (and from ``flask cache purge``); never on a request.
        ``stop`` (set by ``close``) ends the work between two batches.
        """
        with self._maintenance_lock:
            converted = self._ensure_incremental_vacuum() if purge else False
            purged = self.purge_expired(stop) if purge else 0
            evicted = self.evict(stop)
            pages = self.vacuum() if (purged or evicted or converted or purge) else 0
        return MaintenanceReport(purged, evicted, pages, converted)

    def purge_expired(self, stop: threading.Event | None = None) -> int:
        """Delete every expired entry, a batch per transaction; returns how many."""
        now = self.clock()
        if self.ttl_seconds > 0:
            condition = ("(expires_at IS NOT NULL AND expires_at < ?) "
                         "OR (expires_at IS NULL AND created_at < ?)")
            params: tuple = (now, now - self.ttl_seconds)
        else:
            condition = "expires_at IS NOT NULL AND expires_at < ?"
            params = (now,)
        sql = (f"DELETE FROM completions WHERE rowid IN "
               f"(SELECT rowid FROM completions WHERE {condition} LIMIT {MAINTENANCE_BATCH})")
        total = 0
        while True:
            deleted = int(self._write(lambda db: db.execute(sql, params).rowcount))  # type: ignore[arg-type]
            total += deleted
            if deleted < MAINTENANCE_BATCH or (stop is not None and stop.is_set()):
                return total

    def evict(self, stop: threading.Event | None = None) -> int:
        """Delete least-recently-used entries until both bounds hold; returns how many.

        Recency is the last hit, else the last store. Hit counters held in memory are written
        first so a fresh hit counts; another worker's unflushed hits (at most
        CACHE_HIT_FLUSH_SECONDS old) cannot be seen.
        """
        if not self.bounded:
            return 0
        self.flush()
        total = 0
        while True:
            deleted = int(self._write(self._evict_batch))  # type: ignore[arg-type]
            total += deleted
            if deleted == 0 or (stop is not None and stop.is_set()):
                return total

    def _evict_batch(self, db: sqlite3.Connection) -> int:
        counters = dict(db.execute(
            "SELECT name, value FROM cache_counters WHERE name IN ('entries', 'stored_bytes')"))
        excess_entries = int(counters.get("entries", 0)) - self.max_entries if self.max_entries else 0
        excess_bytes = int(counters.get("stored_bytes", 0)) - self.max_bytes if self.max_bytes else 0
        if excess_entries <= 0 and excess_bytes <= 0:
            return 0
        rows = db.execute(
            f"SELECT cache_key, {ENTRY_SIZE_SQL} FROM completions "
            f"ORDER BY coalesce(last_hit_at, updated_at) LIMIT {MAINTENANCE_BATCH}"
        ).fetchall()
        # Hit since the flush that ``evict`` began with, or taken by a flush that waits for this
        # write to finish: the most recently used, whatever the table says yet.
        with self._lock:
            hit_meanwhile = set(self._pending_hits) | set(self._hits_in_flight)
        victims = []
        for key, size in rows:
            if excess_entries <= 0 and excess_bytes <= 0:
                break
            if key in hit_meanwhile:
                continue
            victims.append((key,))
            excess_entries -= 1
            excess_bytes -= size
        db.executemany("DELETE FROM completions WHERE cache_key = ?", victims)
        return len(victims)

    def vacuum(self) -> int:
        """Hand free pages back to the file system (incremental vacuum); returns pages freed."""
        freed = 0
        try:
            db = self._db()
            while self._auto_vacuum_mode(db) == 2:
                (free_pages,) = db.execute("PRAGMA freelist_count").fetchone()
                if not free_pages:
                    break
                # BEGIN IMMEDIATE: wait for the write lock like every other write instead of
                # failing at once; executescript steps the pragma to the end (execute() would
                # free a single page).
                try:
                    db.executescript(
                        f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({VACUUM_BATCH_PAGES}); COMMIT;")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                (left,) = db.execute("PRAGMA freelist_count").fetchone()
                if left >= free_pages:
                    break
                freed += free_pages - left
            # Every pass, not only after freeing pages: a checkpoint that a reader held back
            # last time finishes now. PASSIVE never waits for readers or writers; it copies the
            # WAL back and, when it gets to the end, truncates the database file to its new size.
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        return freed

    @staticmethod
    def _auto_vacuum_mode(db: sqlite3.Connection) -> int:
        # A connection caches the mode from the file header and refreshes it when a transaction
        # reads the header; read first so a conversion made by another connection is seen.
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        (mode,) = db.execute("PRAGMA auto_vacuum").fetchone()
        return int(mode)

    def auto_vacuum_mode(self) -> int:
        """0 none, 1 full, 2 incremental (what ``maintain`` switches every database to)."""
        try:
            return self._auto_vacuum_mode(self._db())
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    def _ensure_incremental_vacuum(self) -> bool:
        """A database made without incremental auto-vacuum (the original server's) gets it.

        Setting the mode on a file that already holds tables only takes effect through a VACUUM,
        which rewrites the file in one transaction: atomic (a crash leaves the old file), but it
        needs free disk space of about the file's size and holds the write lock while it runs.
        It runs once, here in the background; ``flask cache purge`` can do it ahead of time.
        """
        try:
            db = self._db()
            if self._auto_vacuum_mode(db) == 2:
                return False
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("VACUUM")
            converted = self._auto_vacuum_mode(db) == 2
        except sqlite3.Error as exc:
            log.warning("could not switch the cache database to incremental vacuum: %s", exc)
            return False
        log.info("cache database switched to incremental auto-vacuum")
        return converted

    def db_file_bytes(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0
