"""Browsing, export and import of the stored entries: the dashboard's top entries, the entries
API and ``flask cache list/show/export/import``. They live apart from cache_store.py because they
are the operator's views of the table, never on a cached request's path.
"""

from __future__ import annotations

import base64
import sqlite3
from dataclasses import dataclass
from typing import Any, Iterator

from previews import prompt_preview
from store_errors import StoreError
from store_maintenance import ENTRY_SIZE_SQL, MAINTENANCE_BATCH

_ENTRY_COLUMNS = (
    "cache_key, mode, model, namespace, created_at, updated_at, last_hit_at, hits, "
    f"{ENTRY_SIZE_SQL}, expires_at"
)


@dataclass(frozen=True)
class TopEntry:
    """One of the most-hit entries, for the dashboard."""

    key: str
    model: str
    request_json: str
    hits: int
    created_at: float
    last_hit_at: float | None
    size_bytes: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    upstream_seconds: float


class StoreBrowsing:
    """SQLiteStore's listing, export and import, as a mixin: it relies on the store's ``_db``,
    ``_write``, ``flush``, ``_report_error``, ``is_expired`` and ``expiry_time``."""

    def list_entries(self, *, limit: int = 50, after: tuple[float, str] | None = None,
                     model: str | None = None, namespace: Any = ...) -> list[dict]:
        """Entries newest first (by last store), ``limit`` of them after the ``after`` position.

        ``namespace``: ``...`` for any, None for the default key space, or a name.
        """
        self.flush()
        where, params = [], []
        if after is not None:
            where.append("(updated_at < ? OR (updated_at = ? AND cache_key < ?))")
            params += [after[0], after[0], after[1]]
        if model is not None:
            where.append("model = ?")
            params.append(model)
        if namespace is None:
            where.append("namespace IS NULL")
        elif namespace is not ...:
            where.append("namespace = ?")
            params.append(namespace)
        sql = (f"SELECT {_ENTRY_COLUMNS}, request_json FROM completions "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY updated_at DESC, cache_key DESC LIMIT ?")
        params.append(int(limit))
        try:
            rows = self._db().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        items = []
        for row in rows:
            item = self._entry_summary(row)
            item["prompt"] = prompt_preview(row[-1], limit=80)
            items.append(item)
        return items

    def entry(self, key: str) -> dict | None:
        """One entry with its stored request and response texts, or None."""
        self.flush()
        try:
            row = self._db().execute(
                f"SELECT {_ENTRY_COLUMNS}, request_json, response_json FROM completions "
                f"WHERE cache_key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        if row is None:
            return None
        item = self._entry_summary(row)
        item["request_json"], item["response_json"] = row[-2], row[-1]
        return item

    def _entry_summary(self, row: tuple) -> dict:
        (key, mode, model, namespace, created_at, updated_at, last_hit_at, hits, size,
         expires_at) = row[:10]
        return {
            "key": key, "mode": mode, "model": model, "namespace": namespace,
            "created_at": created_at, "updated_at": updated_at, "last_hit_at": last_hit_at,
            "hits": hits, "size": size, "expires_at": self.expiry_time(created_at, expires_at),
            "expired": self.is_expired(created_at, None, expires_at),
        }

    def export_rows(self, batch: int = MAINTENANCE_BATCH) -> Iterator[dict]:
        """Every entry with the fields an import needs, in insertion order, a page at a time.

        An entry indexed for near matching also carries ``near_group`` and
        ``near_fingerprints`` (base64)."""
        self.flush()
        last_rowid = -1
        while True:
            try:
                rows = self._db().execute(
                    "SELECT c.rowid, c.cache_key, mode, model, namespace, request_json, response_json, "
                    "created_at, updated_at, expires_at, n.near_group, n.fingerprints "
                    "FROM completions c LEFT JOIN near_index n ON n.cache_key = c.cache_key "
                    "WHERE c.rowid > ? ORDER BY c.rowid LIMIT ?", (last_rowid, batch)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(str(exc)) from exc
            if not rows:
                return
            for row in rows:
                last_rowid = row[0]
                record = dict(zip(("key", "mode", "model", "namespace", "request_json",
                                   "response_json", "created_at", "updated_at", "expires_at"), row[1:10]))
                if row[10] is not None:
                    record["near_group"] = row[10]
                    record["near_fingerprints"] = base64.b64encode(row[11]).decode("ascii")
                yield record

    def insert_new(self, records: list[dict]) -> int:
        """Insert entries whose key is absent; an existing entry is never touched.

        Returns how many were inserted. Imported entries start with no hits of their own here.
        A record with ``near_group`` and ``near_fingerprints`` (bytes) is indexed for near
        matching, unless its key already had a near record.
        """
        rows = [(r["key"], r["mode"], r["model"], r["namespace"], r["request_json"],
                 r["response_json"], r["created_at"], r["updated_at"], r["expires_at"])
                for r in records]
        near_rows = [(r["key"], r["near_group"], r["near_fingerprints"], r["updated_at"])
                     for r in records if r.get("near_group") is not None]

        def insert(db: sqlite3.Connection) -> int:
            inserted = db.executemany(
                "INSERT OR IGNORE INTO completions(cache_key, mode, model, namespace, request_json, "
                "response_json, created_at, updated_at, expires_at, last_hit_at, hits) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0)", rows).rowcount
            db.executemany("INSERT OR IGNORE INTO near_index(cache_key, near_group, fingerprints, "
                           "stored_at) VALUES (?, ?, ?, ?)", near_rows)
            return inserted

        return int(self._write(insert))  # type: ignore[arg-type]

    def entry_count(self) -> int:
        try:
            (value,) = self._db().execute(
                "SELECT coalesce(max(value), 0) FROM cache_counters WHERE name = 'entries'"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        return int(value)

    def top_entries(self, limit: int = 10) -> list[TopEntry]:
        """The most-hit entries, read through the index on hits (no table scan)."""
        self.flush()
        try:
            rows = self._db().execute(
                f"SELECT cache_key, model, request_json, hits, created_at, last_hit_at, {ENTRY_SIZE_SQL}, "
                "prompt_tokens, completion_tokens, cost_usd, upstream_seconds "
                "FROM completions INDEXED BY idx_completions_hits ORDER BY hits DESC LIMIT ?",
                (limit,),
            ).fetchall()
        except sqlite3.Error as exc:
            self._report_error("read")
            raise StoreError(str(exc)) from exc
        return [TopEntry(*row) for row in rows]
