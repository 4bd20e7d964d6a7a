"""Production gunicorn settings, read by `make run` and the Docker image.

gthread workers, chosen by measurement (README, "Performance and deployment"): each worker
process runs a pool of threads, so hundreds of slow upstream calls and long streams are held at
once while cache hits stay as cheap as a plain Flask reply. The worker ``timeout`` is a heartbeat
of the worker's main loop, which keeps beating while its threads serve requests, so a healthy
3-minute stream is never killed by it (tests/test_production_server.py holds a stream open past
it). Values come from ``Settings`` (WEB_CONCURRENCY, GUNICORN_THREADS, GUNICORN_TIMEOUT).
"""

import sys

from config import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:  # one clear line instead of a traceback per worker
    print(f"computer-use-cache: {exc}", file=sys.stderr)
    sys.exit(2)

bind = f"{_settings.host}:{_settings.port}"
worker_class = "gthread"
workers = max(1, _settings.web_concurrency)
threads = max(1, _settings.gunicorn_threads)
# Idle keep-alive connections wait in the worker's poller, not in a thread; leave room for many.
worker_connections = max(1000, 4 * threads)
timeout = _settings.gunicorn_timeout
graceful_timeout = 30
keepalive = 75
backlog = 2048
accesslog = None


def worker_exit(server, worker):
    """Write the hit counters still held in memory before the worker goes (graceful shutdown)."""
    app = getattr(worker, "wsgi", None)
    proxy = getattr(app, "extensions", {}).get("computer_use_cache") if app is not None else None
    if proxy is not None:
        proxy.store.close()
