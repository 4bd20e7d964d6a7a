"""The cache flow for one completion request: decide, look up, coalesce, forward, store, answer.

``CompletionProxy`` turns a Flask request into a Flask response. What may be cached is decided by
``cache_policy.decide``; how an API's requests and answers look lives in its module in ``apis/``
(the proxy calls ``apis.base.Api`` and names no API); the store and the upstream client are
passed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Hashable, Iterable, Iterator

from flask import Request, Response

from apis import API_LIST, Api
from cache_policy import Decision, canonical_json, decide, forwarded_json, hash_canonical
from cache_policy import parse_request_controls, strip_proxy_controls, switch_value
from cache_store import CacheStore, CachedEntry, NewEntry, StoreError
from coalesce import SingleFlight
from config import Settings
from errors import PayloadTooLarge, UpstreamFailed
from guard import body_too_large_message
from images import with_image_references
from key_partition import ClientPartitions, KeySecretError
from metrics import RequestObserver
from apis.base import environ_key
from near_match import NearMatcher
from recent_items import RecentItems
from streaming import SseCapture
from upstream import UpstreamClient, UpstreamStream, UpstreamTarget, relayable_headers
from wire import parse_request_json

log = logging.getLogger("computer_use_cache.proxy")

HEADER_PREFIXES = ("X-Computer-Use-Cache", "X-Code-Model-Cache")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON_CONTENT_TYPE = "application/json"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
# Request headers that change what the cache may do (as WSGI environ keys, looked up directly);
# their requests skip the known-bytes path.
_CONTROL_HEADER_KEYS = ("HTTP_X_CACHE_BYPASS", "HTTP_CACHE_CONTROL", "HTTP_X_CACHE_TTL",
                        "HTTP_X_CACHE_NAMESPACE", "HTTP_X_CACHE_MATCH")
MATCH_HEADER = "X-Computer-Use-Cache-Match"
_FINGERPRINT_ENVIRON = "computer_use_cache.fingerprint"
_UNSAFE_HEADER_CHARS = re.compile(r"[^\x20-\x7e]")


def header_safe(text: str, limit: int = 512) -> str:
    """Header values carry client text (model names): printable ASCII only, never CR/LF."""
    return _UNSAFE_HEADER_CHARS.sub("?", text)[:limit]


def cache_headers(status: str, key: str | None = None, store: str | None = None,
                  reason: str | None = None, coalesced: bool = False, match: str = "exact") -> dict[str, str]:
    """The decision headers, under the product's prefix and the original's legacy prefix; a hit
    also says how it matched (exact, or near)."""
    headers = {}
    for prefix in HEADER_PREFIXES:
        headers[prefix] = status
        if key:
            headers[f"{prefix}-Key"] = key
        if store:
            headers[f"{prefix}-Store"] = header_safe(store)
        if reason:
            headers[f"{prefix}-Bypass-Reason"] = header_safe(reason)
    if coalesced:
        headers["X-Computer-Use-Cache-Coalesced"] = "true"
    if status == "HIT":
        headers[MATCH_HEADER] = match
    return headers


def parse_json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object (wire.parse_request_json says what counts); 413 past the limit."""
    data = request.get_data()
    limit = request.max_content_length
    if limit is not None and len(data) >= limit:  # the app's cap is MAX_REQUEST_BYTES + 1
        raise PayloadTooLarge(body_too_large_message(limit - 1))
    return parse_request_json(data)


@dataclass
class Outcome:
    """What became of one request in the cache, for its headers and its metadata object."""

    status: str
    key: str | None
    store: str | None = None
    reason: str | None = None
    coalesced: bool = False
    match: str = "exact"

    def headers(self) -> dict[str, str]:
        return cache_headers(self.status, self.key, self.store, self.reason, self.coalesced, self.match)

    def metadata(self) -> dict[str, Any]:
        return {"cache_hit": self.status == "HIT", "cache_key": self.key,
                "store_status": self.store, "bypass_reason": self.reason}


