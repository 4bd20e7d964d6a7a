"""Production gunicorn settings, read by `make run` and the Docker image.

gthread workers, chosen by measurement (docs/performance.md): each worker
process runs a pool of threads, so hundreds of slow upstream calls and long streams are held at
once while cache hits stay as cheap as a plain Flask reply. The worker ``timeout`` is a heartbeat
of the worker's main loop, which keeps beating while its threads serve requests, so a healthy
3-minute stream is never killed by it (tests/test_production_server.py holds a stream open past
it). Values come from ``Settings`` (WEB_CONCURRENCY, GUNICORN_THREADS, GUNICORN_TIMEOUT).
"""

import ctypes
import os
import shutil
import sys
import tempfile

from config import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:  # one clear line instead of a traceback per worker
    print(f"computer-use-cache: {exc}", file=sys.stderr)
    sys.exit(2)

# /metrics sums all workers (prometheus_client multiprocess mode): each worker writes its values
# to files in this directory, set before any worker imports prometheus_client.
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="computer-use-cache-metrics-")

# glibc's malloc hands buffers above its threshold straight back to the kernel, so every request
# of an agent that resends 400 KB of screenshots paid ~100 page faults per buffer (about a dozen
# buffers: body, parse, canonical form, forwarded body, SQLite's copy) on every step. Keeping
# buffers up to 4 MiB in the heap and trimming only past 16 MiB took a 400 KB miss from ~11 ms to
# ~7 ms over the upstream's time, with no change in the memory held during a 256-call burst
# (docs/performance.md). Set before the fork, so every worker inherits it.
MALLOC_MMAP_THRESHOLD_BYTES = 4 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers (malloc.h)


def tune_malloc() -> bool:
    """Apply the thresholds above; False where there is no glibc mallopt, or where the operator
    set glibc's own MALLOC_*_THRESHOLD_ variables (theirs win)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES))


malloc_tuned = tune_malloc()

# Hundreds of threads per worker take turns on the GIL; at Python's default 5 ms a busy thread is
# asked to hand over ten times as often, and each hand-over in a burst costs more than it saves:
# in the 256-call burst (median of 6 each) the proxy's CPU fell from 1.7 s to 1.3 s and the wall
# time from 2.0 s to 1.76 s with 50 ms (docs/performance.md). Threads still hand over at once
# whenever they wait on a socket or SQLite, which is most of the time. Set before the fork, as above.
GIL_SWITCH_INTERVAL_SECONDS = 0.05
# On Redis (CACHE_URL) every hit waits for a reply from another process; the thread it wakes
# must then get the GIL back, and at 50 ms it may wait for a busy thread's whole turn. Python's
# default turn: hits on Redis at 16 connections went from ~0.6x to ~0.8x of SQLite's throughput
# (bench/redis_store.py), the burst unchanged (docs/many-instances.md).
REDIS_GIL_SWITCH_INTERVAL_SECONDS = 0.005
sys.setswitchinterval(REDIS_GIL_SWITCH_INTERVAL_SECONDS if _settings.cache_url else GIL_SWITCH_INTERVAL_SECONDS)

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
# gunicorn's own access log stays off: it would repeat raw request lines (query strings may carry
# keys). The app writes one clean line per request to the computer_use_cache.access logger.
accesslog = None
# No gunicornc control socket: nothing here uses it, and gunicorn would make it in $HOME/.gunicorn,
# which the Docker image's user may not write (an error line at every start), and which every
# instance started by one user would share.
control_socket_disable = True


def post_worker_init(worker):
    """Send the app's log records (access lines, warnings) to stderr, where gunicorn logs too."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s %(message)s"))
    logger = logging.getLogger("computer_use_cache")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def worker_exit(server, worker):
    """Write the hit counters still held in memory before the worker goes (graceful shutdown)."""
    app = getattr(worker, "wsgi", None)
    proxy = getattr(app, "extensions", {}).get("computer_use_cache") if app is not None else None
    if proxy is not None:
        proxy.store.close()


def on_starting(server):
    """Start counting from zero: values left by an earlier run would be summed in otherwise."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def child_exit(server, worker):
    """A dead worker's live gauges stop counting; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
