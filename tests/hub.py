"""A local stand-in for the Hugging Face Hub (and for a mirror of plain files), on 127.0.0.1.

It answers what huggingface_hub asks: `HEAD /{repo}/resolve/{revision}/{file}` with the hub's
headers (X-Repo-Commit, X-Linked-Etag = the file's sha256, X-Linked-Size) and a redirect to
`/blobs/{sha256}`, the way the real hub redirects LFS files to its CDN; `GET /blobs/{sha256}` with
byte ranges. Plain files are served by name under `/files/`. The test can damage a file, cut a
download after some bytes, or stop answering, and reads back every request it received.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "c0ffee" * 6 + "abcd"


class LocalHub:
    def __init__(self, repo: str = "gym890/diffportrait360"):
        self.repo = repo
        self.hub_files: dict[str, bytes] = {}
        self.plain_files: dict[str, bytes] = {}
        self.damaged: set[str] = set()  # served with other bytes than their hash says
        self.cut_after: dict[str, int] = {}  # file -> bytes sent before the connection drops (once)
        self.refusing: set[str] = set()  # files answered with 503 (after a cut: the server "went away")
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.bytes_sent: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, name: str) -> list[str | None]:
        """The Range headers of the GET requests for `name`'s bytes (None: from the start)."""
        paths = {f"/blobs/{hashlib.sha256(self.hub_files[name]).hexdigest()}"} if name in self.hub_files else set()
        paths.add(f"/files/{name}")
        return [header for method, path, header in self.requests if method == "GET" and path in paths]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                resolve = f"/{hub.repo}/resolve/"
                if self.path.startswith(resolve):
                    name = self.path[len(resolve) :].split("/", 1)[1]
                    if name not in hub.hub_files:
                        return self._empty(404, {"X-Error-Code": "EntryNotFound"})
                    content = hub.hub_files[name]
                    sha = hashlib.sha256(content).hexdigest()
                    return self._empty(
                        302,
                        {
                            "Location": f"{hub.url}/blobs/{sha}",
                            "X-Repo-Commit": COMMIT,
                            "X-Linked-Etag": f'"{sha}"',
                            "X-Linked-Size": str(len(content)),
                            "ETag": '"0123456789abcdef0123456789abcdef01234567"',
                        },
                    )
                if self.path.startswith("/blobs/"):
                    sha = self.path.removeprefix("/blobs/")
                    name = next((n for n, c in hub.hub_files.items() if hashlib.sha256(c).hexdigest() == sha), None)
                    if name is None:
                        return self._empty(404)
                    return self._send(name, hub.hub_files[name], body, etag=sha)
                if self.path.startswith("/files/"):
                    name = self.path.removeprefix("/files/")
                    if name not in hub.plain_files:
                        return self._empty(404)
                    content = hub.plain_files[name]
                    return self._send(name, content, body, etag=hashlib.md5(content).hexdigest())
                return self._empty(404)

            def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, name: str, content: bytes, body: bool, etag: str) -> None:
                if name in hub.refusing:
                    return self._empty(503)
                if name in hub.damaged:
                    content = bytes(255 - byte for byte in content[:64]) + content[64:]
                start = 0
                requested = self.headers.get("Range")
                if requested and requested.startswith("bytes="):
                    start = int(requested.removeprefix("bytes=").split("-")[0])
                part = content[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if not body:
                    return
                cut = hub.cut_after.pop(name, None)
                if cut is not None:
                    # the connection drops mid-file, and the server stops answering for this file
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    hub.bytes_sent[name] = hub.bytes_sent.get(name, 0) + cut
                    hub.refusing.add(name)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)
                hub.bytes_sent[name] = hub.bytes_sent.get(name, 0) + len(part)

        return Handler
