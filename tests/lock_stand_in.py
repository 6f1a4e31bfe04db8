"""What the lock tests of the clouds whose emulators keep no locks share: ``WireProxy``, an HTTP
proxy that records the wire and stands in for what an emulator lacks, and small helpers."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.servers import HOST
from tests.storage_contract import MIB
from vq_tasks.storage.base import Storage

NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Exchange:
    """A request the proxy received (header names in lower case), or the answer it gave."""

    method: str = ""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    status: int = 0


Forward = Callable[[], Exchange]
Handler = Callable[[Exchange, Forward], Exchange]


class WireProxy:
    """An HTTP proxy on a free port of 127.0.0.1 in front of an emulator. It records every request
    in ``requests``; ``handler(request, forward)`` returns the answer, by default the emulator's
    (``forward()``), or one of its own where the emulator lacks the real service's behaviour."""

    def __init__(self, upstream_port: int, handler: Handler | None = None):
        self.requests: list[Exchange] = []
        self.handler: Handler = handler or (lambda request, forward: forward())
        self._upstream = upstream_port
        self._server = ThreadingHTTPServer((HOST, 0), self._handler_class())
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def serve(self) -> None:
                proxy._serve(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = serve

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def _serve(self, client: BaseHTTPRequestHandler) -> None:
        headers = {name.lower(): value for name, value in client.headers.items()}
        assert "transfer-encoding" not in headers, "the proxy reads bodies by Content-Length only"
        body = client.rfile.read(int(headers.get("content-length") or 0))
        request = Exchange(client.command, client.path, headers, body)
        self.requests.append(request)
        answer = self.handler(request, lambda: self._forward(request))
        client.send_response(answer.status)
        for name, value in answer.headers.items():
            if name.lower() not in NOT_FORWARDED:
                client.send_header(name, value)
        if request.method == "HEAD":  # a HEAD's Content-Length is the object's size: pass it on
            client.send_header("Content-Length", answer.headers.get("content-length", "0"))
            client.end_headers()
            return
        client.send_header("Content-Length", str(len(answer.body)))
        client.end_headers()
        client.wfile.write(answer.body)

    def _forward(self, request: Exchange) -> Exchange:
        connection = http.client.HTTPConnection(HOST, self._upstream, timeout=60)
        try:
            connection.request(
                request.method, request.path, body=request.body or None, headers=request.headers
            )
            response = connection.getresponse()
            headers = {name.lower(): value for name, value in response.getheaders()}
            return Exchange(request.method, request.path, headers, response.read(), response.status)
        finally:
            connection.close()


def write_locked(storage: Storage, name: str, data: bytes, until: datetime) -> None:
    with storage.open_write(name, retain_until=until) as out:
        for offset in range(0, len(data), MIB):
            out.write(data[offset : offset + MIB])


def soon(days: int = 1) -> datetime:
    """A retain-until time with microseconds, as retention computes them."""
    return datetime.now(UTC) + timedelta(days=days, microseconds=123_456)


def whole_second_up(when: datetime) -> datetime:
    return when.replace(microsecond=0) + timedelta(seconds=1)
