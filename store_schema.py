"""The store's schema: numbered migrations, each applied once and recorded in schema_migrations.

Migration 1 is the original server's ``completions`` table, unchanged, so its databases keep
working; every later change is a new number here, never an edit of an applied one.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable


def _m001_initial(db: sqlite3.Connection) -> None:
    """The original server's table, unchanged, so its database files keep working."""
    db.execute(
        """CREATE TABLE IF NOT EXISTS completions (
            cache_key TEXT PRIMARY KEY,
            mode TEXT NOT NULL,
            model TEXT NOT NULL,
            request_json TEXT NOT NULL,
            response_json TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_hit_at REAL,
            hits INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_model ON completions(model)")
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_updated_at ON completions(updated_at)")


def _m002_counters(db: sqlite3.Connection) -> None:
    """Running totals kept by triggers, so stats never scan the table however large it grows."""
    db.execute("CREATE TABLE IF NOT EXISTS cache_counters (name TEXT PRIMARY KEY, value REAL NOT NULL)")
    db.execute(
        """INSERT OR REPLACE INTO cache_counters(name, value)
           SELECT 'entries', count(*) FROM completions
           UNION ALL SELECT 'hits', coalesce(sum(hits), 0) FROM completions
           UNION ALL SELECT 'stored_bytes',
                  coalesce(sum(length(CAST(request_json AS BLOB))
                               + length(CAST(response_json AS BLOB))), 0) FROM completions"""
    )
    # One statement per execute: executescript() would commit the migration's transaction.
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_insert AFTER INSERT ON completions BEGIN
            UPDATE cache_counters SET value = value + 1 WHERE name = 'entries';
            UPDATE cache_counters SET value = value + NEW.hits WHERE name = 'hits';
            UPDATE cache_counters SET value = value + length(CAST(NEW.request_json AS BLOB))
                + length(CAST(NEW.response_json AS BLOB)) WHERE name = 'stored_bytes';
        END"""
    )
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_delete AFTER DELETE ON completions BEGIN
            UPDATE cache_counters SET value = value - 1 WHERE name = 'entries';
            UPDATE cache_counters SET value = value - OLD.hits WHERE name = 'hits';
            UPDATE cache_counters SET value = value - length(CAST(OLD.request_json AS BLOB))
                - length(CAST(OLD.response_json AS BLOB)) WHERE name = 'stored_bytes';
        END"""
    )
    # Separate UPDATE OF triggers: a hit-counter flush must not re-measure the stored texts.
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_hits AFTER UPDATE OF hits ON completions
        BEGIN
            UPDATE cache_counters SET value = value + NEW.hits - OLD.hits WHERE name = 'hits';
        END"""
    )
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_bytes
        AFTER UPDATE OF request_json, response_json ON completions BEGIN
            UPDATE cache_counters SET value = value
                + length(CAST(NEW.request_json AS BLOB)) + length(CAST(NEW.response_json AS BLOB))
                - length(CAST(OLD.request_json AS BLOB)) - length(CAST(OLD.response_json AS BLOB))
                WHERE name = 'stored_bytes';
        END"""
    )


def _m003_stats(db: sqlite3.Connection) -> None:
    """Savings and request counts as running totals, so /cache/stats never scans the table.

    Each entry remembers what one hit on it saves (usage, cost, upstream seconds); a trigger on
    its hit counter adds hits x savings to the totals and to the per-model row. Savings are money
    already saved: deleting or evicting an entry later does not take them back.
    """
    db.execute("ALTER TABLE completions ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE completions ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE completions ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE completions ADD COLUMN upstream_seconds REAL NOT NULL DEFAULT 0")
    # Entries stored before this migration: their usage is in the stored answer (once, here).
    db.execute(
        """UPDATE completions SET
            prompt_tokens = coalesce(json_extract(response_json, '$.usage.prompt_tokens'), 0),
            completion_tokens = coalesce(json_extract(response_json, '$.usage.completion_tokens'), 0),
            cost_usd = coalesce(json_extract(response_json, '$.usage.cost'), 0)
           WHERE json_valid(response_json)"""
    )
    # The dashboard's "top entries" reads the most-hit rows through this index, not a scan.
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_hits ON completions(hits)")
    db.execute(
        """INSERT OR IGNORE INTO cache_counters(name, value) VALUES
            ('since', ?), ('hits_served', 0), ('misses', 0), ('bypasses', 0), ('coalesced', 0),
            ('prompt_tokens_saved', 0), ('completion_tokens_saved', 0), ('cost_saved_usd', 0),
            ('time_saved_seconds', 0)""",
        (time.time(),),
    )
    db.execute(
        """CREATE TABLE IF NOT EXISTS model_stats (
            model TEXT PRIMARY KEY,
            hits INTEGER NOT NULL DEFAULT 0,
            misses INTEGER NOT NULL DEFAULT 0,
            bypasses INTEGER NOT NULL DEFAULT 0,
            coalesced INTEGER NOT NULL DEFAULT 0,
            prompt_tokens_saved INTEGER NOT NULL DEFAULT 0,
            completion_tokens_saved INTEGER NOT NULL DEFAULT 0,
            cost_saved_usd REAL NOT NULL DEFAULT 0,
            time_saved_seconds REAL NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        """CREATE TABLE IF NOT EXISTS request_timeline (
            bucket INTEGER NOT NULL,
            status TEXT NOT NULL,
            requests INTEGER NOT NULL,
            PRIMARY KEY (bucket, status)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE IF NOT EXISTS recent_requests (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            route TEXT NOT NULL,
            status TEXT NOT NULL,
            model TEXT NOT NULL,
            cache_key TEXT,
            seconds REAL NOT NULL,
            coalesced INTEGER NOT NULL
        )"""
    )
    # Only growth counts: re-storing an expired entry resets hits to 0 and must not subtract.
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_savings AFTER UPDATE OF hits ON completions
        WHEN NEW.hits > OLD.hits BEGIN
            UPDATE cache_counters SET value = value + NEW.hits - OLD.hits WHERE name = 'hits_served';
            UPDATE cache_counters SET value = value + (NEW.hits - OLD.hits) * NEW.prompt_tokens
                WHERE name = 'prompt_tokens_saved';
            UPDATE cache_counters SET value = value + (NEW.hits - OLD.hits) * NEW.completion_tokens
                WHERE name = 'completion_tokens_saved';
            UPDATE cache_counters SET value = value + (NEW.hits - OLD.hits) * NEW.cost_usd
                WHERE name = 'cost_saved_usd';
            UPDATE cache_counters SET value = value + (NEW.hits - OLD.hits) * NEW.upstream_seconds
                WHERE name = 'time_saved_seconds';
            INSERT INTO model_stats(model, hits, prompt_tokens_saved, completion_tokens_saved,
                                    cost_saved_usd, time_saved_seconds)
            VALUES (NEW.model, NEW.hits - OLD.hits, (NEW.hits - OLD.hits) * NEW.prompt_tokens,
                    (NEW.hits - OLD.hits) * NEW.completion_tokens,
                    (NEW.hits - OLD.hits) * NEW.cost_usd, (NEW.hits - OLD.hits) * NEW.upstream_seconds)
            ON CONFLICT(model) DO UPDATE SET
                hits = hits + excluded.hits,
                prompt_tokens_saved = prompt_tokens_saved + excluded.prompt_tokens_saved,
                completion_tokens_saved = completion_tokens_saved + excluded.completion_tokens_saved,
                cost_saved_usd = cost_saved_usd + excluded.cost_saved_usd,
                time_saved_seconds = time_saved_seconds + excluded.time_saved_seconds;
        END"""
    )


def _m004_bounded_store(db: sqlite3.Connection) -> None:
    """Per-entry expiry and namespace, and the indexes eviction, purging and listing walk.

    ``expires_at`` NULL means "the server's CACHE_TTL_SECONDS counted from created_at"; a value
    is the entry's own deadline (X-Cache-TTL). ``namespace`` NULL is the default key space.
    Recency for LRU eviction is the last hit, else the last store: an expression index on it
    lets eviction read the oldest rows without a scan.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(completions)")}
    if "expires_at" not in columns:
        db.execute("ALTER TABLE completions ADD COLUMN expires_at REAL")
    if "namespace" not in columns:
        db.execute("ALTER TABLE completions ADD COLUMN namespace TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_recency "
               "ON completions(coalesce(last_hit_at, updated_at))")
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_expires_at ON completions(expires_at)")
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_created_at ON completions(created_at)")
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_namespace ON completions(namespace)")


