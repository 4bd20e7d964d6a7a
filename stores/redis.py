"""The Redis store: one cache shared by every instance that points CACHE_URL at the same Redis.

Layout (every key starts with CACHE_REDIS_PREFIX, ``P`` below, so one Redis can serve other
things and ``clear`` removes only ours):

- ``P e:<key>``: a hash per entry (texts, times, hits, savings, near record). It carries native
  expiry (PEXPIRE) at the entry's deadline, so Redis frees an entry's memory even when no instance
  is running; whether an entry is live is still decided by the store's clock, as on SQLite.
- ``P meta``: key -> [size, model, namespace, near group], what the bookkeeping needs to undo an
  entry even after Redis dropped its hash (expiry, eviction by maxmemory).
- sorted sets: ``P i:updated`` / ``P i:model:<m>`` / ``P i:ns:<n>`` (by last store: listing,
  export), ``P i:recency`` (last hit else last store: LRU eviction), ``P i:hits`` (dashboard),
  ``P i:created`` / ``P i:own`` (purging by the server TTL / by the entry's own deadline) and
  ``P near:<group>`` (near matching).
- ``P counters``, ``P models`` + ``P model:<m>``, ``P apis`` + ``P api:<mode>`` (per API: an
  entry's mode), ``P tl:<bucket>``, ``P recent``: the running totals behind /cache/stats,
  /metrics and the dashboard, summed over every instance.

A lookup is one round trip (HMGET). Hits and request counts are tallied in memory and written
every CACHE_HIT_FLUSH_SECONDS in one MULTI/EXEC; every write that touches several keys is one Lua
script (stores/redis_scripts.py), so the counters and indexes never disagree. Redis Cluster is
not supported (the scripts touch keys they compute themselves).

While Redis cannot be reached a small circuit breaker answers every call at once with the reason
(``StoreError``), trying again at most every ``retry_seconds``: requests then go upstream as
BYPASS instead of each waiting for a dead server.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache_store import (NEVER_EXPIRES, RECENT_REQUESTS_KEPT, REQUEST_STATUSES, TIMELINE_BUCKET_SECONDS,
                         TIMELINE_KEEP_SECONDS, CachedEntry, CacheStore, NearRecord, NewEntry, RequestTally,
                         TopEntry, hit_rate, savings, stats_totals)
from config import redact_url
from previews import prompt_preview
from store_errors import StoreError
from store_maintenance import MAINTENANCE_BATCH, MaintenanceReport
from stores import redis_scripts as scripts

log = logging.getLogger("computer_use_cache.store")

# A dead or frozen Redis must cost a request at most about this much before the breaker opens.
CONNECT_TIMEOUT_SECONDS = 1.0
SOCKET_TIMEOUT_SECONDS = 2.0
# While Redis is unreachable, one request (or stats call) tries again this often.
RETRY_SECONDS = 1.0
# Native expiry comes this long after the deadline the store's clock enforces: the clock decides.
EXPIRY_GRACE_MS = 1000
# How long stats wait for this process's counters to be written before answering without them.
STATS_FLUSH_WAIT_SECONDS = 0.1

_GET_FIELDS = ("mode", "model", "response_json", "created_at", "updated_at", "hits", "expires_at")
_SUMMARY_FIELDS = ("mode", "model", "namespace", "created_at", "updated_at", "last_hit_at", "hits",
                   "size", "expires_at")
_TOP_FIELDS = ("model", "request_json", "hits", "created_at", "last_hit_at", "size", "prompt_tokens",
               "completion_tokens", "cost_usd", "upstream_seconds")
_EXPORT_FIELDS = ("mode", "model", "namespace", "request_json", "response_json", "created_at",
                  "updated_at", "expires_at", "near_group", "near_fp")

class CircuitBreaker:
    """Open after a connection failure: calls fail at once with the reason until ``retry_seconds``
    passed; then one call at a time tries again (the others still fail at once), and the first
    success closes it."""

    def __init__(self, retry_seconds: float, describe: str):
        self.retry_seconds = retry_seconds
        self.describe = describe
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._retry_at = 0.0
        self._probing = False

    def check(self) -> None:
        """Raise StoreError while open (unless this call is the one that tries again)."""
        if self.reason is None:
            return
        with self._lock:
            reason = self.reason
            if reason is None:
                return
            if self._probing or time.monotonic() < self._retry_at:
                raise StoreError(reason)
            self._probing = True

    def open_reason(self) -> str | None:
        """The reason while calls would fail at once; None when the next call may go to Redis."""
        reason = self.reason
        if reason is None or (not self._probing and time.monotonic() >= self._retry_at):
            return None
        return reason

    def succeeded(self) -> None:
        if self.reason is None:
            return
        with self._lock:
            recovered, self.reason, self._probing = self.reason, None, False
        if recovered is not None:
            log.warning("%s is available again; caching resumes", self.describe)

    def failed(self, reason: str) -> None:
        with self._lock:
            first = self.reason is None
            self.reason = reason
            self._retry_at = time.monotonic() + self.retry_seconds
            self._probing = False
        if first:
            log.error("%s unavailable, requests are answered without the cache until it is back "
                      "(tried again every %gs): %s", self.describe, self.retry_seconds, reason)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8")


def _number(value: bytes | None) -> float | None:
    return None if value is None or value == b"" else float(value)


def _int(value: bytes | None) -> int:
    return 0 if value is None or value == b"" else int(float(value))


def _stored_float(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisStore(CacheStore):
    """Cache entries in Redis, shared by every instance (and worker) using the same URL and prefix."""

    quiet_maintenance_errors = (StoreError,)  # Redis unreachable: /healthz says so already

    def __init__(
        self,
        url: str,
        ttl_seconds: float = 0,
        *,
        prefix: str = "cuc:",
        clock: Callable[[], float] = time.time,
        hit_flush_seconds: float = 1.0,
        max_entries: int = 0,
        max_bytes: int = 0,
        maintenance_seconds: float = 60.0,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
        socket_timeout_seconds: float = SOCKET_TIMEOUT_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
    ):
        self.url = url
        self.path = redact_url(url)  # what stats call db_path: never the password
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.hit_flush_seconds = hit_flush_seconds
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.maintenance_seconds = maintenance_seconds
        self.on_error: Callable[[str], None] | None = None
        self._password = _password_of(url)
        # No retries of our own beyond one reconnect (a connection Redis closed while idle, e.g.
        # after a restart): a timeout is never retried, so a frozen Redis costs one timeout.
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_seconds, socket_timeout=socket_timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        self.breaker = CircuitBreaker(retry_seconds, f"Redis cache at {self.path}")
        self._put = self.client.register_script(scripts.PUT)
        self._hits = self.client.register_script(scripts.HITS)
        self._delete = self.client.register_script(scripts.DELETE)
        self._purge = self.client.register_script(scripts.PURGE)
        self._evict = self.client.register_script(scripts.EVICT)
        self.release_script = self.client.register_script(scripts.RELEASE)
        self.renew_script = self.client.register_script(scripts.RENEW)
        self._idle: list = []  # the lookup pool (_lookup_command); list.pop/append are atomic
        self._idle_pid: int | None = None
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._maintenance_lock = threading.Lock()
        self._pending_hits: dict[str, list[float]] = {}
        self._pending_requests = RequestTally()
        self._threads_pid: int | None = None
        self._stop = threading.Event()
        self._flusher_wake = threading.Event()
        self._maintainer_wake = threading.Event()

    # -- plumbing ------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """A Redis key of ours: the prefix, then the parts."""
        return self.prefix + "".join(parts)

    def failure(self, operation: str, exc: redis.RedisError) -> StoreError:
        """A Redis error as a StoreError (password redacted); connection faults open the breaker."""
        reason = f"Redis: {exc}" if str(exc) else f"Redis: {type(exc).__name__}"
        if self._password:
            reason = reason.replace(self._password, "***")
        reason = redact_url(reason)
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) or \
                (isinstance(exc, redis.ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "LOADING"))):
            self.breaker.failed(reason)
        else:
            self.breaker.succeeded()  # Redis answered (or was never asked): not a connection fault
        if self.on_error is not None:
            self.on_error(operation)
        error = StoreError(reason)
        error.__cause__ = exc
        return error

    def run(self, operation: str, call: Callable[[], Any]) -> Any:
        """One call to Redis through the breaker; RedisError becomes StoreError."""
        self.breaker.check()
        try:
            result = call()
        except redis.RedisError as exc:
            raise self.failure(operation, exc) from exc
        except BaseException:
            self.breaker.succeeded()  # not a Redis fault: a probe in progress must not stay stuck
            raise
        self.breaker.succeeded()
        return result

    def unavailable_reason(self) -> str | None:
        return self.breaker.open_reason()

    def _start_threads(self) -> None:
        """The hit flusher and the maintainer, once per process (after a fork, in the child)."""
        pid = os.getpid()
        if self._threads_pid == pid:
            return
        with self._lock:
            if self._threads_pid == pid:
                return
            self._threads_pid = pid
            self._stop = threading.Event()
            self._flusher_wake = threading.Event()
            self._maintainer_wake = threading.Event()
            if self.hit_flush_seconds > 0:
                threading.Thread(target=self._flush_forever, args=(self._stop, self._flusher_wake),
                                 name="cache-hit-flusher", daemon=True).start()
            if self.maintenance_seconds > 0 or self.bounded:
                threading.Thread(target=self._maintain_forever, args=(self._stop, self._maintainer_wake),
                                 name="cache-maintainer", daemon=True).start()

    @property
    def bounded(self) -> bool:
        return bool(self.max_entries or self.max_bytes)

    # -- the request path ----------------------------------------------------------------------

    def _lookup_command(self, *args: Any) -> Any:
        """One command on a connection of the lookup pool: the hit path's one round trip.

        redis-py's own pool costs several system calls per command on top of it (a readiness
        poll and two timeout changes) plus bookkeeping: about as much again as the round trip.
        These connections are taken and given back without them; one that failed in any way
        is closed, never reused, so a late reply can never be read as the next one's.
        """
        idle = self._idle
        if self._idle_pid != os.getpid():  # after a fork: the parent's sockets are not ours
            idle = self._idle = []
            self._idle_pid = os.getpid()
        try:
            connection = idle.pop()
            reused = True
        except IndexError:
            connection, reused = self.client.connection_pool.make_connection(), False
        try:
            connection.send_command(*args)
            reply = connection.read_response()
        except redis.ConnectionError:
            connection.disconnect()
            if not reused:
                raise
            return self._lookup_command(*args)  # closed while idle (a restart, an idle timeout)
        except BaseException:
            connection.disconnect()
            raise
        idle.append(connection)
        return reply

    def get(self, key: str, *, max_age: float | None = None) -> CachedEntry | None:
        self._start_threads()
        row = self.run("read", lambda: self._lookup_command("HMGET", self.prefix + "e:" + key, *_GET_FIELDS))
        if row[0] is None or row[2] is None:
            return None
        try:
            mode, model, response = row[0].decode(), row[1].decode(), row[2].decode()
            created_at, updated_at = float(row[3]), float(row[4])
            hits, expires_at = _int(row[5]), _number(row[6])
        except (ValueError, TypeError, UnicodeDecodeError):
            log.warning("unreadable cache entry %s treated as a miss", key[:12])
            return None
        now = self.clock()
        if self.is_expired(created_at, now, expires_at):
            return None
        if max_age is not None and now - updated_at > max_age:
            return None
        return CachedEntry(key, mode, model, response, created_at, updated_at, hits)

    def put(self, entry: NewEntry, *, ttl_seconds: float | None = None, namespace: str | None = None,
            near: NearRecord | None = None) -> str:
        self._start_threads()
        now = self.clock()
        if ttl_seconds is None:
            expires_at = None
        elif ttl_seconds <= 0:
            expires_at = NEVER_EXPIRES
        else:
            expires_at = now + ttl_seconds
        outcome = self._write_entry(entry.key, now, expires_at, entry.mode, entry.model, entry.request_json,
                                    entry.response_json, namespace, near,
                                    (entry.prompt_tokens, entry.completion_tokens, entry.cost_usd,
                                     entry.upstream_seconds, entry.unpriced))
        if self.bounded:
            self._maintainer_wake.set()  # eviction runs in the background, never here
        return outcome

    def _entry_args(self, key: str, now: float, expires_at: float | None, mode: str, model: str,
                    request_json: str, response_json: str, namespace: str | None,
                    near: NearRecord | None, figures: tuple, *, only_if_absent: bool = False,
                    created_at: float | None = None, updated_at: float | None = None) -> list:
        request_bytes, response_bytes = request_json.encode("utf-8"), response_json.encode("utf-8")
        prompt_tokens, completion_tokens, cost_usd, upstream_seconds, unpriced = figures
        return [self.prefix, key, repr(float(now)), repr(float(self.ttl_seconds)), _stored_float(expires_at),
                mode, model, request_bytes, response_bytes, namespace or "",
                int(prompt_tokens), int(completion_tokens), repr(float(cost_usd)),
                repr(float(upstream_seconds)), len(request_bytes) + len(response_bytes),
                near.group if near else "", near.fingerprints if near else b"", EXPIRY_GRACE_MS,
                "1" if only_if_absent else "0", _stored_float(created_at), _stored_float(updated_at),
                "1" if unpriced else "0"]

    def _write_entry(self, key: str, now: float, expires_at: float | None, *rest: Any, **options: Any) -> str:
        try:
            args = self._entry_args(key, now, expires_at, *rest, **options)
        except UnicodeEncodeError as exc:
            raise StoreError(f"text Redis cannot hold: {exc.reason}") from exc
        return self.run("write", lambda: self._put(args=args)).decode()

    def near_candidates(self, group: str, limit: int = 16) -> list[tuple[str, bytes]]:
        """Live entries of the group, most recently stored first (expired ones are skipped)."""
        found: list[tuple[str, bytes]] = []
        start = 0
        while len(found) < limit:
            keys = self.run("read", lambda: self.client.zrevrange(self.key("near:", group), start,
                                                                  start + 2 * limit - 1))
            if not keys:
                return found
            start += len(keys)
            rows = self._rows([key.decode() for key in keys], ("created_at", "expires_at", "near_fp"))
            for key, (created_at, expires_at, fingerprints) in rows:
                if created_at is not None and fingerprints is not None and \
                        not self.is_expired(float(created_at), None, _number(expires_at)):
                    found.append((key, fingerprints))
                    if len(found) == limit:
                        break
        return found

    def partition_secret(self) -> bytes:
        """Created once for every instance: SET NX, then whoever lost the race reads the winner's."""
        name = self.key("secret")

        def load() -> bytes:
            value = self.client.get(name)
            if value is None:
                self.client.set(name, secrets.token_bytes(32).hex(), nx=True)
                value = self.client.get(name)
            return value

        value = self.run("read", load)
        if not value or len(value) < 16:
            raise StoreError("the cache key secret in Redis is missing or shorter than 16 bytes")
        return value

    # -- the operator's calls ------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        with self._lock:
            self._pending_hits.pop(key, None)
        return bool(self.run("write", lambda: self._delete(args=[self.prefix, key])))

    def clear(self) -> int:
        """Remove every entry and its index entries; counters of requests and savings stay, and
        nothing outside the prefix (nor the partition secret) is touched."""
        with self._lock:
            self._pending_hits.clear()
        removed = 0
        meta = self.key("meta")
        while True:
            cursor, batch = 0, 0
            while True:
                cursor, fields = self.run("read", lambda c=cursor: self.client.hscan(meta, c, count=MAINTENANCE_BATCH))
                keys = [name.decode() for name in fields]
                if keys:
                    removed += self.run("write", lambda k=keys: self._delete(args=[self.prefix, *k]))
                    batch += len(keys)
                if cursor == 0:
                    break
            if not batch:
                break
        # Hashes no bookkeeping knows (a write cut off midway cannot leave one, but be sure).
        for name in self.run("read", lambda: list(self.client.scan_iter(self.key("e:*"), count=1000))):
            removed += self.run("write", lambda n=name: self.client.delete(n))
        return removed

    def stats(self) -> dict:
        self.flush(wait_seconds=STATS_FLUSH_WAIT_SECONDS)

        def read() -> tuple:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self.key("counters"))
            pipe.zrevrange(self.key("i:updated"), 0, 0, withscores=True)
            pipe.smembers(self.key("models"))
            pipe.smembers(self.key("apis"))
            pipe.info("memory")
            counters, last, models, apis, memory = pipe.execute()
            model_names = sorted(name.decode() for name in models)
            api_names = sorted(name.decode() for name in apis)
            pipe = self.client.pipeline(transaction=False)
            for name in model_names:
                pipe.hgetall(self.key("model:", name))
            for name in api_names:
                pipe.hgetall(self.key("api:", name))
            rows = pipe.execute()
            return (counters, last, memory, dict(zip(model_names, rows)),
                    dict(zip(api_names, rows[len(model_names):])))

        counters, last, memory, by_model, by_api = self.run("read", read)
        figures = {name.decode(): float(value) for name, value in counters.items()}
        return {
            **stats_totals(figures, last_updated_at=last[0][1] if last else None, db_path=self.path,
                           ttl_seconds=self.ttl_seconds, db_bytes=int(memory.get("used_memory", 0))),
            "by_model": {name: _figures(row) for name, row in by_model.items()},
            "by_api": {name: _figures(row, per_api=True) for name, row in by_api.items()},
        }

    def db_file_bytes(self) -> int:
        """Memory Redis uses in all (Redis's INFO used_memory; other data in it counts too)."""
        return int(self.run("read", lambda: self.client.info("memory")).get("used_memory", 0))

    def activity(self, since: float) -> dict:
        self.flush()
        now = self.clock()
        first = int(max(since, now - TIMELINE_KEEP_SECONDS) // TIMELINE_BUCKET_SECONDS) * TIMELINE_BUCKET_SECONDS
        buckets = list(range(first, int(now) + TIMELINE_BUCKET_SECONDS, TIMELINE_BUCKET_SECONDS))

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            for bucket in buckets:
                pipe.hgetall(self.key("tl:", str(bucket)))
            pipe.lrange(self.key("recent"), 0, 49)
            return pipe.execute()

        *counts, recent = self.run("read", read)
        timeline = []
        for bucket, row in zip(buckets, counts):
            if row:
                figures = dict.fromkeys(REQUEST_STATUSES, 0)
                figures.update({status.decode(): int(value) for status, value in row.items()})
                timeline.append({"at": bucket, **figures})
        requests = []
        for raw in recent:
            at, route, status, model, key, seconds, coalesced = json.loads(raw)
            requests.append({"at": at, "route": route, "status": status, "model": model, "key": key,
                             "seconds": round(seconds, 6), "coalesced": bool(coalesced)})
        return {"bucket_seconds": TIMELINE_BUCKET_SECONDS, "timeline": timeline, "recent": requests}

    def _rows(self, keys: list[str], fields: tuple[str, ...]) -> list[tuple[str, list]]:
        """(key, values of fields) for each key whose hash still exists, in order; one round trip."""
        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self.prefix + "e:" + key, fields)
            return pipe.execute()

        rows = self.run("read", read) if keys else []
        return [(key, row) for key, row in zip(keys, rows) if row[0] is not None]

    def _summary(self, key: str, row: list) -> dict:
        mode, model, namespace, created_at, updated_at, last_hit_at, hits, size, expires_at = row[:9]
        created, own = float(created_at), _number(expires_at)
        return {
            "key": key, "mode": _text(mode), "model": _text(model), "namespace": _text(namespace) or None,
            "created_at": created, "updated_at": float(updated_at), "last_hit_at": _number(last_hit_at),
            "hits": _int(hits), "size": _int(size), "expires_at": self.expiry_time(created, own),
            "expired": self.is_expired(created, None, own),
        }

    def list_entries(self, *, limit: int = 50, after: tuple[float, str] | None = None,
                     model: str | None = None, namespace: Any = ...) -> list[dict]:
        self.flush()
        if model is not None:
            index = self.key("i:model:", model)
        elif namespace is not ...:
            index = self.key("i:ns:", namespace or "")
        else:
            index = self.key("i:updated")
        high = "+inf" if after is None else repr(after[0])
        page = max(int(limit), 50)
        items: list[dict] = []
        skip = 0
        while len(items) < limit:
            found = self.run("read", lambda: self.client.zrevrangebyscore(
                index, high, "-inf", start=skip, num=page, withscores=True))
            if not found:
                break
            skip += len(found)
            keys = [member.decode() for member, score in found
                    if after is None or score < after[0] or member.decode() < after[1]]
            for key, row in self._rows(keys, (*_SUMMARY_FIELDS, "request_json")):
                item = self._summary(key, row)
                if model is not None and item["model"] != model:
                    continue
                if namespace is not ... and item["namespace"] != namespace:
                    continue
                item["prompt"] = prompt_preview(_text(row[-1]) or "", limit=80)
                items.append(item)
        # Ties of updated_at come newest-key first, as SQLite's ORDER BY updated_at, key DESC.
        items.sort(key=lambda item: (item["updated_at"], item["key"]), reverse=True)
        return items[:limit]

    def entry(self, key: str) -> dict | None:
        self.flush()
        rows = self._rows([key], (*_SUMMARY_FIELDS, "request_json", "response_json"))
        if not rows:
            return None
        row = rows[0][1]
        item = self._summary(key, row)
        item["request_json"], item["response_json"] = _text(row[-2]), _text(row[-1])
        return item

    def top_entries(self, limit: int = 10) -> list[TopEntry]:
        self.flush()
        keys = self.run("read", lambda: self.client.zrevrange(self.key("i:hits"), 0, limit - 1))
        return [TopEntry(key, _text(model), _text(request), _int(hits), float(created), _number(last),
                         _int(size), _int(prompt), _int(completion), _number(cost) or 0.0,
                         _number(seconds) or 0.0)
                for key, (model, request, hits, created, last, size, prompt, completion, cost, seconds)
                in self._rows([key.decode() for key in keys], _TOP_FIELDS)]

    def entry_count(self) -> int:
        return _int(self.run("read", lambda: self.client.hget(self.key("counters"), "entries")))

    def export_rows(self, batch: int = MAINTENANCE_BATCH) -> Iterator[dict]:
        """Every entry, oldest store first, a page at a time; the near record when there is one."""
        self.flush()
        start = 0
        while True:
            keys = self.run("read", lambda: self.client.zrange(self.key("i:updated"), start, start + batch - 1))
            if not keys:
                return
            start += len(keys)
            for key, row in self._rows([key.decode() for key in keys], _EXPORT_FIELDS):
                mode, model, namespace, request, response, created, updated, expires, group, fingerprints = row
                record = {"key": key, "mode": _text(mode), "model": _text(model),
                          "namespace": _text(namespace) or None, "request_json": _text(request),
                          "response_json": _text(response), "created_at": float(created),
                          "updated_at": float(updated), "expires_at": _number(expires)}
                if group:
                    record["near_group"] = group.decode()
                    record["near_fingerprints"] = _b64(fingerprints or b"")
                yield record

    def insert_new(self, records: list[dict]) -> int:
        """Entries whose key is absent, with their own times; existing ones are left alone."""
        inserted = 0
        for record in records:
            near = None
            if record.get("near_group"):
                near = NearRecord(record["near_group"], base64.b64decode(record.get("near_fingerprints") or ""))
            outcome = self._write_entry(
                record["key"], self.clock(), record["expires_at"], record["mode"], record["model"],
                record["request_json"], record["response_json"], record["namespace"], near, (0, 0, 0.0, 0.0, False),
                only_if_absent=True, created_at=record["created_at"], updated_at=record["updated_at"])
            inserted += outcome != "present"
        return inserted

    # -- counters held in memory ---------------------------------------------------------------

    def flush(self, wait_seconds: float | None = None) -> None:
        """Write the hits and request counts held in memory, in one MULTI/EXEC.

        With ``wait_seconds`` it gives up sooner while another flush is writing (stats)."""
        if not self._flush_lock.acquire(timeout=-1 if wait_seconds is None else wait_seconds):
            return
        try:
            self._flush_pending()
        finally:
            self._flush_lock.release()

    def _flush_pending(self) -> None:
        with self._lock:
            if not self._pending_hits and not self._pending_requests:
                return
            if self.breaker.open_reason() is not None:
                return  # kept for when Redis is back
            batch, self._pending_hits = self._pending_hits, {}
            requests, self._pending_requests = self._pending_requests, RequestTally()
        try:
            self.run("write", lambda: self._write_counters(batch, requests))
        except StoreError as exc:
            log.warning("could not write %d hit counters, will retry: %s", len(batch), exc)
            with self._lock:
                requests.merge(self._pending_requests)
                self._pending_requests = requests
                for key, (count, last_at) in batch.items():
                    pending = self._pending_hits.setdefault(key, [0, last_at])
                    pending[0] += count
                    pending[1] = max(pending[1], last_at)

    def _write_counters(self, batch: dict[str, list[float]], requests: RequestTally) -> None:
        pipe = self.client.pipeline(transaction=True)
        if batch:
            args: list = [self.prefix]
            for key, (count, last_at) in batch.items():
                args += [key, int(count), repr(float(last_at))]
            self._hits(args=args, client=pipe)
        counters = self.key("counters")
        for status, name in (("MISS", "misses"), ("BYPASS", "bypasses")):
            count = sum(n for (_, kind), n in requests.by_model_status.items() if kind == status)
            if count:
                pipe.hincrby(counters, name, count)
        if requests.coalesced:
            pipe.hincrby(counters, "coalesced", sum(requests.coalesced.values()))
        if requests.near_hits:
            pipe.hincrby(counters, "near_hits", sum(requests.near_hits.values()))
        # A model or API is listed from its first counted request, as SQLite's rows are; its
        # hits (and what they saved) are added by the HITS script.
        for (model, status), count in requests.by_model_status.items():
            pipe.sadd(self.key("models"), model)
            if status in ("MISS", "BYPASS"):
                pipe.hincrby(self.key("model:", model), "misses" if status == "MISS" else "bypasses", count)
        for field, per_model in (("coalesced", requests.coalesced), ("near_hits", requests.near_hits)):
            for model, count in per_model.items():
                pipe.sadd(self.key("models"), model)
                pipe.hincrby(self.key("model:", model), field, count)
        for (api, status), count in requests.by_api_status.items():
            pipe.sadd(self.key("apis"), api)
            if status in ("MISS", "BYPASS"):
                pipe.hincrby(self.key("api:", api), "misses" if status == "MISS" else "bypasses", count)
        for api, count in requests.api_coalesced.items():
            pipe.hincrby(self.key("api:", api), "coalesced", count)
        for (bucket, status), count in requests.timeline.items():
            name = self.key("tl:", str(bucket))
            pipe.hincrby(name, status, count)
            pipe.expire(name, TIMELINE_KEEP_SECONDS)
        if requests.recent:
            pipe.lpush(self.key("recent"), *(json.dumps(list(item)) for item in requests.recent))
            pipe.ltrim(self.key("recent"), 0, RECENT_REQUESTS_KEPT - 1)
        pipe.execute()

    # -- maintenance ---------------------------------------------------------------------------

    def maintain(self, *, purge: bool = True, stop: threading.Event | None = None) -> MaintenanceReport:
        with self._maintenance_lock:
            purged = self.purge_expired(stop) if purge else 0
            evicted = self.evict(stop)
        return MaintenanceReport(purged, evicted, 0, False)

    def purge_expired(self, stop: threading.Event | None = None) -> int:
        """Remove expired entries and their bookkeeping (Redis may have dropped the hashes)."""
        total = 0
        while True:
            now = self.clock()
            stored_before = repr(float(now - self.ttl_seconds)) if self.ttl_seconds > 0 else ""
            removed = int(self.run("write", lambda: self._purge(args=[
                self.prefix, repr(float(now)), stored_before, MAINTENANCE_BATCH])))
            total += removed
            if removed < MAINTENANCE_BATCH or (stop is not None and stop.is_set()):
                return total

    def evict(self, stop: threading.Event | None = None) -> int:
        """Remove least-recently-used entries until both bounds hold (atomically in Redis, so
        instances evicting at once never take more than the excess)."""
        if not self.bounded:
            return 0
        self.flush()
        total = 0
        while True:
            with self._lock:
                hit_meanwhile = list(self._pending_hits)
            removed = int(self.run("write", lambda: self._evict(args=[
                self.prefix, self.max_entries, self.max_bytes, MAINTENANCE_BATCH, *hit_meanwhile])))
            total += removed
            if removed == 0 or (stop is not None and stop.is_set()):
                return total

    def vacuum(self) -> int:
        """Nothing to give back: Redis frees an entry's memory when it is removed."""
        return 0

    def close(self) -> None:
        self._stop.set()
        self._flusher_wake.set()
        self._maintainer_wake.set()
        try:
            self.flush()
        except StoreError as exc:  # pragma: no cover - logged, the process is exiting anyway
            log.warning("hit counters lost on close: %s", exc)
        with self._maintenance_lock:
            self._threads_pid = None
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()
        self.client.connection_pool.disconnect()


