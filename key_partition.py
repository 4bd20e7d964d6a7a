"""Per-client cache partitions: a client only hits entries created with its own API key.

When the proxy holds no upstream key for an API (UPSTREAM_API_KEY; for Anthropic Messages
ANTHROPIC_UPSTREAM_API_KEY), each client's own key is forwarded upstream and
pays for that client's misses. One shared cache would then let anyone read the answers to other
users' prompts, and let a client with an invalid key ride on someone else's spend. So the cache
key of every request is mixed with HMAC-SHA256(server secret, client key): the raw client key is
never stored, and without the server secret nobody can tell which entries belong to which key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from typing import Callable

from config import Settings
from store_errors import StoreError

log = logging.getLogger("computer_use_cache.partition")

SECRET_SUFFIX = ".secret"
_MIN_SECRET_BYTES = 16


class KeySecretError(Exception):
    """The server secret can be neither read nor created; the request bypasses the cache."""


class ClientPartitions:
    """Which partition of the cache a client key belongs to. Whether an API partitions at all is
    the proxy's call: not when the server holds that API's upstream key (every client spends the
    same key, so they may share answers), nor with CACHE_SHARE_ACROSS_KEYS."""

    def __init__(self, settings: Settings, stored_secret: Callable[[], bytes | None] | None = None):
        self.secret_path = settings.cache_db_path + SECRET_SUFFIX
        self._secret = settings.cache_key_secret.encode("utf-8") or None
        # The store's own place for the generated secret (CacheStore.partition_secret): shared by
        # every instance on a networked store; None there means "a file beside the database".
        self._stored_secret = stored_secret
        self._lock = threading.Lock()
        self._failure_logged = False

    def partition_for(self, token: str | None) -> str | None:
        """The partition of a client key, whatever header carried it; None without a key.

        Requests without a key use the unpartitioned key space, so their keys stay the original
        server's (an upstream that takes no key answers everyone alike anyway); no keyed
        partition can reach it, nor it them.
        """
        if token is None:
            return None
        identity = b"key " + token.encode("utf-8", "surrogatepass")
        return hmac.new(self._server_secret(), identity, hashlib.sha256).hexdigest()

    def _server_secret(self) -> bytes:
        secret = self._secret
        if secret is None:
            with self._lock:
                if self._secret is None:
                    try:
                        self._secret = self._load_secret()
                    except KeySecretError as exc:
                        if not self._failure_logged:
                            self._failure_logged = True
                            log.error("cache key secret %s unusable, cacheable requests bypass "
                                      "the cache until it is fixed: %s", self.secret_path, exc)
                        raise
                secret = self._secret
        return secret

    def _load_secret(self) -> bytes:
        if self._stored_secret is not None:
            try:
                secret = self._stored_secret()
            except StoreError as exc:
                raise KeySecretError(f"cannot read the cache key secret from the store: {exc}") from exc
            if secret is not None:
                return secret
        return load_or_create_secret(self.secret_path)


def load_or_create_secret(path: str) -> bytes:
    """The secret kept in ``path``, created on first use by whichever process comes first.

    A new secret (32 random bytes, written as hex) goes to a private temporary file that is then
    linked into place. The link fails when the file already exists, so concurrent workers all end
    up with the one secret, and nobody ever reads a half-written file.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    try:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_bytes(32).hex() + "\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another worker was first: use its secret
        finally:
            os.unlink(temporary)
        return _read_secret(path)
    except OSError as exc:
        raise KeySecretError(f"cannot create the cache key secret file: {exc.strerror or exc}") from exc


def _read_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            secret = file.read().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KeySecretError(f"cannot read the cache key secret file: {exc.strerror or exc}") from exc
    if len(secret) < _MIN_SECRET_BYTES:
        raise KeySecretError(f"the cache key secret file is shorter than {_MIN_SECRET_BYTES} bytes")
    return secret
