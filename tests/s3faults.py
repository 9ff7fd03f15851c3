"""An S3 endpoint that misbehaves on request: a proxy on 127.0.0.1 in front of the moto server that
refuses (an HTTP error status) or stalls (holds the connection, then drops it without answering)
the requests a rule matches, a given number of times, and forwards everything else."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


@dataclass
class Rule:
    method: str  # "PUT", "GET", ...
    path_contains: str  # a substring of the request path (bucket/key)
    times: int  # how many matching requests it catches (-1: all)
    status: int | None = None  # refuse with this status
    stall_s: float = 0.0  # or hold the request this long, then drop it
    caught: int = 0


@dataclass
class FaultyS3:
    """`with FaultyS3(moto_endpoint) as s3:` -> s3.url is the endpoint to give the client."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request

    def refuse(self, method: str, path_contains: str, times: int, status: int = 503) -> None:
        self.rules.append(Rule(method, path_contains, times, status=status))

    def stall(self, method: str, path_contains: str, times: int, seconds: float) -> None:
        self.rules.append(Rule(method, path_contains, times, stall_s=seconds))

    def count(self, method: str, path_contains: str) -> int:
        return sum(m == method and path_contains in p for m, p in self.seen)

    def __enter__(self) -> FaultyS3:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.seen.append((self.command, self.path))
                    rule = next(
                        (
                            r
                            for r in proxy.rules
                            if r.method == self.command
                            and r.path_contains in self.path
                            and (r.times < 0 or r.caught < r.times)
                        ),
                        None,
                    )
                    if rule is not None:
                        rule.caught += 1
                if rule is not None and rule.status is not None:
                    error = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                        b"<Message>refused by the test</Message></Error>"
                    )
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                if rule is not None:  # stall, then drop the connection unanswered
                    time.sleep(rule.stall_s)
                    self.close_connection = True
                    return
                up = urlsplit(proxy.upstream)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # no body, but the object's length in the header
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
