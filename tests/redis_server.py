"""A real redis-server (Debian's package, installed by `make test`) on a free 127.0.0.1 port.

No persistence (``--save ''``, no AOF), its files in a temporary directory. Tests stop, freeze
(SIGSTOP: the kernel still accepts connections, nobody answers), thaw and restart it on the same
port to make the faults a production Redis has.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MISSING = ("redis-server is not installed: the Redis store's tests need Debian's redis-server "
           "(`make test` installs it; or `apt-get install -y redis-server`)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, password: str | None = None, port: int | None = None, tls: bool = False,
                 unix: bool = False):
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError(MISSING)
        self.password = password
        self.tls = tls
        self.unix = unix
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cuc-redis-"))
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        password = self.password if password is None else password
        auth = f":{password}@" if password else ""
        if self.unix:
            return f"unix://{auth}{self.dir / 'redis.sock'}?db={db}"
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.dir / 'cert.pem'}"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                "--loglevel", "warning", "--protected-mode", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            argv[1:3] = ["--port", "0", "--tls-port", str(self.port), *self._certificate()]
        if self.unix:
            argv += ["--unixsocket", str(self.dir / "redis.sock"), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=open(self.dir / "redis.log", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-500:]}")
            if self._answers_ping():
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def _certificate(self) -> list[str]:
        """A self-signed certificate for 127.0.0.1 (Debian's openssl), which clients trust."""
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        if not cert.exists():
            if shutil.which("openssl") is None:
                raise RuntimeError("openssl is not installed: the TLS test makes its certificate with it "
                                   "(`make test` installs it)")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no"]

    def _answers_ping(self) -> bool:
        if self.tls:
            return self._answers_tls_ping()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def _answers_tls_ping(self) -> bool:
        import ssl

        context = ssl.create_default_context(cafile=str(self.dir / "cert.pem"))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server must be able to die
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Still accepting connections (the kernel does that), never answering."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
