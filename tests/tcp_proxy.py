"""A TCP proxy on 127.0.0.1 that a test can cut and restore: a database outage without
touching the shared PostgreSQL server (other test runs use it at the same time).

    with TcpProxy(5432) as proxy:            # proxy.port forwards to 127.0.0.1:5432
        proxy.cut()                          # live connections reset, new ones refused
        proxy.restore()                      # accepting again on the same port
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Any


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connections = 0  # accepted since start (tests check that clients reconnected)

    def __enter__(self) -> TcpProxy:
        self.restore()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.setblocking(False)
        self.port = s.getsockname()[1]
        self._listener = s

    def restore(self) -> None:
        """Accept connections again (same port)."""
        with self._lock:
            if self._listener is None:
                self._listen()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def cut(self) -> None:
        """Reset every live connection and refuse new ones until restore()."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for a, b in self._pairs:
                for s in (a, b):
                    try:
                        # RST rather than FIN: what a crashed server or a cut cable looks like.
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        s.close()
                    except OSError:
                        pass
            self._pairs.clear()

    def close(self) -> None:
        self.cut()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        with self._lock:
            listener = self._listener
        if listener is None:
            return
        sel.register(listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                if sock is listener:
                    try:
                        client, _ = listener.accept()
                        upstream = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        continue
                    client.setblocking(False)
                    upstream.setblocking(False)
                    peers[client], peers[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ, None)
                    sel.register(upstream, selectors.EVENT_READ, None)
                    with self._lock:
                        self._pairs.append((client, upstream))
                        self.connections += 1
                    continue
                other = peers.get(sock)  # type: ignore[arg-type]
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                    if data and other is not None:
                        other.sendall(data)
                        continue
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass
                for s in (sock, other):  # one side closed: close both
                    if s is None:
                        continue
                    try:
                        sel.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    peers.pop(s, None)  # type: ignore[arg-type]
                    try:
                        s.close()  # type: ignore[union-attr]
                    except OSError:
                        pass
        sel.close()
