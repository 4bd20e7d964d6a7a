"""Store backends beyond the embedded SQLite one (cache_store.SQLiteStore): one module each, every
one a ``cache_store.CacheStore`` run through the same contract tests."""