def _parse_stored(entry: CachedEntry) -> Any:
    try:
        return json.loads(entry.response_json)
    except ValueError:
        log.warning("unreadable cache entry %s treated as a miss", entry.key[:12])
        return None


@dataclass(frozen=True)
class StoredReply:
    """A cache hit ready to send, the same bytes and headers whichever way it leaves: as a Flask
    response, or straight from the known-hit lane (fast_lane.py)."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    model: str
    stream: bool = False

    def response(self) -> Response:
        if self.stream:
            # Still a chunked event stream, as a live one would be.
            return Response(iter((self.body,)), content_type=self.content_type, headers=self.headers)
        return Response(self.body, content_type=self.content_type, headers=self.headers)


@dataclass(frozen=True)
class KnownRequest:
    """What a cacheable request's exact bytes were found to mean: enough to answer a hit
    without parsing, validating and canonicalising the body again. Agents resend the same
    bytes (a replayed run); a changed byte is a different request and takes the full path."""

    key: str
    stream: bool
    variant: Hashable


@dataclass(frozen=True)
class ApiSetup:
    """What the settings make of one API, worked out once: where its misses go, whether client
    keys partition its cache, and the request headers (as environ keys) its decision depends on."""

    target: UpstreamTarget
    partitioned: bool
    fingerprint_keys: tuple[str, ...]


class CompletionProxy:
    def __init__(self, settings: Settings, store: CacheStore, upstream: UpstreamClient,
                 coalescer: SingleFlight | None, apis: Iterable[Api] = API_LIST):
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.coalescer = coalescer
        self.observer = RequestObserver()  # create_app puts its metrics.Monitor here
        self.partitions = ClientPartitions(settings, store.partition_secret)
        self.near = NearMatcher(settings, store)
        self.setups = {api.mode: self._setup(api) for api in apis}
        # Rendered replays, keyed by entry version, so a re-stored entry is never served
        # stale; a deleted entry is never reached because the store lookup comes first.
        self._replays = RecentItems(256)
        # (mode, sha256 of the body bytes) -> KnownRequest, for cacheable requests only.
        self._known = RecentItems(4096)

    def _setup(self, api: Api) -> ApiSetup:
        target = api.upstream_target(self.settings)
        partitioned = not target.api_key and not self.settings.cache_share_across_keys
        headers = api.key_headers + (api.client_key_headers if partitioned else ())
        # The query string goes upstream and into the key (``_with_query``): the fast lane's too.
        fingerprint_keys = tuple(environ_key(name) for name in headers) + ("QUERY_STRING",)
        return ApiSetup(target, partitioned, fingerprint_keys)

    # -- entry point ----------------------------------------------------------------------------

    def handle(self, api: Api, request: Request) -> Response:
        fingerprint = self.fingerprint(api, request.get_data(), request.environ)
        hit = self.known_hit(api, fingerprint)
        if hit is not None:
            self.observer.request_model(hit.model)
            return hit.response()
        body = parse_json_body(request)
        self.observer.request_body(body)
        api.validate(body)
        decision = self._decide(api, body, request)
        stream = api.wants_stream(body)
        variant = api.replay_variant(body)
        if decision.read:
            if fingerprint is not None:
                self._known.put(fingerprint, KnownRequest(decision.key, stream, variant))
            entry = self._lookup(decision.key, decision.max_age)
            if entry is not None:
                hit = self._answer_hit(api, entry, Outcome("HIT", decision.key), stream, variant)
                if hit is not None:
                    return hit.response()
            decision = self._unless_unavailable(decision)
            if decision.read and decision.near is not None:
                hit = self._near_hit(api, decision, stream, variant)
                if hit is not None:
                    return hit.response()
        flight = None
        if decision.write and self.coalescer is not None:
            flight = self._begin_flight(decision.key)
        if flight is not None:
            # A leader looks once more: a flight that ended between the lookup above and begin()
            # has just stored the answer. A follower looks after the leader is done. A forced
            # refresh (no-cache) never takes a stored answer.
            if not flight.leader:
                flight.wait()
                flight = None
            entry = self._lookup(decision.key, decision.max_age) if decision.read else None
            if entry is not None:
                outcome = Outcome("HIT", decision.key, coalesced=flight is None)
                hit = self._answer_hit(api, entry, outcome, stream, variant)
                if hit is not None:
                    if flight is not None:
                        flight.release()
                    return hit.response()
        try:
            if stream:
                response = self._forward_stream(api, body, request, decision, flight)
                if flight is not None:
                    # The stream releases it once stored; this covers answers that never
                    # became a stream (an upstream error) and clients that leave early.
                    response.call_on_close(flight.release)
                flight = None
                return response
            return self._forward(api, body, request, decision)
        finally:
            if flight is not None:
                flight.release()

    def retrieve(self, api: Api, item_id: str, request: Request) -> Response:
        """GET of a stored answer by its id (``Api.retrieval_routes``): from the store within the
        caller's partition and namespace, else (or when the caller wants it fresh) the upstream's."""
        controls = parse_request_controls(request.headers)
        partition, unavailable = self._partition(api, request.headers)
        wants_fresh = controls.no_cache or switch_value(request.headers.get("X-Cache-Bypass", "0"))
        key, _ = retrieval_key(api, item_id, partition, controls.namespace)
        if not (unavailable or wants_fresh or request.query_string):
            entry = self._lookup(key, controls.max_age)
            if entry is not None:
                hit = self._answer_hit(api, entry, Outcome("HIT", key), False, None)
                if hit is not None:
                    self.observer.request_model(hit.model)
                    return hit.response()
        return self.forward_uncached(api, api.retrieval_path(item_id), request, reason="not a stored answer")

    def forward_uncached(self, api: Api, upstream_path: str, request: Request,
                         reason: str = "this route is not cached") -> Response:
        """A request of the API that is never cached, passed to its upstream as sent (its query
        string too: Claude Code counts tokens with ``?beta=true``; HEAD as HEAD). A body, when
        there is one, passes the same edge check as a cached route's (wire.parse_request_json:
        UTF-8, depth, no NaN, no lone surrogate) before anything goes upstream; an empty one
        (``cancel``) goes as it is. A non-2xx answer is relayed as the upstream's error."""
        body = request.get_data()
        if body:
            parse_json_body(request)  # refused here in the API's shape; the client's bytes go on
        reply = self.upstream.request(request.method, _with_query_string(upstream_path, request), request.headers,
                                      body, self.setups[api.mode].target)
        if not 200 <= reply.status < 300:
            reason = "upstream returned an error"
        outcome = Outcome("BYPASS", None, reason=reason)
        return self._relay(reply.body, reply.status, relayable_headers(reply.headers), outcome)

    def fingerprint(self, api: Api, body: bytes,
                    environ: dict[str, Any]) -> tuple[str, bytes] | None:
        """What identifies a request's decision without parsing it: the mode, the exact body
        bytes, the API's key headers and (when its cache is partitioned by client key) the
        client's key headers.

        None for requests that carry per-request cache headers: they take the full path.
        Worked out once per request: the known-hit lane and the Flask path share it (environ).
        """
        if _FINGERPRINT_ENVIRON in environ:
            return environ[_FINGERPRINT_ENVIRON]
        fingerprint = None
        if not any(name in environ for name in _CONTROL_HEADER_KEYS):
            digest = hashlib.sha256(body)
            for name in self.setups[api.mode].fingerprint_keys:
                digest.update(b"\0" + environ.get(name, "").encode("utf-8", "surrogateescape"))
            fingerprint = api.mode, digest.digest()
        environ[_FINGERPRINT_ENVIRON] = fingerprint
        return fingerprint

    def known_hit(self, api: Api, fingerprint: tuple[str, bytes] | None) -> StoredReply | None:
        """The stored answer for request bytes seen before, found without parsing them again;
        None when they are new (or their entry is gone): the full path then decides."""
        known = self._known.get(fingerprint) if fingerprint is not None else None
        if known is None:
            return None
        entry = self._lookup(known.key)
        if entry is None:
            return None
        return self._answer_hit(api, entry, Outcome("HIT", known.key), known.stream, known.variant)

    def _partition(self, api: Api, headers) -> tuple[str | None, str | None]:
        """(this client's partition of the API's cache, or None; why the cache is unusable, or None)."""
        if not self.setups[api.mode].partitioned:
            return None, None
        try:
            return self.partitions.partition_for(api.client_key(headers)), None
        except KeySecretError as exc:
            return None, str(exc)

    def _decide(self, api: Api, body: dict, request: Request) -> Decision:
        """``decide`` for this client's partition of the cache; a BYPASS, with the reason, while
        the database or the partition secret cannot be used, or when the API says so."""
        partition, unavailable = self._partition(api, request.headers)
        decision = decide(
            self.settings, api.mode, body,
            bypass_header=switch_value(request.headers.get("X-Cache-Bypass", "0")),
            partition=partition,
            controls=parse_request_controls(request.headers),
            images=api.inline_images(body),
            key_extra=_with_query(api.key_extra(body, request.headers), request),
        )
        if decision.bypass:
            return decision
        api_reason = api.bypass_reason(body)
        if api_reason:
            return replace(decision, read=False, write=False, reason=api_reason)
        decision = self._unless_unavailable(decision, unavailable)
        if decision.match == "near" and not decision.bypass:
            decision = replace(decision, near=self.near.request(api, body, decision, partition))
        return decision

    def _unless_unavailable(self, decision: Decision, unavailable: str | None = None) -> Decision:
        """A BYPASS, with the reason, while the store (or the partition secret) cannot be used;
        asked again after a lookup, which may just have found the store gone (a Redis fault)."""
        unavailable = unavailable or self.store.unavailable_reason()
        if unavailable:
            return replace(decision, read=False, write=False, reason=f"cache unavailable: {unavailable}")
        return decision

    def _begin_flight(self, key: str):
        """Join the flight for key; without one (the lock file is unusable) just go upstream."""
        try:
            return self.coalescer.begin(key)
        except OSError as exc:
            log.warning("request coalescing unavailable, going upstream alone: %s", exc)
            return None

    # -- hits -----------------------------------------------------------------------------------

    def _lookup(self, key: str, max_age: int | None = None) -> CachedEntry | None:
        try:
            return self.store.get(key, max_age=max_age)
        except StoreError as exc:
            # Once the store says it is unavailable it has logged why: not again per request.
            (log.debug if self.store.unavailable_reason() else log.warning)(
                "cache lookup failed, answering without the cache: %s", exc)
            return None

    def _near_hit(self, api: Api, decision: Decision, stream: bool,
                  variant: Hashable) -> StoredReply | None:
        """The closest stored answer near matching finds for a request that missed exactly,
        headed with that entry's key and ``...-Match: near``; None when there is none."""
        try:
            entry = self.near.find(decision.near, decision.max_age)
        except StoreError as exc:
            log.warning("near lookup failed, going on without it: %s", exc)
            return None
        if entry is None:
            return None
        return self._answer_hit(api, entry, Outcome("HIT", entry.key, match="near"), stream, variant)

    def _answer_hit(self, api: Api, entry: CachedEntry, outcome: Outcome,
                    stream: bool, variant: Hashable) -> StoredReply | None:
        """The stored answer, as JSON or replayed as a stream; None if the row is unreadable."""
        if stream:
            events = self._replayed(api, entry, variant)
            if events is None:
                return None
            self.store.record_hit(entry.key)
            # A stored answer is complete: its events go out in one write (still a chunked
            # event stream), not one syscall per event.
            return StoredReply(events, SSE_CONTENT_TYPE, {**SSE_HEADERS, **outcome.headers()},
                               entry.model, stream=True)
        if self.settings.include_cache_metadata:
            completion = _parse_stored(entry)
            if completion is None:
                return None
            body = with_metadata(completion, outcome)
        else:
            body = entry.response_json.encode("utf-8")
        self.store.record_hit(entry.key)
        return StoredReply(body, JSON_CONTENT_TYPE, outcome.headers(), entry.model)

    def _replayed(self, api: Api, entry: CachedEntry, variant: Hashable) -> bytes | None:
        """The SSE bytes of a stored answer, rendered once per entry version and kept a while."""
        version = (entry.key, entry.updated_at, api.mode, variant)
        events = self._replays.get(version)
        if events is None:
            completion = _parse_stored(entry)
            if not isinstance(completion, dict):
                return None
            events = b"".join(api.replay(completion, variant))
            self._replays.put(version, events)
        return events

    # -- misses ---------------------------------------------------------------------------------

    def _upstream_body(self, request: Request, body: dict, extra: dict | None = None) -> bytes:
        forwarded = strip_proxy_controls(body)
        if extra:
            forwarded = {**forwarded, **extra}
        elif forwarded == body:
            return request.get_data()  # unchanged: send the client's own bytes
        # json.dumps(forwarded, ensure_ascii=False), with the screenshot fast path (~4x at 400 KB)
        return forwarded_json(forwarded).encode("utf-8", "surrogatepass")

    def _forward(self, api: Api, body: dict, request: Request, decision: Decision) -> Response:
        reply = self.upstream.request("POST", _with_query_string(api.upstream_path, request),
                                      request.headers, self._upstream_body(request, body),
                                      self.setups[api.mode].target)
        outcome = self._initial_outcome(decision)
        passthrough = relayable_headers(reply.headers)
        if not 200 <= reply.status < 300:
            outcome = Outcome("BYPASS", decision.key, reason="upstream returned an error")
            return self._relay(reply.body, reply.status, passthrough, outcome)
        try:
            data = json.loads(reply.body)
        except ValueError:
            outcome = Outcome("BYPASS", decision.key, reason="upstream response was not JSON")
            return self._relay(reply.body, reply.status, passthrough, outcome)
        if decision.write:
            outcome.store = self._store(api, body, decision, data, reply.body.decode("utf-8", "replace").strip())
        if self.settings.include_cache_metadata and isinstance(data, dict):
            return self._relay(with_metadata(data, outcome), reply.status, passthrough, outcome)
        return self._relay(reply.body, reply.status, passthrough, outcome)

    @staticmethod
    def _initial_outcome(decision: Decision) -> Outcome:
        if decision.reason:
            return Outcome("BYPASS", decision.key, reason=decision.reason)
        return Outcome("MISS", decision.key)

    @staticmethod
    def _relay(data: bytes, status: int, passthrough: dict, outcome: Outcome) -> Response:
        response = Response(data, status=status, headers={**passthrough, **outcome.headers()})
        return response

    def _store(self, api: Api, body: dict, decision: Decision, data: Any, text: str) -> str:
        """Store one complete answer; returns the store outcome for the headers."""
        reason = api.uncacheable_reason(data)
        if reason:
            return f"skipped: {reason}"
        if len(text) > self.settings.cache_max_response_chars:
            return "skipped: response is too large for cache"
        # Screenshots are stored as references (digest, media type, size): the key has their pixels.
        canonical = with_image_references(decision.canonical, decision.images, decision.plain_strings)
        request_json = canonical[:-1] + f',"cache_key":"{decision.key}"}}'
        near = decision.near.record() if decision.near is not None else None
        model = str(body.get("model"))
        try:
            figures = self.observer.entry_figures(api.usage_figures(data), body.get("model"))
            outcome = self.store.put(NewEntry(decision.key, api.mode, model, _storable(request_json),
                                              _storable(text), **figures),
                                     ttl_seconds=decision.ttl_seconds, namespace=decision.namespace,
                                     near=near)
            for item_id in api.retrieval_ids(data):
                # The same answer under its id, in the same partition and namespace: a
                # retrieval saves no tokens, so it carries no figures.
                key, canonical = retrieval_key(api, item_id, decision.partition, decision.namespace)
                retrieval_json = canonical[:-1] + f',"cache_key":"{key}"}}'
                self.store.put(NewEntry(key, api.mode, model, _storable(retrieval_json), _storable(text)),
                               ttl_seconds=decision.ttl_seconds, namespace=decision.namespace)
            return outcome
        except StoreError as exc:
            log.warning("cache write failed: %s", exc)
            return f"skipped: cache write failed: {exc}"

    # -- streamed misses ------------------------------------------------------------------------

    def _forward_stream(self, api: Api, body: dict, request: Request, decision: Decision,
                        flight) -> Response:
        """A streamed miss: relayed event by event as it arrives, stored once it proved whole.

        Headers leave before the body, so they say MISS (with the key); the store outcome is
        logged. The upstream connection and the coalescing flight are released by ``_Cleanup``
        whoever ends first: the stream, an error here, or the client hanging up.
        """
        cleanup = _Cleanup(flight)
        handed_over = False
        try:
            # To store usage with the answer the proxy asks for it; a client that did not ask
            # never sees it (the capture takes it out again).
            usage_request = api.usage_request(body) if decision.write else None
            ask_usage = usage_request is not None
            upstream = self._open_stream(api, body, request, usage_request)
            cleanup.stream = upstream
            if ask_usage and upstream.status == 400:
                error = upstream.read_all()
                if (api.usage_option or "").encode() not in error:
                    return self._relay(error, upstream.status, relayable_headers(upstream.headers),
                                       Outcome("BYPASS", decision.key, reason="upstream returned an error"))
                # An upstream that rejects stream_options gets the client's own request instead.
                log.info("upstream rejected %s; asking again without it", api.usage_option)
                cleanup.close_stream()
                ask_usage = False
                upstream = self._open_stream(api, body, request, None)
                cleanup.stream = upstream
            passthrough = relayable_headers(upstream.headers)
            if not 200 <= upstream.status < 300:
                outcome = Outcome("BYPASS", decision.key, reason="upstream returned an error")
                return self._relay(upstream.read_all(), upstream.status, passthrough, outcome)
            if "text/event-stream" not in upstream.content_type:
                outcome = Outcome("BYPASS", decision.key, reason="upstream did not answer with a stream")
                return self._relay(upstream.read_all(), upstream.status, passthrough, outcome)
            passthrough = {k: v for k, v in passthrough.items() if k.lower() != "content-type"}
            events = self._relay_stream(api, body, decision, upstream, ask_usage, cleanup)
            response = Response(events, status=upstream.status, content_type=SSE_CONTENT_TYPE,
                                headers={**passthrough, **SSE_HEADERS,
                                         **self._initial_outcome(decision).headers()})
            # Runs even when the body is never iterated (the client left before the first byte).
            response.call_on_close(cleanup)
            handed_over = True
            return response
        finally:
            if not handed_over:
                cleanup()

    def _open_stream(self, api: Api, body: dict, request: Request, extra: dict | None) -> UpstreamStream:
        return self.upstream.open("POST", _with_query_string(api.upstream_path, request), request.headers,
                                  self._upstream_body(request, body, extra),
                                  self.setups[api.mode].target)

    def _relay_stream(self, api: Api, body: dict, decision: Decision,
                      upstream: UpstreamStream, drop_usage: bool, cleanup: "_Cleanup") -> Iterator[bytes]:
        """Each upstream piece goes to the client at once; the answer is stored when the terminal
        event ([DONE], message_stop...) arrives, before that event itself is sent, so a client
        that asks again right away gets a hit."""
        capture = api.capture(body, drop_usage)
        settled = False

        def settle() -> None:
            nonlocal settled
            if capture.done and not settled:
                settled = True
                if decision.write:
                    try:
                        self._store_stream(api, body, decision, capture)
                    except Exception:  # the client's stream must not die for the cache's sake
                        log.exception("stream %s not stored: storing failed", decision.key[:12])
                cleanup.release_flight()

        try:
            try:
                for piece in upstream.iter_bytes():
                    out = capture.feed(piece)
                    settle()
                    if out:
                        yield out
                out = capture.finish()
            except UpstreamFailed as exc:
                log.warning("upstream stream %s broke off: %s", decision.key[:12], exc.message)
                out = capture.fail(exc.message, code=exc.code or "upstream_stream_failed")
            except Exception:
                log.exception("relaying stream %s failed", decision.key[:12])
                out = capture.fail("The proxy failed while relaying the stream.", code="proxy_stream_failed")
            settle()
            if decision.write and not capture.done:
                log.info("stream %s not stored: it ended before its last event", decision.key[:12])
            if out:
                yield out
        except GeneratorExit:
            if not settled:
                log.info("client left stream %s early: upstream closed, nothing stored", decision.key[:12])
            raise
        finally:
            cleanup()

    def _store_stream(self, api: Api, body: dict, decision: Decision, capture: SseCapture) -> None:
        completion = capture.completion()
        if completion is None:
            log.info("stream %s not stored: incomplete or carried an error", decision.key[:12])
            return
        refusal = api.assembled_refusal(body, completion)
        if refusal:
            log.info("stream %s not stored: %s", decision.key[:12], refusal)
            return
        text = json.dumps(completion, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \u escape: keep it escaped
            text = json.dumps(completion)
        outcome = self._store(api, body, decision, completion, text)
        log.info("stream %s store: %s", decision.key[:12], outcome)


def retrieval_key(api: Api, item_id: str, partition: str | None,
                  namespace: str | None) -> tuple[str, str]:
    """(key, canonical text) of a stored answer's retrieval entry. Its mode ("<mode>.retrieve")
    is no request body's, so no request can reach it, nor it a request's entry."""
    canonical = canonical_json({"id": item_id, "mode": f"{api.mode}.retrieve"})
    return hash_canonical(canonical, partition, namespace), canonical


def with_metadata(completion: dict, outcome: Outcome) -> bytes:
    """The answer plus the code_model_cache object (INCLUDE_CACHE_METADATA), as UTF-8 JSON."""
    text = json.dumps({**completion, "code_model_cache": outcome.metadata()}, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")  # a lone surrogate leaves as its JSON escape


def _storable(json_text: str) -> str:
    """JSON text SQLite can hold: a lone surrogate ("\\ud800" in the client's JSON) cannot be
    encoded as UTF-8, so it is written back as the JSON escape it came from; the text still
    decodes to the same value. ASCII text (most of it, and every base64 screenshot) is
    returned as it is: a 400 KB round trip through UTF-8 costs more than the rest of the store."""
    if json_text.isascii():
        return json_text
    return json_text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Cleanup:
    """Closes the upstream stream and releases the flight exactly once, whoever gets there first."""

    def __init__(self, flight) -> None:
        self.flight = flight
        self.stream: UpstreamStream | None = None

    def release_flight(self) -> None:
        flight, self.flight = self.flight, None
        if flight is not None:
            flight.release()

    def close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()

    def __call__(self) -> None:
        self.close_stream()
        self.release_flight()


def _with_query_string(upstream_path: str, request: Request) -> str:
    """The upstream path with the client's query string, as sent (the anthropic SDK's beta
    client, and so Claude Code, posts to ``/v1/messages?beta=true``)."""
    if not request.query_string:
        return upstream_path
    return upstream_path + "?" + request.query_string.decode("latin-1")


def _with_query(key_extra: dict | None, request: Request) -> dict | None:
    """Key material with the query string, when one was sent: it goes upstream, so it may change
    the answer. Without one the key is what it always was (existing entries keep hitting)."""
    if not request.query_string:
        return key_extra
    return {**(key_extra or {}), "query_string": request.query_string.decode("latin-1")}
