"""A TCP proxy in front of the test PostgreSQL that a test can cut and restore: a lost network
or a vanished server, with any server (no root, no restart rights needed)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit


def upstream_of(dsn: str) -> tuple[str, object]:
    """("unix", path) or ("tcp", (host, port)) for a DSN."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    if host.startswith("/"):
        return "unix", str(Path(host) / f".s.PGSQL.{port}")
    return "tcp", (host, port)


class FlakyProxy:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.kind, self.address = upstream_of(dsn)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.silent = False
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def proxied_dsn(self) -> str:
        parts = urlsplit(self.dsn)
        user = parts.username or "postgres"
        password = f":{parts.password}" if parts.password else ""
        return urlunsplit(
            ("postgresql", f"{user}{password}@127.0.0.1:{self.port}", parts.path, "", "")
        )

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            if self.silent:  # accepted, never answered: a host that stopped responding
                with self.lock:
                    self.held.append(client)
                continue
            if self.kind == "unix":
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            else:
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                server.connect(self.address)  # type: ignore[arg-type]
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.silent:  # silent: swallowed, no RST, no answer
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every open connection and refuse new ones, like a server that went away."""
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def silence(self) -> None:
        """Stop answering without closing anything (no RST, no FIN): open connections get no
        reply to what they send, new ones are accepted and never answered."""
        self.silent = True

    def restore(self) -> None:
        self.up = True
        self.silent = False
        with self.lock:
            held, self.held = self.held, []
        for s in held:
            s.close()

    def close(self) -> None:
        self.cut()
        self.restore()
        self.listener.close()
