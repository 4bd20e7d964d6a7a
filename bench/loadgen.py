"""A small keep-alive HTTP/1.1 load generator: several processes, each with a few threads.

Each thread owns one connection and sends pre-built request bytes, so the client's cost per
request is a send, a recv and a header split. Requests whose body contains ``@@N@@`` get a
unique value there on every send (to make misses). Figures are wall-clock latencies measured
around each request, to the last byte of the answer.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field

UNIQUE = b"@@@@@@@@@@UNIQUE@@@@@@@@@@"  # 26 bytes, replaced by a unique id of the same length


def build_request(path: str, body: bytes, extra_headers: dict[str, str] | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in (extra_headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive connection that understands Content-Length and chunked answers."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def _take_line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        return line

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send(self, raw: bytes) -> Reply:
        self.sock.sendall(raw)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self._take_line().split(b";")[0], 16)
                if size == 0:
                    while self._take_line():
                        pass
                    break
                parts.append(self._take(size))
                self._take_line()
            body = b"".join(parts)
        else:  # read to close
            try:
                while True:
                    self._fill()
            except ConnectionError:
                pass
            body, self.buffer = self.buffer, b""
        return Reply(status, headers, body)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    started: float = 0.0
    ended: float = 0.0
    replies: list[Reply] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.count / max(self.ended - self.started, 1e-9)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _unique(raw: bytes, tag: str, number: int) -> bytes:
    if UNIQUE not in raw:
        return raw
    # Same length for every number, so the Content-Length header stays right.
    return raw.replace(UNIQUE, f"{tag}-{number}".rjust(len(UNIQUE), "0").encode())


def _thread_loop(port, raw, tag, deadline, quota, out, lock, keep_replies, warmup):
    latencies = []
    errors = 0
    replies = []
    try:
        conn = Connection(port)
    except OSError:
        with lock:
            out.errors += quota or 1
        return
    number = 0
    try:
        for _ in range(warmup):
            number += 1
            conn.send(_unique(raw, tag, number))
        while time.monotonic() < deadline and (quota is None or len(latencies) < quota):
            number += 1
            request = _unique(raw, tag, number)
            began = time.monotonic()
            try:
                reply = conn.send(request)
            except (OSError, ValueError):
                errors += 1
                conn.close()
                conn = Connection(port)
                continue
            latencies.append(time.monotonic() - began)
            if reply.status != 200:
                errors += 1
            if keep_replies:
                replies.append(reply)
    finally:
        conn.close()
    with lock:
        out.latencies.extend(latencies)
        out.errors += errors
        out.replies.extend(replies)


def _process_run(args):
    port, raw, threads, duration, quota, proc_index, warmup, start_at = args
    out = Result()
    lock = threading.Lock()
    while time.monotonic() < start_at:
        time.sleep(0.001)
    started = time.monotonic()
    deadline = started + duration
    workers = [
        threading.Thread(target=_thread_loop, args=(
            port, raw, f"{os.urandom(4).hex()}p{proc_index}t{index}", deadline, quota, out, lock,
            False, warmup))
        for index in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return out.latencies, out.errors, started, time.monotonic()


def run_load(port: int, raw: bytes, *, connections: int, duration: float, processes: int = 1,
             quota: int | None = None, warmup: int = 3) -> Result:
    """Keep ``connections`` busy for ``duration`` seconds (or ``quota`` requests each)."""
    processes = max(1, min(processes, connections))
    per_process = [connections // processes + (1 if i < connections % processes else 0)
                   for i in range(processes)]
    start_at = time.monotonic() + 0.3
    jobs = [(port, raw, n, duration, quota, i, warmup, start_at) for i, n in enumerate(per_process)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_process_run, jobs)
    result = Result()
    result.started = min(part[2] for part in parts)
    result.ended = max(part[3] for part in parts)
    for latencies, errors, _, _ in parts:
        result.latencies.extend(latencies)
        result.errors += errors
    return result


def _burst_process(args):
    port, raws, start_at = args
    connections = [Connection(port) for _ in raws]
    results: list = [None] * len(raws)

    def one(index):
        try:
            reply = connections[index].send(raws[index])
            results[index] = (time.monotonic(), reply.status, reply.headers, reply.body)
        except OSError as exc:
            results[index] = (time.monotonic(), 0, {}, repr(exc).encode())

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(raws))]
    while time.monotonic() < start_at:
        time.sleep(0.0005)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for conn in connections:
        conn.close()
    return results


def burst(port: int, raws: list[bytes], *, processes: int = 4, on_start=None) -> tuple[float, list]:
    """Send every request at once, each on its own connection; (wall seconds, replies)."""
    chunks = [raws[i::processes] for i in range(processes)]
    start_at = time.monotonic() + 0.5
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        pending = pool.map_async(_burst_process, [(port, chunk, start_at) for chunk in chunks])
        if on_start is not None:
            while time.monotonic() < start_at:
                time.sleep(0.001)
            on_start()
        parts = pending.get()
    replies = [reply for part in parts for reply in part]
    wall = max(reply[0] for reply in replies) - start_at
    return wall, replies