def _figures(row: dict, *, per_api: bool = False) -> dict:
    """A ``P model:<m>`` hash as SQLite's by_model figures, or (``per_api``) a ``P api:<mode>``
    hash as its by_api figures: no near hits there, hits on unpriced entries instead."""
    figures = {name.decode(): float(value) for name, value in row.items()}
    hits, misses = int(figures.get("hits", 0)), int(figures.get("misses", 0))
    counted = {"hits": hits, "misses": misses, "bypasses": int(figures.get("bypasses", 0)),
               "coalesced": int(figures.get("coalesced", 0))}
    if not per_api:
        counted["near_hits"] = int(figures.get("near_hits", 0))
    counted["hit_rate"] = hit_rate(hits, misses)
    counted.update(savings(figures.get("prompt_tokens_saved", 0), figures.get("completion_tokens_saved", 0),
                           figures.get("cost_saved_usd", 0), figures.get("time_saved_seconds", 0)))
    if per_api:
        counted["unpriced_hits"] = int(figures.get("unpriced_hits", 0))
    return counted


def _password_of(url: str) -> str | None:
    """The password in a Redis URL (to keep it out of every message), or None."""
    from urllib.parse import parse_qs, unquote, urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password or (parse_qs(parts.query).get("password") or [None])[0]
    except ValueError:
        return None
    return unquote(password) if password else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
