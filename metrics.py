"""Counting what the cache does: Prometheus metrics, and the request counts behind /cache/stats.

``RequestObserver`` is what ``CompletionProxy`` reports to (the body it read, the answer it is
about to store); ``Monitor`` is the real one, built by ``create_app``. It times the upstream, counts
every completion request by route and cache status as its response leaves (server.py's request
hooks report it, so the proxy's flow stays untouched), and serves ``GET /metrics``.

Under gunicorn each worker is its own process: with ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn.conf.py
does it) prometheus_client keeps each worker's values in files there and ``/metrics`` sums them, so
any worker answers with the totals of all. Figures that live in the database (entries, sizes,
savings) are read from the store at scrape time instead: they are already shared and persistent.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from flask import Flask, Response, g
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cache_store import CacheStore, StoreError, storable_text
from config import Settings
from pricing import usage_cost

PREFIX = "computer_use_cache"
HIT_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UPSTREAM_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def saved_figures(figures: dict[str, Any], model: Any) -> dict[str, Any]:
    """NewEntry's savings fields from an API's ``usage_figures``: the upstream's own cost, else
    its usage priced from the price table; a model the table does not know costs 0 and the
    entry is marked unpriced (when it used any tokens)."""
    prompt, completion = figures.get("prompt_tokens", 0), figures.get("completion_tokens", 0)
    cost = figures.get("cost_usd")
    unpriced = False
    if cost is None:
        cost = usage_cost(model, figures)
        if cost is None:
            cost, unpriced = 0.0, bool(prompt or completion)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost,
            "unpriced": unpriced}


def model_label(model: Any) -> str:
    """A request's model as counted in stats: client text, so bounded, and storable."""
    return storable_text(model[:200]) if isinstance(model, str) and model else "unknown"


class RequestObserver:
    """What the proxy reports about a request. This base only reads usage; Monitor does the rest."""

    def request_body(self, body: dict) -> None:
        """The parsed body of a completion request (its model is counted when it is answered)."""
        self.request_model(body.get("model"))

    def request_model(self, model: Any) -> None:
        """The model of a completion request, counted when it is answered."""

    def entry_figures(self, figures: dict[str, Any], model: Any) -> dict[str, Any]:
        """Extra NewEntry fields for an answer about to be stored, from its API's usage figures."""
        return saved_figures(figures, model)


class TimedUpstream:
    """Wraps UpstreamClient: counts upstream answers by status and times them."""

    def __init__(self, client: Any, monitor: "Monitor"):
        self._client = client
        self._monitor = monitor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _call(self, method: Callable, *args: Any) -> Any:
        started = time.monotonic()
        self._monitor.upstream_started(started)
        try:
            answer = method(*args)
        except Exception:
            self._monitor.upstream_answered("error", time.monotonic() - started)
            raise
        self._monitor.upstream_answered(str(answer.status), time.monotonic() - started)
        return answer

    def request(self, *args: Any) -> Any:
        return self._call(self._client.request, *args)

    def open(self, *args: Any) -> Any:
        return self._call(self._client.open, *args)


class StoreCollector:
    """Figures kept in the database, read at scrape time (O(1): the store's running totals)."""

    def __init__(self, store: CacheStore):
        self.store = store

    def describe(self):
        """Nothing: registering must not open the database (a registry calls collect() to learn
        the names of a collector without describe); the app opens it on first use, after fork."""
        return []

    def collect(self):
        try:
            stats = self.store.stats()
        except StoreError:
            return
        yield GaugeMetricFamily(f"{PREFIX}_entries", "Entries in the cache.", value=stats["entries"])
        yield GaugeMetricFamily(f"{PREFIX}_database_bytes",
                                "Size of the database file and its write-ahead log.",
                                value=stats["db_bytes"])
        yield GaugeMetricFamily(f"{PREFIX}_stored_bytes",
                                "Bytes of stored requests and answers.", value=stats["stored_bytes"])
        tokens = CounterMetricFamily(f"{PREFIX}_tokens_saved",
                                     "Tokens not sent upstream thanks to cache hits.", labels=["kind"])
        tokens.add_metric(["prompt"], stats["tokens_saved"]["prompt"])
        tokens.add_metric(["completion"], stats["tokens_saved"]["completion"])
        yield tokens
        yield CounterMetricFamily(f"{PREFIX}_cost_saved_usd",
                                  "Upstream cost (usage.cost, else priced with genai-prices) not "
                                  "spent thanks to cache hits.",
                                  value=stats["cost_saved_usd"])
        yield CounterMetricFamily(f"{PREFIX}_time_saved_seconds",
                                  "Upstream time not waited for thanks to cache hits.",
                                  value=stats["time_saved_seconds"])
        yield CounterMetricFamily(f"{PREFIX}_unpriced_hits",
                                  "Hits on answers with no usage.cost whose model the price table "
                                  "does not know (their savings count as $0).",
                                  value=stats.get("unpriced_hits", 0))
        by_api = stats.get("by_api", {})
        api_hits = CounterMetricFamily(f"{PREFIX}_api_hits", "Cache hits served, by API.", labels=["api"])
        api_tokens = CounterMetricFamily(f"{PREFIX}_api_tokens_saved",
                                         "Tokens not sent upstream thanks to cache hits, by API.",
                                         labels=["api", "kind"])
        api_cost = CounterMetricFamily(f"{PREFIX}_api_cost_saved_usd",
                                       "Upstream cost not spent thanks to cache hits, by API "
                                       "(usage.cost, else priced with genai-prices).", labels=["api"])
        for api, figures in by_api.items():
            api_hits.add_metric([api], figures["hits"])
            api_tokens.add_metric([api, "prompt"], figures["tokens_saved"]["prompt"])
            api_tokens.add_metric([api, "completion"], figures["tokens_saved"]["completion"])
            api_cost.add_metric([api], figures["cost_saved_usd"])
        yield api_hits
        yield api_tokens
        yield api_cost


