"""GET /metrics: Prometheus text format, summed over gunicorn's worker processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from fake_upstream import chat_completion, error_reply, json_reply
from helpers import chat_body

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from an exposition, via the official parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gunicorn(tmp_path, fake_upstream):
    """The production gunicorn.conf.py, 2 workers of 1 thread that each take one connection at a
    time: while one worker is busy the other must answer, so requests really are spread."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    env = {
        **os.environ, "HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "1", "GUNICORN_CMD_ARGS": "--worker-connections 1",
        "CACHE_DB_PATH": str(tmp_path / "cache.sqlite3"), "UPSTREAM_BASE_URL": fake_upstream.base_url,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "CACHE_HIT_FLUSH_SECONDS": "0.1",
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py", "server:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if requests.get(url + "/healthz", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("gunicorn did not start: " + process.stderr.read().decode(errors="replace"))
        time.sleep(0.05)
    try:
        yield url, metrics_dir
    finally:
        process.terminate()
        process.wait(timeout=20)


def per_worker_requests(metrics_dir: Path, tmp_path: Path) -> list[float]:
    """Completion requests counted by each worker alone (its own counter file)."""
    totals = []
    for file in sorted(metrics_dir.glob("counter_*.db")):
        alone = tmp_path / f"alone-{file.stem}"
        alone.mkdir()
        shutil.copy(file, alone / file.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(alone))
        found = samples(generate_latest(registry).decode())
        totals.append(sum(value for (name, _), value in found.items()
                          if name == "computer_use_cache_requests_total"))
    return totals


def test_metrics__gunicorn_workers_sum_into_one_exposition(gunicorn, fake_upstream, tmp_path):
    url, metrics_dir = gunicorn
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "cost": 0.01}
    fake_upstream.enqueue(json_reply(chat_completion("slow", usage=usage), delay=0.8),
                          json_reply(chat_completion("fast", usage=usage)))
    slow = threading.Thread(target=requests.post, args=(url + CHAT,), kwargs={"json": chat_body("slow")})
    slow.start()
    assert fake_upstream.wait_for_requests(1)
    # The first worker is busy with the slow miss: this one is answered by the other worker.
    assert requests.post(url + CHAT, json=chat_body("fast")).headers["X-Computer-Use-Cache"] == "MISS"
    slow.join()
    for _ in range(3):
        for content in ("slow", "fast"):
            assert requests.post(url + CHAT, json=chat_body(content)).headers["X-Computer-Use-Cache"] == "HIT"
    fake_upstream.enqueue(error_reply(429))
    assert requests.post(url + CHAT, json=chat_body("limited")).status_code == 429
    requests.post(url + "/chat/completions", json=chat_body("slow"), headers={"X-Cache-Bypass": "1"})

    time.sleep(0.4)  # other workers write their hit counters every CACHE_HIT_FLUSH_SECONDS (0.1)
    response = requests.get(url + "/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.text)

    def value(name, **labels):
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("computer_use_cache_requests_total", route=CHAT, cache_status="MISS") == 2
    assert value("computer_use_cache_requests_total", route=CHAT, cache_status="HIT") == 6
    assert value("computer_use_cache_requests_total", route=CHAT, cache_status="BYPASS") == 1
    assert value("computer_use_cache_requests_total", route="/chat/completions", cache_status="BYPASS") == 1
    assert value("computer_use_cache_upstream_requests_total", status="200") == 3
    assert value("computer_use_cache_upstream_requests_total", status="429") == 1
    assert value("computer_use_cache_upstream_latency_seconds_count") == 4
    assert value("computer_use_cache_upstream_latency_seconds_sum") >= 0.8
    assert value("computer_use_cache_hit_latency_seconds_count") == 6
    assert value("computer_use_cache_tokens_saved_total", kind="prompt") == 6 * 12
    assert value("computer_use_cache_tokens_saved_total", kind="completion") == 6 * 3
    assert value("computer_use_cache_cost_saved_usd_total") == pytest.approx(0.06)
    assert value("computer_use_cache_time_saved_seconds_total") >= 3 * 0.8
    assert value("computer_use_cache_coalesced_requests_total") == 0
    assert value("computer_use_cache_entries") == 2
    assert value("computer_use_cache_database_bytes") > 0
    assert value("computer_use_cache_store_errors_total", operation="read") == 0

    workers = per_worker_requests(metrics_dir, tmp_path)
    assert len(workers) == 2 and all(count > 0 for count in workers) and sum(workers) == 10


def test_metrics__needs_the_admin_token_when_set(start_proxy, http):
    proxy = start_proxy(cache_admin_token="s3cret-admin")
    assert http.get(proxy.url + "/metrics").status_code == 401
    ok = http.get(proxy.url + "/metrics", headers={"Authorization": "Bearer s3cret-admin"})
    assert ok.status_code == 200 and "computer_use_cache_entries" in ok.text


def test_metrics__store_errors_are_counted(start_proxy, http, fake_upstream):
    proxy = start_proxy()
    http.post(proxy.url + CHAT, json=chat_body("x"))
    with proxy.store._db() as db:  # break the table the hit path reads
        db.execute("ALTER TABLE completions RENAME TO broken")
    assert http.post(proxy.url + CHAT, json=chat_body("x")).status_code == 200
    found = samples(http.get(proxy.url + "/metrics").text)
    assert found[("computer_use_cache_store_errors_total", (("operation", "read"),))] >= 1
