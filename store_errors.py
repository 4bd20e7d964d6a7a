"""The store's exceptions, in a module of their own so that cache_store.py and the parts of the
store kept in other modules (maintenance, browsing) raise the same ones without importing each other.
"""


class StoreError(Exception):
    """The store could not do what was asked; callers answer without the cache."""


class StoreBusy(StoreError):
    """Another write held the database longer than a caller that can do without the write
    (stats catching up on counters) was willing to wait; nothing is wrong with the database."""
