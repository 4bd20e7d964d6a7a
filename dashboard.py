"""GET /dashboard (one self-contained page) and GET /cache/activity, the feed it polls.

The page holds no data: it fetches ``/cache/stats`` and ``/cache/activity`` every few seconds.
When ``CACHE_ADMIN_TOKEN`` is set, ``/cache/activity`` needs it; the page takes it once from
``?token=``, keeps it in sessionStorage (never in the address bar or history) and sends it as
``X-Cache-Admin-Token``. Prompts are shown only as their first words, with anything that looks
like a credential blanked first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, jsonify

from cache_store import CacheStore, StoreError, TopEntry
from errors import ServiceUnavailable
from previews import prompt_preview

PAGE_PATH = Path(__file__).with_name("dashboard.html")
TIMELINE_WINDOW_SECONDS = 15 * 60
TOP_ENTRIES = 10
# The page loads nothing from anywhere: a browser enforces it, not just our tests.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def entry_summary(entry: TopEntry, now: float) -> dict[str, Any]:
    return {
        "key": entry.key,
        "model": entry.model,
        "prompt": prompt_preview(entry.request_json),
        "hits": entry.hits,
        "age_seconds": round(max(0.0, now - entry.created_at), 1),
        "size_bytes": entry.size_bytes,
        "tokens_per_hit": entry.prompt_tokens + entry.completion_tokens,
        "cost_usd_per_hit": entry.cost_usd,
    }


def register_dashboard(app: Flask, store: CacheStore, require_admin: Callable[[], None]) -> None:
    page = PAGE_PATH.read_bytes()

    @app.get("/dashboard")
    def dashboard():
        # The page itself is a data-free shell; its feeds check the token.
        return Response(page, mimetype="text/html", headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        })

    @app.get("/cache/activity")
    def cache_activity():
        require_admin()
        now = store.clock()
        try:
            activity = store.activity(since=now - TIMELINE_WINDOW_SECONDS)
            top = [entry_summary(entry, now) for entry in store.top_entries(TOP_ENTRIES)]
        except StoreError as exc:
            raise ServiceUnavailable(f"The cache database is unavailable: {exc}") from exc
        return jsonify(now=now, window_seconds=TIMELINE_WINDOW_SECONDS, **activity, top_entries=top)
