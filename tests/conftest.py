"""Fixtures: a real fake upstream and a real proxy, each on its own 127.0.0.1 port.

Chain: ``fake_upstream`` -> ``settings`` (tmp database, the fake as upstream) -> ``proxy``
(the app served over a socket) -> ``openai_client`` / ``http``. Tests that need other settings
call ``start_proxy(**overrides)``. ``app``/``client`` give Flask's test client for fast unit tests.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from pathlib import Path

import openai
import pytest
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import config  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402
from helpers import FakeClock  # noqa: E402
from server import create_app, store_from_settings  # noqa: E402

SETTING_VARIABLES = [field.metadata["env"] for field in dataclasses.fields(config.Settings)] + [
    "OPENAI_BASE_URL", "OPENROUTER_API_KEY", "OPENAI_API_KEY", "WEB_CONCURRENCY", "GUNICORN_THREADS",
    "ANTHROPIC_API_KEY",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The developer's own settings must never leak into a test."""
    for name in SETTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_upstream():
    with FakeUpstream() as upstream:
        yield upstream


def make_settings(tmp_path: Path, upstream: FakeUpstream | None, **overrides) -> config.Settings:
    values = {
        "cache_db_path": str(tmp_path / "cache.sqlite3"),
        "upstream_base_url": upstream.base_url if upstream else "http://127.0.0.1:9",
        "upstream_timeout_seconds": 10.0,
        "hit_flush_seconds": 0.2,
        # The shared deployment: the proxy holds the upstream key, keys are the original's.
        # Tests of client-key forwarding and partitions pass upstream_api_key="".
        "upstream_api_key": "sk-upstream-test",
    }
    values.update(overrides)
    return config.load_settings({}, **values)


@pytest.fixture
def settings(tmp_path, fake_upstream):
    return make_settings(tmp_path, fake_upstream)


class ProxyServer:
    """The app served by a real threaded HTTP server on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def store(self):
        return self.app.extensions["computer_use_cache"].store

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.store.close()


@pytest.fixture
def start_proxy(tmp_path, fake_upstream):
    """start_proxy(store_options=None, **setting_overrides) -> ProxyServer, stopped after the test.

    ``store_options`` go to the store the settings describe (a test clock, fault hooks).
    """
    servers: list[ProxyServer] = []

    def start(store_options: dict | None = None, **overrides) -> ProxyServer:
        settings = make_settings(tmp_path, fake_upstream, **overrides)
        store = store_from_settings(settings, **store_options) if store_options else None
        server = ProxyServer(create_app(settings, store=store))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def start_clocked_proxy(start_proxy, clock):
    """start(**setting_overrides) -> a real proxy whose store reads time from ``clock``."""
    return functools.partial(start_proxy, store_options={"clock": clock})


@pytest.fixture
def proxy(start_proxy):
    return start_proxy()


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


@pytest.fixture
def openai_client(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-client", max_retries=0)


@pytest.fixture
def app(settings):
    application = create_app(settings)
    yield application
    application.extensions["computer_use_cache"].store.close()


@pytest.fixture
def client(app):
    return app.test_client()



# -- Redis (the Redis store's tests; never skipped: a missing redis-server fails them) ----------

@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session; each test keeps to its own key prefix (``redis_prefix``)."""
    from redis_server import MISSING, REDIS_SERVER, RedisServer

    if not Path(REDIS_SERVER).exists():
        pytest.fail(MISSING, pytrace=False)
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_prefix(request):
    """A key prefix of this test's own, so tests sharing the session's Redis never meet."""
    import uuid

    return f"t-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def own_redis():
    """start(password=None, port=None, tls=False, unix=False) -> a redis-server of this test's own
    (to stop, freeze, restart; with TLS: a self-signed certificate its URL trusts; with unix: its
    URL is the socket's)."""
    from redis_server import MISSING, REDIS_SERVER, RedisServer

    if not Path(REDIS_SERVER).exists():
        pytest.fail(MISSING, pytrace=False)
    servers: list[RedisServer] = []

    def start(password: str | None = None, port: int | None = None, tls: bool = False,
              unix: bool = False) -> RedisServer:
        server = RedisServer(password=password, port=port, tls=tls, unix=unix)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()
