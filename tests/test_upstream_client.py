"""Unit tests of upstream.UpstreamClient: with the `responses` library (no sockets), then over
real sockets against small counting servers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import responses

import config
from errors import UpstreamFailed, UpstreamTimeout
from fake_upstream import sse_reply, trickle_reply
from helpers import holds_in_forked_child
from upstream import UpstreamClient, relayable_headers, safe_client_value

BASE = "http://upstream.test/v1"


def make_client(**overrides) -> UpstreamClient:
    return UpstreamClient(config.load_settings({}, **{"upstream_base_url": BASE, **overrides}))


def test_headers_for__server_key_wins_over_the_client_bearer():
    headers = make_client(upstream_api_key="sk-server").headers_for({"Authorization": "Bearer sk-client"})
    assert headers["Authorization"] == "Bearer sk-server"


def test_headers_for__client_bearer_is_forwarded_without_a_server_key():
    assert make_client().headers_for({"Authorization": "Bearer sk-client"})["Authorization"] == "Bearer sk-client"


@pytest.mark.parametrize("value", ["agent\r\nX-Injected: 1", "agent\nx", "a\rb", "a\x00b", "a" * 3000])
def test_headers_for__unsafe_client_values_are_never_forwarded(value):
    headers = make_client().headers_for({"Authorization": f"Bearer {value}", "X-Title": value,
                                         "HTTP-Referer": value})
    assert headers == {"Content-Type": "application/json", "Accept": "application/json"}


def test_headers_for__configured_attribution_wins():
    client = make_client(openrouter_http_referer="https://team.example", openrouter_x_title="Team")
    headers = client.headers_for({"HTTP-Referer": "https://me", "X-Title": "Me"})
    assert headers["HTTP-Referer"] == "https://team.example" and headers["X-Title"] == "Team"


def test_safe_client_value__keeps_ordinary_text():
    assert safe_client_value("My Agent (v2)\tbeta") == "My Agent (v2)\tbeta"
    assert safe_client_value("") is None and safe_client_value(None) is None


@responses.activate
def test_request__returns_status_headers_and_body():
    responses.post(BASE + "/chat/completions", json={"ok": 1}, status=201, headers={"X-Request-Id": "r1"})
    client = make_client()
    reply = client.request("POST", "/chat/completions", {}, b"{}")
    assert (reply.status, reply.body, reply.headers["X-Request-Id"]) == (201, b'{"ok": 1}', "r1")
    assert client.last_status() == 201
    client.reset_last_status()
    assert client.last_status() is None


@responses.activate
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_request__redirects_are_refused_not_followed(status):
    responses.post(BASE + "/chat/completions", status=status, headers={"Location": "http://evil.test/steal"})
    steal = responses.post("http://evil.test/steal", json={})
    with pytest.raises(UpstreamFailed, match="redirect") as caught:
        make_client().request("POST", "/chat/completions", {}, b"{}")
    assert caught.value.status == 502
    assert steal.call_count == 0


@responses.activate
@pytest.mark.parametrize("raised, error, status", [
    (requests.exceptions.ConnectionError("refused"), UpstreamFailed, 502),
    (requests.exceptions.ConnectTimeout("slow"), UpstreamTimeout, 504),
    (requests.exceptions.ReadTimeout("stalled"), UpstreamTimeout, 504),
])
def test_request__transport_faults_become_502_or_504(raised, error, status):
    responses.post(BASE + "/chat/completions", body=raised)
    client = make_client()
    with pytest.raises(error) as caught:
        client.request("POST", "/chat/completions", {}, b"{}")
    assert caught.value.status == status
    assert caught.value.type == "upstream_error"
    assert client.last_status() is None


@responses.activate
def test_request__sends_the_expected_headers_and_body():
    call = responses.post(BASE + "/completions", json={})
    make_client(upstream_api_key="sk-server").request("POST", "/completions", {"X-Title": "t"}, b'{"a":1}')
    sent = call.calls[0].request
    assert sent.headers["Authorization"] == "Bearer sk-server"
    assert sent.headers["X-Title"] == "t"
    assert sent.body == b'{"a":1}'


def test_relayable_headers__drops_hop_by_hop_and_encoding_keeps_retry_after():
    kept = relayable_headers({"Retry-After": "7", "Content-Encoding": "gzip", "Transfer-Encoding": "chunked",
                              "Content-Length": "10", "Connection": "close", "X-RateLimit-Remaining": "0",
                              "Set-Cookie": "a=b"})
    assert kept == {"Retry-After": "7", "X-RateLimit-Remaining": "0"}


# --------------------------------------------------------------------------- over real sockets


class _CountingServer(ThreadingHTTPServer):
    """A keep-alive upstream that counts the connections it accepted and keeps each raw request."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _CountingHandler)
        self.connections = 0
        self.raw_requests: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _CountingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.raw_requests.append(self.requestline.encode() + b"\r\n" + bytes(self.headers) + body)
        reply = b'{"echo": "' + body.replace(b'"', b"") + b'"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def counting_server():
    server = _CountingServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_open__threads_take_turns_on_one_kept_alive_connection(counting_server):
    client = make_client(upstream_base_url=counting_server.base_url)
    answers = []
    for number in range(5):  # one after another, each from a thread of its own
        thread = threading.Thread(target=lambda n=number: answers.append(
            client.request("POST", "/chat/completions", {}, b'{"n": %d}' % n).body))
        thread.start()
        thread.join()
    assert sorted(answers) == sorted(b'{"echo": "{n: %d}"}' % n for n in range(5))
    assert counting_server.connections == 1


