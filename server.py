"""Computer-Use Cache: an OpenAI-compatible caching proxy (the app factory, its routes, and `python server.py`).

Production runs ``gunicorn -c gunicorn.conf.py 'server:create_app()'``; tests call
``create_app(settings)`` with their own settings.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import signal
import sys
import time
import traceback
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler

import guard
from apis import API_LIST, Api
from access_log import AccessLog
from cache_store import CacheStore, SQLiteStore, StoreError
from cli import cache_cli
from coalesce import Coalescer, SingleFlight
from config import Settings, SettingsError, load_settings
from dashboard import register_dashboard
from errors import ApiError, AuthenticationFailed, InvalidRequest, MethodNotAllowed, NotFound
from errors import PayloadTooLarge
from errors import ServiceUnavailable
from fast_lane import KnownHitLane
from metrics import Monitor
from proxy import MATCH_HEADER, CompletionProxy, cache_headers
from upstream import UpstreamClient, bearer_token, relayable_headers

log = logging.getLogger("computer_use_cache")

EXTENSION = "computer_use_cache"
STARTED = "computer_use_cache.started"  # the request's start time, kept in its WSGI environ
STATUS_HEADER, KEY_HEADER = "X-Computer-Use-Cache", "X-Computer-Use-Cache-Key"
COALESCED_HEADER = "X-Computer-Use-Cache-Coalesced"
API_ENDPOINTS = tuple(f"{api.mode}:" for api in API_LIST)  # endpoint names of the API routes
API_BY_ROUTE = {route: api for api in API_LIST for route in (*api.routes, *api.forwarded_routes)}
MODEL_ROUTES = ("/v1/models", "/models", "/api/v1/models")
ROOT_ENDPOINTS = ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/models",
                  "/cache/stats"]
CORS_ALLOW_HEADERS = ("Authorization, Content-Type, X-Cache-Bypass, X-Cache-Admin-Token, "
                      "Cache-Control, X-Cache-TTL, X-Cache-Namespace, X-Cache-Match, "
                      # What Anthropic's browser clients send.
                      "X-Api-Key, Anthropic-Version, Anthropic-Beta, Anthropic-Dangerous-Direct-Browser-Access")
CORS_EXPOSE_HEADERS = ", ".join(
    f"{prefix}{suffix}"
    for prefix in ("X-Computer-Use-Cache", "X-Code-Model-Cache")
    for suffix in ("", "-Key", "-Store", "-Bypass-Reason")
) + f", X-Computer-Use-Cache-Coalesced, {MATCH_HEADER}"


def store_from_settings(settings: Settings, **options: Any) -> CacheStore:
    """The store the settings describe: Redis when CACHE_URL is set, else SQLite at CACHE_DB_PATH.
    Tests add a clock or fault hooks through ``options``. Nothing is opened here."""
    if settings.cache_url:
        from stores.redis import RedisStore

        return RedisStore(settings.cache_url, settings.cache_ttl_seconds,
                          prefix=settings.cache_redis_prefix,
                          hit_flush_seconds=settings.hit_flush_seconds,
                          max_entries=settings.cache_max_entries,
                          max_bytes=settings.cache_max_bytes,
                          maintenance_seconds=settings.cache_purge_interval_seconds, **options)
    return SQLiteStore(settings.cache_db_path, settings.cache_ttl_seconds,
                       hit_flush_seconds=settings.hit_flush_seconds,
                       max_entries=settings.cache_max_entries,
                       max_bytes=settings.cache_max_bytes,
                       maintenance_seconds=settings.cache_purge_interval_seconds, **options)


def coalescer_for(settings: Settings, store: CacheStore) -> SingleFlight | None:
    """Where concurrent identical misses meet: a lease in Redis (every instance on it), else a
    lock file beside the SQLite database (the workers of one machine); None with CACHE_COALESCE=0."""
    if not settings.cache_coalesce:
        return None
    timeout = settings.upstream_timeout_seconds + 5
    if not isinstance(store, SQLiteStore):
        from stores.redis_coalesce import RedisCoalescer

        return RedisCoalescer(store, timeout_seconds=timeout)
    return Coalescer(settings.cache_db_path + ".coalesce.lock", timeout_seconds=timeout)


def create_app(settings: Settings | None = None, *, store: CacheStore | None = None) -> Flask:
    """Build the app and everything it uses; nothing is opened until the first request."""
    settings = load_settings() if settings is None else settings
    store = store or store_from_settings(settings)
    coalescer = coalescer_for(settings, store)
    monitor = Monitor(settings, store)
    upstream = monitor.wrap_upstream(UpstreamClient(settings))
    proxy = CompletionProxy(settings, store, upstream, coalescer)
    proxy.observer = monitor

    app = Flask(__name__)
    app.json.sort_keys = False
    # Werkzeug caps the read of a body that declares no length (chunked) here; it stops silently
    # AT the cap, so the cap is one byte past the limit and parse_json_body refuses a longer read.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1
    app.extensions[EXTENSION] = proxy

    for api in API_LIST:
        view = api_view(proxy, api)
        for route in api.routes:
            app.add_url_rule(route, f"{api.mode}:{route}", view, methods=["POST"])
        for route in api.retrieval_routes:
            app.add_url_rule(route, f"retrieve:{route}", retrieve_view(proxy, api), methods=["GET"])
            # The rest of an item's routes (DELETE, cancel, input_items) go upstream uncached.
            app.add_url_rule(route, f"item:{route}", item_view(proxy, api), methods=["DELETE"])
            app.add_url_rule(route + "/<path:action>", f"item:{route}/", item_view(proxy, api),
                             methods=["GET", "POST"])
        for route, upstream_path in api.forwarded_routes.items():
            app.add_url_rule(route, f"forward:{route}", forward_view(proxy, api, upstream_path),
                             methods=["POST"])

    def models() -> Response:
        reply = upstream.request("GET", "/models", request.headers)
        headers = {**relayable_headers(reply.headers),
                   **cache_headers("BYPASS", reason="model lists are not cached")}
        return Response(reply.body, status=reply.status, headers=headers)

    for route in MODEL_ROUTES:
        app.add_url_rule(route, f"models:{route}", models, methods=["GET"])

    def stats() -> dict[str, Any]:
        try:
            return store.stats()
        except StoreError as exc:
            raise ServiceUnavailable(f"The cache database is unavailable: {exc}") from exc

    @app.get("/")
    def root():
        return jsonify(name="computer-use-cache", status="ok",
                       upstream_base_url=settings.upstream_base_url, endpoints=ROOT_ENDPOINTS)

    @app.get("/healthz")
    def healthz():
        try:
            cache = store.stats()
        except StoreError as exc:
            body = {"ok": False, "cache": {"available": False, "error": str(exc)},
                    "upstream_base_url": settings.upstream_base_url}
            return jsonify(body), 503
        return jsonify(ok=True, cache=cache, upstream_base_url=settings.upstream_base_url)

    @app.get("/cache/stats")
    def cache_stats():
        return jsonify(stats())

    @app.post("/cache/clear")
    def cache_clear():
        require_admin(settings)
        try:
            deleted = store.clear()
        except StoreError as exc:
            raise ServiceUnavailable(f"The cache database is unavailable: {exc}") from exc
        return jsonify(ok=True, deleted=deleted)

    register_entry_routes(app, settings, store)
    app.cli.add_command(cache_cli)
    access_log = AccessLog()
    register_http_behaviour(app, settings, monitor, upstream, access_log)
    # Repeats of known request bytes are answered before Flask builds a request (fast_lane.py).
    app.wsgi_app = KnownHitLane(app.wsgi_app, proxy, settings, monitor, access_log,
                                cors_headers(settings))
    # Stats, metrics and dashboard (issue 6): serves /metrics, /dashboard and /cache/activity;
    # /metrics and /cache/activity need CACHE_ADMIN_TOKEN when one is set (the /dashboard page
    # itself holds no data).
    monitor.register(app, lambda: require_admin(settings))
    register_dashboard(app, store, lambda: require_admin(settings))
    return app


def api_view(proxy: CompletionProxy, api: Api):
    """The view of one API's routes: the proxy's cache flow for that API."""
    return lambda: proxy.handle(api, request)


def retrieve_view(proxy: CompletionProxy, api: Api):
    """The view of an API's retrieval routes: a stored answer by its id, else the upstream's."""
    return lambda item_id: proxy.retrieve(api, item_id, request)


def item_view(proxy: CompletionProxy, api: Api):
    """The view of an item's other routes (``DELETE <id>``, ``<id>/cancel``, ...): forwarded."""
    def view(item_id: str, action: str = "") -> Response:
        path = api.retrieval_path(item_id) + (f"/{action}" if action else "")
        return proxy.forward_uncached(api, path, request)
    return view


