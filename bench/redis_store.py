"""The Redis store beside SQLite (issue 13): hit throughput and the 256-call burst, each backend
measured in the same run, so only their ratio is compared.

`make bench` runs it at the end of bench/run.py; `python bench/redis_store.py` runs it alone.
Starts its own redis-server (Debian's, no persistence) on a free 127.0.0.1 port.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Connection, _unique, build_request, burst  # noqa: E402

HIT_THROUGHPUT_TARGET = 0.7  # Redis hits per second, at least this share of SQLite's
BURST_TARGET = 1.1  # the Redis burst's wall time, at most this multiple of SQLite's
BURST_ROUNDS = 2  # each backend in turn, the best round of each compared
HIT_CONNECTIONS = (16, 64)  # as run.py's hit figure, and with four times as many in flight


def start_redis(services, bench: ModuleType) -> str:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server is not installed (make bench installs Debian's redis-server)")
    port = bench.free_port()
    services._spawn([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(services.workdir)], {}, port)
    return f"redis://127.0.0.1:{port}/0"


def run_scenarios(bench: ModuleType, services, tmp: Path, args) -> None:
    """Adds the Redis rows to bench.ROWS (``bench`` is bench/run.py, the module of the table)."""
    seconds, procs = args.seconds, args.load_processes
    print("Redis store beside SQLite (one redis-server, production gunicorn config)", flush=True)
    redis_url = start_redis(services, bench)
    fast_upstream = services.upstream(0.0)
    small = build_request(bench.CHAT_PATH, bench.small_body())
    sqlite_port, sqlite_proxy = services.proxy(fast_upstream, tmp / "beside-redis.sqlite3")
    redis_port, redis_proxy = services.proxy(fast_upstream, tmp / "unused.sqlite3", CACHE_URL=redis_url,
                                             CACHE_REDIS_PREFIX="bench-hits:")
    for port in (sqlite_port, redis_port):
        Connection(port).send(small)  # stores it
    for connections in HIT_CONNECTIONS:
        sqlite_hits, redis_hits = bench.alternating_load((sqlite_port, small), (redis_port, small),
                                                         connections=connections, processes=procs,
                                                         seconds=seconds)
        ratio = redis_hits.throughput / sqlite_hits.throughput
        bench.row(f"Redis store: cache-hit throughput, {connections} connections",
                  f">= {HIT_THROUGHPUT_TARGET}x SQLite",
                  f"{redis_hits.throughput:.0f} req/s (SQLite {sqlite_hits.throughput:.0f})", ratio,
                  ratio >= HIT_THROUGHPUT_TARGET and redis_hits.errors == 0)
    services.stop(sqlite_proxy)
    services.stop(redis_proxy)

    slow_upstream = services.upstream(1.0)
    sqlite_port, sqlite_proxy = services.proxy(slow_upstream, tmp / "burst-beside-redis.sqlite3")
    redis_port, redis_proxy = services.proxy(slow_upstream, tmp / "unused-burst.sqlite3", CACHE_URL=redis_url,
                                             CACHE_REDIS_PREFIX="bench-burst:")
    for port in (sqlite_port, redis_port):
        Connection(port).send(small)  # warm the workers
    plain = build_request(bench.CHAT_PATH, bench.small_body(unique=True))
    streaming = build_request(bench.CHAT_PATH, bench.small_body(unique=True, stream=True))
    walls: dict[str, list[float]] = {"sqlite": [], "redis": []}
    errors = 0
    for number in range(BURST_ROUNDS):
        for name, port in (("sqlite", sqlite_port), ("redis", redis_port)):
            raws = [_unique(plain if i % 2 else streaming, f"{name}{number}", i) for i in range(256)]
            wall, replies = burst(port, raws, processes=procs)
            walls[name].append(wall)
            errors += sum(1 for reply in replies if reply[1] != 200)
    services.stop(sqlite_proxy)
    services.stop(redis_proxy)
    best = {name: min(values) for name, values in walls.items()}
    ratio = best["redis"] / best["sqlite"]
    bench.row("Redis store: 256 concurrent distinct requests, upstream 1 s, half streamed",
              f"<= {BURST_TARGET}x SQLite, no errors",
              f"{best['redis']:.2f} s (SQLite {best['sqlite']:.2f} s; best of {BURST_ROUNDS}), {errors} errors",
              ratio, ratio <= BURST_TARGET and errors == 0)


def main() -> int:
    import argparse

    import run as bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each throughput run")
    parser.add_argument("--load-processes", type=int, default=4, help="load generator processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cuc-bench-redis-") as tmp:
        services = bench.Services(Path(tmp))
        try:
            run_scenarios(bench, services, Path(tmp), args)
        finally:
            services.stop_all()
    bench.print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