class Monitor(RequestObserver):
    """Prometheus metrics and request counting for one app (one per gunicorn worker)."""

    def __init__(self, settings: Settings, store: CacheStore):
        self.store = store
        self.multiprocess_dir = settings.prometheus_multiproc_dir
        # Multiprocess mode: values go to the shared files, not to a registry of this process.
        self.registry = CollectorRegistry(auto_describe=True)
        owner = None if self.multiprocess_dir else self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Completion requests by route and cache status.",
                                ["route", "cache_status"], registry=owner)
        self.api_requests = Counter(f"{PREFIX}_api_requests",
                                    "Requests by API (chat, completion, messages, responses, "
                                    "embeddings) and cache status.",
                                    ["api", "cache_status"], registry=owner)
        self.upstream_requests = Counter(f"{PREFIX}_upstream_requests",
                                         "Upstream answers by HTTP status ('error': none came).",
                                         ["status"], registry=owner)
        self.upstream_latency = Histogram(f"{PREFIX}_upstream_latency_seconds",
                                          "Time until the upstream answered (headers, for streams).",
                                          buckets=UPSTREAM_LATENCY_BUCKETS, registry=owner)
        self.hit_latency = Histogram(f"{PREFIX}_hit_latency_seconds",
                                     "Time to answer a cache hit (until the response starts).",
                                     buckets=HIT_LATENCY_BUCKETS, registry=owner)
        self.near_hits = Counter(f"{PREFIX}_near_hits",
                                 "Cache hits answered by near matching (also counted as HIT in "
                                 f"{PREFIX}_requests_total).", ["route"], registry=owner)
        self.coalesced = Counter(f"{PREFIX}_coalesced_requests",
                                 "Requests answered by waiting for an identical request in flight.",
                                 registry=owner)
        self.store_errors = Counter(f"{PREFIX}_store_errors", "Database operations that failed.",
                                    ["operation"], registry=owner)
        for operation in ("read", "write"):
            self.store_errors.labels(operation)  # shown as 0 before the first error
        self.store_collector = StoreCollector(store)
        if not self.multiprocess_dir:
            self.registry.register(self.store_collector)
        store.on_error = self.store_error
        self._local = threading.local()
        self._request_counters: dict[tuple[str, str, str], Any] = {}  # labels() looked up once

    # -- what the proxy and the upstream wrapper report ------------------------------------------

    def wrap_upstream(self, client: Any) -> TimedUpstream:
        return TimedUpstream(client, self)

    def upstream_started(self, started: float) -> None:
        self._local.upstream_started = started

    def upstream_answered(self, status: str, seconds: float) -> None:
        self.upstream_requests.labels(status).inc()
        self.upstream_latency.observe(seconds)

    def request_model(self, model: Any) -> None:
        g.computer_use_cache_model = model_label(model)

    @staticmethod
    def current_model() -> str:
        """The model this request reported (``request_model``), inside a Flask request."""
        return g.get("computer_use_cache_model", "unknown")

    def entry_figures(self, figures: dict[str, Any], model: Any) -> dict[str, Any]:
        """Usage, plus the upstream time this thread's request has taken so far (a whole stream)."""
        started = getattr(self._local, "upstream_started", None)
        seconds = time.monotonic() - started if started is not None else 0.0
        return {**saved_figures(figures, model), "upstream_seconds": round(seconds, 6)}

    def store_error(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    # -- Flask ---------------------------------------------------------------------------------

    def count_response(self, route: str, status: str, key: str | None, coalesced: bool,
                       seconds: float, model: str, api: str = "", near: bool = False) -> None:
        """One answered request of an API (its mode): ``status`` is its X-Computer-Use-Cache value;
        ``near``: a hit found by near matching."""
        counters = self._request_counters.get((route, status, api))
        if counters is None:
            counters = self._request_counters[(route, status, api)] = (
                self.requests.labels(route, status), self.api_requests.labels(api or "unknown", status))
        for counter in counters:
            counter.inc()
        if status == "HIT":
            self.hit_latency.observe(seconds)
        if coalesced:
            self.coalesced.inc()
        if near:
            self.near_hits.labels(route).inc()
        self.store.record_request(status, model, route=route, key=key, seconds=seconds,
                                  coalesced=coalesced, api=api, near=near)

    def exposition(self) -> bytes:
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.multiprocess_dir)
        registry.register(self.store_collector)
        return generate_latest(registry)

    def register(self, app: Flask, require_admin: Callable[[], None]) -> None:
        """Serve GET /metrics (admin token when one is set); server.py's hooks do the counting."""

        @app.get("/metrics")
        def metrics():
            require_admin()
            return Response(self.exposition(), content_type=CONTENT_TYPE_LATEST)
