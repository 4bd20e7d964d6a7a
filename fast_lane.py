"""The known-hit lane: repeats of request bytes already seen are answered before Flask runs.

Agents resend the same bytes over and over. For those the proxy already knows the key (its
known-bytes table), so a hit needs only the body's digest and one store lookup, and Flask's request
machinery would cost as much again as that. This WSGI middleware answers such hits itself, with
the bytes and headers the Flask path sends (``StoredReply``), after the same guards, and counts and
logs them the same way. Everything else goes to Flask untouched, the body put back for it to read:
new bytes, requests with cache-control headers, anything a guard would refuse (Flask refuses it
with the proper error), bodies without a Content-Length.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any, Callable, Iterable

import guard
from apis import API_LIST, Api
from access_log import AccessLog
from config import Settings
from errors import ApiError
from metrics import Monitor, model_label
from proxy import CompletionProxy

log = logging.getLogger("computer_use_cache.fast_lane")

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


class KnownHitLane:
    def __init__(self, app: WsgiApp, proxy: CompletionProxy, settings: Settings, monitor: Monitor,
                 access_log: AccessLog, cors_headers: list[tuple[str, str]],
                 apis: Iterable[Api] = API_LIST):
        self.app = app
        self.proxy = proxy
        self.settings = settings
        self.monitor = monitor
        self.access_log = access_log
        self.cors_headers = cors_headers
        self.apis: dict[str, Api] = {route: api for api in apis for route in api.routes}

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        api = self.apis.get(environ.get("PATH_INFO", "")) \
            if environ.get("REQUEST_METHOD") == "POST" else None
        if api is None:
            return self.app(environ, start_response)
        started = time.perf_counter()
        body = self._admitted_body(environ)
        if body is None:
            return self.app(environ, start_response)
        try:
            reply = self.proxy.known_hit(api, self.proxy.fingerprint(api, body, environ))
        except Exception as exc:  # never a 500 from here: Flask answers it, as it would anyway
            log.warning("known-hit lane passed a request on after %s", type(exc).__name__)
            reply = None
        if reply is None:
            return self.app(environ, start_response)
        headers = [*reply.headers.items(), ("Content-Type", reply.content_type)]
        if not reply.stream:
            headers.append(("Content-Length", str(len(reply.body))))
        start_response("200 OK", headers + self.cors_headers)
        route, key = environ["PATH_INFO"], reply.headers.get("X-Computer-Use-Cache-Key")
        seconds = time.perf_counter() - started
        self.monitor.count_response(route, "HIT", key, False, seconds, model_label(reply.model), api.mode)
        self.access_log.write("POST", route, 200, "HIT", key, None, seconds)
        return [reply.body]

    def _admitted_body(self, environ: dict[str, Any]) -> bytes | None:
        """The body of a request every guard admits, with a declared length; None otherwise.

        Once read, the body is put back as the request's input, so Flask reads the same bytes.
        """
        try:
            guard.check_request(environ, self.settings.proxy_api_keys, self.settings.max_request_bytes,
                                api_path=True, json_route=True)
        except ApiError:
            return None
        length = guard.declared_length(environ)
        if not length:
            return None
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)
        return body if len(body) == length else None