def forward_view(proxy: CompletionProxy, api: Api, upstream_path: str):
    """The view of a route an API forwards without caching (Anthropic's token counting)."""
    return lambda: proxy.forward_uncached(api, upstream_path, request)


# -- /cache/entries: browse, inspect and delete single entries (admin) ---------------------------

ENTRIES_DEFAULT_LIMIT = 50
ENTRIES_MAX_LIMIT = 500


def _encode_cursor(item: dict) -> str:
    raw = json.dumps([item["updated_at"], item["key"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        updated_at, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(key, str) or isinstance(updated_at, bool):
            raise ValueError
        return float(updated_at), key
    except (ValueError, TypeError, binascii.Error):
        raise InvalidRequest("cursor is not valid; use next_cursor from a previous page.",
                             param="cursor") from None


def register_entry_routes(app: Flask, settings: Settings, store: CacheStore) -> None:
    """GET /cache/entries (paged), GET and DELETE /cache/entries/<key>."""

    def unavailable(exc: StoreError) -> ServiceUnavailable:
        return ServiceUnavailable(f"The cache database is unavailable: {exc}")

    @app.get("/cache/entries")
    def cache_entries():
        require_admin(settings)
        limit_text = request.args.get("limit", str(ENTRIES_DEFAULT_LIMIT))
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= ENTRIES_MAX_LIMIT:
            raise InvalidRequest(f"limit must be a whole number from 1 to {ENTRIES_MAX_LIMIT}.",
                                 param="limit")
        limit = int(limit_text)
        cursor = request.args.get("cursor")
        after = _decode_cursor(cursor) if cursor else None
        namespace: Any = ...
        if "namespace" in request.args:
            namespace = request.args["namespace"] or None  # empty: the default namespace
        try:
            items = store.list_entries(limit=limit + 1, after=after, model=request.args.get("model"),
                                       namespace=namespace)
        except StoreError as exc:
            raise unavailable(exc) from exc
        has_more = len(items) > limit
        items = items[:limit]
        next_cursor = _encode_cursor(items[-1]) if has_more else None
        return jsonify(object="list", data=items, has_more=has_more, next_cursor=next_cursor)

    @app.get("/cache/entries/<key>")
    def cache_entry(key: str):
        require_admin(settings)
        try:
            entry = store.entry(key)
        except StoreError as exc:
            raise unavailable(exc) from exc
        if entry is None:
            raise NotFound(f"No cache entry with key {key!r}.", param="key")
        request_text, response_text = entry.pop("request_json"), entry.pop("response_json")
        entry["request"] = _parse_stored(request_text)
        entry["response"] = _parse_stored(response_text)
        return jsonify(entry)

    @app.delete("/cache/entries/<key>")
    def cache_entry_delete(key: str):
        require_admin(settings)
        try:
            deleted = store.delete(key)
        except StoreError as exc:
            raise unavailable(exc) from exc
        if not deleted:
            raise NotFound(f"No cache entry with key {key!r}.", param="key")
        return jsonify(id=key, object="cache.entry", deleted=True)


def _parse_stored(text: str) -> Any:
    """Stored JSON as an object; an unreadable row is shown as its text, never a 500."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def require_admin(settings: Settings) -> None:
    """Admin routes need CACHE_ADMIN_TOKEN, when one is set, as a header or a bearer token."""
    expected = settings.cache_admin_token
    if not expected:
        return
    offered = request.headers.get("X-Cache-Admin-Token") or bearer_token(
        request.headers.get("Authorization")) or ""
    if not hmac.compare_digest(offered.encode(), expected.encode()):
        raise AuthenticationFailed("Invalid cache admin token.")


def error_json(error: ApiError) -> bytes:
    """The error in the shape of the API whose route was asked for (OpenAI's elsewhere)."""
    api = API_BY_ROUTE.get(request.path)
    return error.json_bytes() if api is None else json.dumps(api.error_body(error)).encode()


def error_response(error: ApiError) -> Response:
    response = Response(error_json(error), status=error.status, mimetype="application/json",
                        headers=error.headers)
    if request.path in API_BY_ROUTE:
        response.headers.update(cache_headers("BYPASS", reason=error.message))
    return response


def cors_headers(settings: Settings) -> list[tuple[str, str]]:
    """Sent on every response. Built once and appended in one call (no response sets these
    itself: upstream CORS headers are never relayed), cheaper than four lookups-and-replaces."""
    return [
        ("Access-Control-Allow-Origin", settings.cors_allow_origin),
        ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
        ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
        ("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS),
    ]


def register_http_behaviour(app: Flask, settings: Settings, monitor: Monitor,
                            upstream: UpstreamClient, access_log: AccessLog) -> None:
    """Every request's hooks, CORS, preflights, and OpenAI error objects for every failure.

    One ``before_request`` and one ``after_request`` hook do everything that surrounds a view:
    Flask's per-hook dispatch costs as much as the work itself on a cache hit.
    """
    cors = cors_headers(settings)

    @app.before_request
    def begin() -> Response | None:
        """Start the clock, answer preflights, and refuse before the body is read: wrong client
        key, bad headers, too big, not JSON."""
        environ = request.environ
        environ[STARTED] = time.perf_counter()
        upstream.reset_last_status()
        if environ["REQUEST_METHOD"] == "OPTIONS":
            return Response(status=204)
        api_path = guard.is_api_path(request.path)
        guard.check_request(environ, settings.proxy_api_keys, settings.max_request_bytes,
                            api_path=api_path,
                            json_route=(api_path and environ["REQUEST_METHOD"] == "POST"
                                        and request.routing_exception is None))
        return None

    @app.after_request
    def finish(response: Response) -> Response:
        """CORS headers, then count completion requests and log every request once (a stream
        when it closes, so its latency is its whole length)."""
        response.headers.extend(cors)
        started = request.environ.get(STARTED)
        rule = request.url_rule
        route = rule.rule if rule is not None else None
        headers = response.headers
        cache = headers.get(STATUS_HEADER)
        key = headers.get(KEY_HEADER)
        if started is None:  # the request failed before the hook ran
            started = time.perf_counter()
        elif cache is not None and rule is not None and rule.endpoint.startswith(API_ENDPOINTS):
            monitor.count_response(route, cache, key, COALESCED_HEADER in headers,
                                   time.perf_counter() - started, monitor.current_model(),
                                   rule.endpoint.split(":", 1)[0],
                                   near=headers.get(MATCH_HEADER) == "near")
        method, status = request.method, response.status_code

        def write_line() -> None:
            access_log.write(method, route, status, cache, key, upstream.last_status(),
                             time.perf_counter() - started)

        if response.is_streamed:
            response.call_on_close(write_line)
        else:
            write_line()
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if error.code == 404:
            return error_response(NotFound(f"Unknown route: {request.method} {request.path}"))
        if error.code == 405:
            return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}."))
        if error.code == 413:
            return error_response(PayloadTooLarge(guard.body_too_large_message(settings.max_request_bytes)))
        api = ApiError(error.description or error.name, status=error.code or 400)
        return error_response(api)

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        # The frames say where; the exception's own text is left out, as it may quote a body or key.
        log.error("unexpected %s on %s %s\n%s", type(error).__name__, request.method,
                  request.url_rule.rule if request.url_rule else "(no route)",
                  "".join(traceback.format_tb(error.__traceback__)).rstrip())
        failure = ApiError("The cache server failed unexpectedly.", status=500, code="internal_error")
        failure.type = "server_error"
        return Response(error_json(failure), status=500, mimetype="application/json")


def main(argv: list[str] | None = None) -> int:
    """`python server.py`: Flask's own server, for the original's users and for development."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"computer-use-cache: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    # SIGTERM (docker stop, systemd) ends like Ctrl-C: the finally below writes pending hit counters.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app.run(host=settings.host, port=settings.port, debug=settings.flask_debug, threaded=True,
                request_handler=QuietRequestHandler)
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions[EXTENSION].store.close()
    return 0


class QuietRequestHandler(WSGIRequestHandler):
    """Flask's server without its own request lines: they repeat the raw path and query string
    (which may carry a key); the app's access log already has one safe line per request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        # http.server quotes the raw request line in malformed-request errors: keep the code only.
        self.log("info", "refused a malformed request (%s)", args[0] if args else "?")


if __name__ == "__main__":
    sys.exit(main())
