"""What the object-store tests share: a TCP proxy in front of the real S3 server that
counts the bytes the server sends and can slow its answers, so a test can see how much of
an object crossed the wire and how many fetches were in flight at once."""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Optional


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; ``delay_s`` holds each answer's
    first bytes back that long. ``to_client``: bytes the server sent through it;
    ``connections``: connections the client opened."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port, self.delay_s = target_port, delay_s
        self.to_client = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.to_client = 0
            self.connections = 0

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:
            client.close()
            return
        asked = threading.Event()  # a request went up since the last answer began
        threading.Thread(target=self._requests, args=(client, server, asked), daemon=True).start()
        # The server's bytes are read as fast as it sends them, whatever the client takes:
        # to_client counts what the server sent, not what the client chose to read.
        held: queue.Queue[Optional[bytes]] = queue.Queue()
        threading.Thread(target=self._deliver, args=(held, client, server), daemon=True).start()
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if asked.is_set() and self.delay_s:
                    time.sleep(self.delay_s)  # each answer, on reused connections too
                asked.clear()
                with self._lock:
                    self.to_client += len(data)
                held.put(data)
        except OSError:
            pass
        held.put(None)

    def _requests(self, client: socket.socket, server: socket.socket, asked: threading.Event) -> None:
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                asked.set()
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _deliver(self, held: queue.Queue, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                data = held.get()
                if data is None:
                    break
                client.sendall(data)
        except OSError:
            pass
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
