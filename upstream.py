"""The client for the OpenAI-compatible upstream: headers, one deadline per call, no redirects.

One ``requests`` HTTPAdapter per process, shared by all its threads (urllib3's pool is
thread-safe), keeps connections to the upstream alive and hands them from thread to thread.
Requests are built directly as a ``PreparedRequest``: ``Session.request`` would merge settings,
cookies and hooks on every call, which costs more than the rest of the call on a fast upstream.
``UPSTREAM_TIMEOUT_SECONDS`` is a deadline for the whole call: a server that trickles bytes or
stalls mid-body is cut off when it passes, not merely when one read is slow.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import default_headers
from urllib3.util import Timeout

from config import Settings
from errors import UpstreamFailed, UpstreamTimeout

_READ_SIZE = 65536

# Headers that describe one hop of the connection, or that the proxy sets itself: never relayed.
_NOT_RELAYED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "content-length", "content-encoding", "server",
    "date", "set-cookie", "access-control-allow-origin", "access-control-allow-methods",
    "access-control-allow-headers", "access-control-expose-headers",
    "access-control-allow-credentials", "access-control-max-age",
})


# Client header values copied upstream must be one clean line of reasonable length.
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MAX_FORWARDED_VALUE_CHARS = 2048


def safe_client_value(value: str | None) -> str | None:
    """A client header value fit to forward, or None: never CR/LF (header injection) or NUL."""
    if not value or len(value) > _MAX_FORWARDED_VALUE_CHARS or _UNSAFE_VALUE.search(value):
        return None
    return value


def relayable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Upstream response headers a client should see (rate limits, request ids, Retry-After)."""
    return {name: value for name, value in headers.items() if name.lower() not in _NOT_RELAYED}


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
        return token or None
    return None


@dataclass(frozen=True)
class UpstreamTarget:
    """Where one API's misses go and how they authenticate.

    ``api_key``: a key the server holds; it wins over the client's and is sent as ``key_header``
    ("bearer": ``Authorization: Bearer``, "x-api-key": Anthropic's own header). Without one, the
    client's own key headers (``client_key_headers``) are forwarded as sent. ``forwarded_headers``
    are client headers passed on unchanged (Anthropic's version and beta flags).
    """

    base_url: str
    api_key: str = ""
    key_header: str = "bearer"
    client_key_headers: tuple[str, ...] = ("Authorization",)
    forwarded_headers: tuple[str, ...] = ()


