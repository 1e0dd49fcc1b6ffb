"""A TCP proxy in front of PostgreSQL that loses the answer to one COMMIT.

Sessions connect to the proxy instead of the server (with ``sslmode=disable``, so
the protocol can be read). Each session's startup message names its
``application_name`` (etl's is ``etl:ROLE:PID:HOST``). Once the chosen session has
sent its ``nth`` ``COMMIT``, the proxy forwards it, lets the server finish it, and
then closes both sockets instead of passing the server's answer on: the
transaction is committed, and the client only sees its connection drop — the
"commit outcome unknown" case every retrying client must get right.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

_COMMIT = b"Q" + (4 + len(b"COMMIT\x00")).to_bytes(4, "big") + b"COMMIT\x00"


@dataclass
class CommitDropper:
    upstream: tuple[str, int]
    app_prefix: str                 # e.g. "etl:target:" — which sessions to watch
    nth: int = 3                    # drop the answer to this COMMIT of such a session
    dropped: threading.Event = field(default_factory=threading.Event)
    _commits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        """Listen on a free local port (returned); serve until the process ends."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return self._listener.getsockname()[1]

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._session, args=(client, server), daemon=True).start()

    def _session(self, client: socket.socket, server: socket.socket) -> None:
        startup = _read_exact(client, 4)
        startup += _read_exact(client, int.from_bytes(startup, "big") - 4)
        watched = self.app_prefix.encode() in startup
        server.sendall(startup)
        committed = threading.Event()  # set when the COMMIT to lose has been forwarded
        threading.Thread(target=self._answers, args=(server, client, committed),
                         daemon=True).start()
        try:
            buffer = b""
            while chunk := client.recv(65536):
                buffer += chunk
                forward, buffer = _whole_messages(buffer)
                for message in forward:
                    if watched and message == _COMMIT and self._is_the_one():
                        committed.set()
                    server.sendall(message)
        except OSError:
            pass
        finally:
            _close(server)

    def _is_the_one(self) -> bool:
        with self._lock:
            if self.dropped.is_set():
                return False
            self._commits += 1
            return self._commits == self.nth

    def _answers(self, server: socket.socket, client: socket.socket,
                 committed: threading.Event) -> None:
        """Server to client; after the lost COMMIT, wait for its ReadyForQuery, then hang up."""
        try:
            buffer = b""
            while chunk := server.recv(65536):
                buffer += chunk
                messages, buffer = _whole_messages(buffer)
                for message in messages:
                    if committed.is_set():
                        if message[:1] == b"Z":  # the server is done with the COMMIT
                            self.dropped.set()
                            _close(client)
                            _close(server)
                            return
                        continue  # its CommandComplete is never passed on
                    client.sendall(message)
        except OSError:
            pass
        finally:
            _close(client)


def _whole_messages(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split protocol messages (type byte, 32-bit length counting itself, body)."""
    out = []
    while len(buffer) >= 5:
        end = 1 + int.from_bytes(buffer[1:5], "big")
        if len(buffer) < end:
            break
        out.append(buffer[:end])
        buffer = buffer[end:]
    return out, buffer


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed during startup")
        data += chunk
    return data


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
