"""An HTTP proxy in front of moto that can hold one kind of request: a crash-point for tests."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class GateProxy:
    """Forwards everything to `upstream`; the first request whose body contains `hold_on` waits
    until `release()` and is then forwarded anyway (as a request already on the wire would be),
    even if the client that sent it has died meanwhile."""

    def __init__(self, upstream: str, hold_on: bytes, *, armed: bool = True) -> None:
        self.armed = armed
        self.reached = threading.Event()
        self.forwarded = threading.Event()
        self._release = threading.Event()
        self._held = False
        self._lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hold = False
                with proxy._lock:
                    if proxy.armed and not proxy._held and hold_on in body:
                        proxy._held = hold = True
                if hold:
                    proxy.reached.set()
                    proxy._release.wait(timeout=120)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                upstream_response = conn.getresponse()
                payload = upstream_response.read()
                if hold:
                    proxy.forwarded.set()
                try:
                    self.send_response(upstream_response.status)
                    for key, value in upstream_response.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client died while held: that is the point

            do_GET = do_POST = do_PUT = do_DELETE = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> GateProxy:
        self._thread.start()
        return self

    def release(self) -> None:
        self._release.set()

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