@dataclass
class UpstreamReply:
    """A whole upstream answer, body decoded (gzip and the like already undone)."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", self.headers.get("content-type", ""))


@dataclass
class UpstreamStream:
    """An upstream answer whose body is read piece by piece as it arrives."""

    status: int
    headers: dict[str, str]
    _response: requests.Response
    _deadline: float
    started: float = field(default_factory=time.monotonic)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", self.headers.get("content-type", ""))

    def iter_bytes(self) -> Iterator[bytes]:
        """Body pieces as they arrive; raises UpstreamFailed/UpstreamTimeout on a broken body."""
        return _read_pieces(self._response, self._deadline)

    def read_all(self) -> bytes:
        return b"".join(self.iter_bytes())

    def close(self) -> None:
        """Drop the connection (not back to the pool): the upstream stops sending at once."""
        try:
            self._response.raw.shutdown()
        except Exception:
            pass
        self._response.close()


def _socket(response: requests.Response):
    connection = getattr(response.raw, "connection", None) or getattr(response.raw, "_connection", None)
    return getattr(connection, "sock", None)


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    sock = _socket(response)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


def _next_read_is_ready(response: requests.Response) -> bool:
    """True when the next ``read1`` returns body bytes that have already arrived, without
    waiting on the network; False when unsure (the caller then relays what it has).

    Looks at what http.client has buffered (a peek on the socket made non-blocking for the
    moment, so it never waits) and at its chunked-encoding state: a read must not start on a
    chunk whose size line, or whose first byte, is still on its way.
    """
    http_response = getattr(response.raw, "_fp", None)
    buffer = getattr(http_response, "fp", None)
    sock = _socket(response)
    if buffer is None or sock is None or not hasattr(buffer, "peek"):
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        data = buffer.peek(1)
    except (OSError, ValueError):  # nothing buffered (TLS says "want read"), or closed
        return False
    finally:
        sock.settimeout(timeout)
    if not data:
        return False
    if not getattr(http_response, "chunked", False):
        return True
    left = getattr(http_response, "chunk_left", None)
    if left:
        return True  # inside a chunk: its buffered bytes come back at once
    view = data[2:] if left == 0 else data  # the CRLF that ends the previous chunk goes first
    end = view.find(b"\n")
    if end < 0 or end + 1 >= len(view):
        return False
    try:
        size = int(view[:end].split(b";", 1)[0], 16)
    except ValueError:
        return False
    return size > 0  # the last chunk (size 0) is left to the next, ordinary read


def _with_ready_pieces(response: requests.Response, piece: bytes) -> bytes:
    """``piece`` plus whatever more of the body has already arrived.

    A provider often sends several events at once, each in an HTTP chunk of its own; relaying
    them together costs one write to the client instead of one per event, and nothing waits.
    """
    pieces = [piece]
    size = len(piece)
    while size < _READ_SIZE and _next_read_is_ready(response):
        more = response.raw.read1(_READ_SIZE - size, decode_content=True)
        if not more:
            break
        pieces.append(more)
        size += len(more)
    return piece if len(pieces) == 1 else b"".join(pieces)


def _read_pieces(response: requests.Response, deadline: float) -> Iterator[bytes]:
    # With a content encoding (gzip) a read may wait for more input to decode: read plainly.
    encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout("The upstream did not finish its answer in time.")
            _set_read_timeout(response, remaining)
            piece = response.raw.read1(_READ_SIZE, decode_content=True)
            if not piece:
                return
            yield piece if encoded else _with_ready_pieces(response, piece)
    except (UpstreamFailed, GeneratorExit):
        raise
    except requests.exceptions.Timeout as exc:  # pragma: no cover - urllib3 wraps it below
        raise UpstreamTimeout("The upstream did not finish its answer in time.") from exc
    except Exception as exc:
        if time.monotonic() >= deadline or "timed out" in str(exc).lower():
            raise UpstreamTimeout("The upstream did not finish its answer in time.") from exc
        raise UpstreamFailed("The upstream connection broke off before the answer was complete.") from exc


class UpstreamClient:
    def __init__(self, settings: Settings):
        self.base_url = settings.upstream_base_url
        self.api_key = settings.upstream_api_key
        self.target = UpstreamTarget(self.base_url, self.api_key)  # chat's: the default
        self.timeout = settings.upstream_timeout_seconds
        self.referer = settings.openrouter_http_referer
        self.title = settings.openrouter_x_title
        # Room for every thread of a worker to hold a connection: a smaller pool would close
        # (and log) each connection it cannot take back after a burst.
        self.pool_size = max(10, settings.gunicorn_threads)
        # total: connecting and waiting for the headers share one deadline; the body reads get
        # whatever is left of it. urllib3 clones it per call, so one instance serves all.
        self._timeout = Timeout(connect=min(self.timeout, 30.0), read=self.timeout, total=self.timeout)
        # The headers a requests.Session would send (in its order), before ours are added.
        self._base_headers = tuple(default_headers().items())
        self._urls: dict[tuple[str, str], str] = {}
        self._adapter: HTTPAdapter | None = None
        self._adapter_pid: int | None = None
        self._adapter_lock = threading.Lock()
        self._local = threading.local()

    def _transport(self) -> HTTPAdapter:
        """This process's adapter, made on first use: never one inherited across fork, whose
        sockets the parent still uses."""
        pid = os.getpid()
        if self._adapter_pid != pid:
            with self._adapter_lock:
                if self._adapter_pid != pid:
                    # max_retries=0, pool_block=False: what a requests.Session mounts by default.
                    self._adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.pool_size,
                                                max_retries=0, pool_block=False)
                    self._adapter_pid = pid
        return self._adapter  # type: ignore[return-value]

    def _url(self, base_url: str, path: str) -> str:
        """The full URL for path, normalised as requests would, once per path (a fixed few)."""
        url = self._urls.get((base_url, path))
        if url is None:
            prepared = requests.PreparedRequest()
            prepared.prepare_url(base_url + path, None)
            url = prepared.url  # type: ignore[assignment]
            if len(self._urls) < 64:  # the fixed routes; paths with ids are not kept
                self._urls[(base_url, path)] = url
        return url

    def _prepared(self, method: str, path: str, client_headers: Mapping[str, str],
                  body: bytes | None, target: UpstreamTarget) -> requests.PreparedRequest:
        """The request a Session would send for (method, url, data=body, headers): same URL,
        same headers in the same order, same Content-Length."""
        headers = CaseInsensitiveDict(self._base_headers)
        headers.update(self.headers_for(client_headers, target))
        if body:
            headers["Content-Length"] = str(len(body))
        else:
            body = None
            if method not in ("GET", "HEAD"):
                headers["Content-Length"] = "0"
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self._url(target.base_url, path)
        prepared.headers = headers
        prepared.body = body
        return prepared

    def headers_for(self, client_headers: Mapping[str, str],
                    target: UpstreamTarget | None = None) -> dict[str, str]:
        """The original's upstream headers: our key or the client's, plus OpenRouter attribution
        (and the target's forwarded headers)."""
        target = target or self.target
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if target.api_key:
            if target.key_header == "x-api-key":
                headers["x-api-key"] = target.api_key
            else:
                headers["Authorization"] = f"Bearer {target.api_key}"
        else:
            token = safe_client_value(bearer_token(client_headers.get("Authorization")))
            if token:
                headers["Authorization"] = f"Bearer {token}"
            for name in target.client_key_headers:
                if name != "Authorization":
                    value = safe_client_value(client_headers.get(name))
                    if value:
                        headers[name] = value
        for name in target.forwarded_headers:
            value = safe_client_value(client_headers.get(name))
            if value:
                headers[name] = value
        referer = self.referer or safe_client_value(client_headers.get("HTTP-Referer"))
        if referer:
            headers["HTTP-Referer"] = referer
        title = self.title or safe_client_value(client_headers.get("X-Title"))
        if title:
            headers["X-Title"] = title
        return headers

    def reset_last_status(self) -> None:
        """Forget the previous request's upstream status (called as each request starts)."""
        self._local.last_status = None

    def last_status(self) -> int | None:
        """The status the upstream answered this thread's current request with, if it answered."""
        return getattr(self._local, "last_status", None)

    def open(self, method: str, path: str, client_headers: Mapping[str, str],
             body: bytes | None = None, target: UpstreamTarget | None = None) -> UpstreamStream:
        """Send the request and return once the status and headers are in."""
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            # The adapter never follows redirects; proxies={} as trust_env=False would give:
            # the upstream is configured here, not by proxy environment variables.
            response = self._transport().send(
                self._prepared(method, path, client_headers, body, target or self.target), stream=True,
                timeout=self._timeout, verify=True, cert=None, proxies={},
            )
        except requests.exceptions.ConnectTimeout as exc:
            raise UpstreamTimeout(f"Could not connect to the upstream in time: {_reason(exc)}") from exc
        except requests.exceptions.Timeout as exc:
            raise UpstreamTimeout("The upstream did not answer in time.") from exc
        except requests.exceptions.RequestException as exc:
            raise UpstreamFailed(f"Upstream request failed: {_reason(exc)}") from exc
        self._local.last_status = response.status_code
        if 300 <= response.status_code < 400:
            response.close()
            raise UpstreamFailed(
                f"The upstream answered with a redirect ({response.status_code}); redirects are "
                "not followed, so the request and its key never go elsewhere."
            )
        return UpstreamStream(response.status_code, dict(response.headers), response, deadline, started)

    def request(self, method: str, path: str, client_headers: Mapping[str, str],
                body: bytes | None = None, target: UpstreamTarget | None = None) -> UpstreamReply:
        """The whole answer, within the deadline."""
        stream = self.open(method, path, client_headers, body, target)
        try:
            data = stream.read_all()
        finally:
            stream._response.close()
        return UpstreamReply(stream.status, stream.headers, data, time.monotonic() - stream.started)


def _reason(exc: Exception) -> str:
    """A short cause without internals (no addresses of objects, no tracebacks)."""
    text = str(exc.__class__.__name__)
    reason = getattr(exc, "args", ())
    if reason and isinstance(reason[0], Exception):
        inner = reason[0]
        text = getattr(inner, "reason", inner).__class__.__name__
    return text