def _m005_near_index(db: sqlite3.Connection) -> None:
    """What near matching needs to find an entry again (CACHE_MATCH=near): the entry's near group
    (its request normalised: tool-call ids renumbered, images blanked) and its screenshots'
    fingerprints, beside the entry and gone with it (a trigger: delete, clear, purge, evict).
    Near hits are counted apart from exact ones, in total and per model."""
    db.execute(
        """CREATE TABLE IF NOT EXISTS near_index (
            cache_key TEXT PRIMARY KEY,
            near_group TEXT NOT NULL,
            fingerprints BLOB NOT NULL,
            stored_at REAL NOT NULL
        )"""
    )
    # A lookup reads one group's newest rows first and stops at its limit.
    db.execute("CREATE INDEX IF NOT EXISTS idx_near_index_group ON near_index(near_group, stored_at)")
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_near_index_delete AFTER DELETE ON completions
        BEGIN
            DELETE FROM near_index WHERE cache_key = OLD.cache_key;
        END"""
    )
    db.execute("INSERT OR IGNORE INTO cache_counters(name, value) VALUES ('near_hits', 0)")
    db.execute("ALTER TABLE model_stats ADD COLUMN near_hits INTEGER NOT NULL DEFAULT 0")


def _m006_api_stats(db: sqlite3.Connection) -> None:
    """Figures per API (an entry's ``mode``), kept like the per-model ones, and entries whose
    cost the price table could not give (``unpriced``), whose hits are counted apart.

    They count from this migration on (the totals and the per-model rows keep their history).
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(completions)")}
    if "unpriced" not in columns:
        db.execute("ALTER TABLE completions ADD COLUMN unpriced INTEGER NOT NULL DEFAULT 0")
    db.execute("INSERT OR IGNORE INTO cache_counters(name, value) VALUES ('unpriced_hits', 0)")
    db.execute(
        """CREATE TABLE IF NOT EXISTS api_stats (
            api TEXT PRIMARY KEY,
            hits INTEGER NOT NULL DEFAULT 0,
            misses INTEGER NOT NULL DEFAULT 0,
            bypasses INTEGER NOT NULL DEFAULT 0,
            coalesced INTEGER NOT NULL DEFAULT 0,
            prompt_tokens_saved INTEGER NOT NULL DEFAULT 0,
            completion_tokens_saved INTEGER NOT NULL DEFAULT 0,
            cost_saved_usd REAL NOT NULL DEFAULT 0,
            time_saved_seconds REAL NOT NULL DEFAULT 0,
            unpriced_hits INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_api_savings AFTER UPDATE OF hits ON completions
        WHEN NEW.hits > OLD.hits BEGIN
            UPDATE cache_counters SET value = value + (NEW.hits - OLD.hits) * NEW.unpriced
                WHERE name = 'unpriced_hits';
            INSERT INTO api_stats(api, hits, prompt_tokens_saved, completion_tokens_saved,
                                  cost_saved_usd, time_saved_seconds, unpriced_hits)
            VALUES (NEW.mode, NEW.hits - OLD.hits, (NEW.hits - OLD.hits) * NEW.prompt_tokens,
                    (NEW.hits - OLD.hits) * NEW.completion_tokens,
                    (NEW.hits - OLD.hits) * NEW.cost_usd, (NEW.hits - OLD.hits) * NEW.upstream_seconds,
                    (NEW.hits - OLD.hits) * NEW.unpriced)
            ON CONFLICT(api) DO UPDATE SET
                hits = hits + excluded.hits,
                prompt_tokens_saved = prompt_tokens_saved + excluded.prompt_tokens_saved,
                completion_tokens_saved = completion_tokens_saved + excluded.completion_tokens_saved,
                cost_saved_usd = cost_saved_usd + excluded.cost_saved_usd,
                time_saved_seconds = time_saved_seconds + excluded.time_saved_seconds,
                unpriced_hits = unpriced_hits + excluded.unpriced_hits;
        END"""
    )


MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite3.Connection], None]], ...] = (
    (1, "initial", _m001_initial),
    (2, "counters", _m002_counters),
    (3, "stats", _m003_stats),
    (4, "bounded_store", _m004_bounded_store),
    (5, "near_index", _m005_near_index),
    (6, "api_stats", _m006_api_stats),
)