def test_open__concurrent_threads_each_get_their_own_answer(counting_server):
    client = make_client(upstream_base_url=counting_server.base_url)
    answers: dict[int, bytes] = {}
    barrier = threading.Barrier(16)

    def call(n: int) -> None:
        barrier.wait()
        answers[n] = client.request("POST", "/chat/completions", {}, b'{"n": %02d}' % n).body

    threads = [threading.Thread(target=call, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {n: b'{"echo": "{n: %02d}"}' % n for n in range(16)}
    # Kept for the next burst: more calls open no new connections.
    connections = counting_server.connections
    for n in range(16):
        client.request("POST", "/chat/completions", {}, b"{}")
    assert counting_server.connections == connections


@pytest.mark.parametrize("method, path, headers, body", [
    ("POST", "/chat/completions", {"Authorization": "Bearer sk-c", "X-Title": "t", "HTTP-Referer": "r"},
     b'{"model": "m"}'),
    ("GET", "/models", {}, None),
    ("POST", "/completions", {}, b""),
])
def test_request__sends_the_bytes_a_requests_session_sends(counting_server, method, path, headers, body):
    """The cheap PreparedRequest is the one Session.request would build: same headers, same order."""
    client = make_client(upstream_base_url=counting_server.base_url, openrouter_x_title="Team")
    client.request(method, path, headers, body)
    with requests.Session() as session:
        session.trust_env = False
        session.request(method, counting_server.base_url + path, data=body,
                        headers=client.headers_for(headers), allow_redirects=False).close()
    ours, sessions = counting_server.raw_requests
    assert ours == sessions


def test_open__a_forked_child_uses_a_pool_of_its_own(counting_server):
    client = make_client(upstream_base_url=counting_server.base_url)
    client.request("GET", "/models", {})
    parents = client._transport()
    def child_has_its_own():
        return (client._transport() is not parents
                and client.request("GET", "/models", {}).status == 200)

    assert holds_in_forked_child(child_has_its_own)
    assert client._transport() is parents
    assert client.request("GET", "/models", {}).status == 200


def test_request__a_trickling_body_is_cut_at_the_total_deadline(fake_upstream):
    fake_upstream.enqueue(trickle_reply(total_seconds=10, interval=0.1))
    client = make_client(upstream_base_url=fake_upstream.base_url, upstream_timeout_seconds=1)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        client.request("POST", "/chat/completions", {}, b"{}")
    assert time.monotonic() - started < 3


def _events(count: int) -> list[dict]:
    return [{"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"w{n}"}}]}
            for n in range(count)]


def test_iter_bytes__events_that_already_arrived_come_as_one_piece(fake_upstream):
    """A dozen events sent at once are relayed in one write, not one write per upstream chunk."""
    events = _events(12)
    fake_upstream.enqueue(sse_reply(events))
    stream = make_client(upstream_base_url=fake_upstream.base_url).open("POST", "/chat/completions", {}, b"{}")
    time.sleep(0.3)  # every chunk is in by now
    pieces = list(stream.iter_bytes())
    stream.close()
    # One piece, or two when the first read ended inside a chunk's size line.
    assert len(pieces) <= 2
    assert b"".join(pieces) == b"".join(
        b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n" for event in events
    ) + b"data: [DONE]\n\n"


def test_iter_bytes__an_event_is_never_held_back_waiting_for_the_next(fake_upstream):
    fake_upstream.enqueue(sse_reply(_events(3), delay_between=0.4))
    stream = make_client(upstream_base_url=fake_upstream.base_url).open("POST", "/chat/completions", {}, b"{}")
    started = time.monotonic()
    pieces = stream.iter_bytes()
    first = next(pieces)
    assert time.monotonic() - started < 0.3
    assert first.startswith(b"data: ") and first.count(b"data: ") == 1
    rest = list(pieces)
    stream.close()
    assert b"".join([first, *rest]).count(b"data: ") == 4  # three events and [DONE]
