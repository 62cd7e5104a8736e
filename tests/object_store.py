"""Local object stores for the tests: moto's S3 server, the GCS emulator, and a fault-injecting
proxy in front of S3.

The GCS emulator runs in a process of its own: pyarrow's GCS file holds the GIL while it opens its
first download (``NativeFile.closed`` starts it), so an emulator thread in the test's process
could never answer and the test would hang.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

CHUNK = 65536


def unique_bucket_name() -> str:
    """A fresh valid bucket name (lower case, 3-63 characters), so no test sees another's objects."""
    return f"asd-test-{uuid.uuid4().hex[:16]}"


class S3Server:
    """moto's S3 server on a free port of 127.0.0.1, in a thread of the test process."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.address = (host, port)

    def client(self):
        """A boto3 client, independent of the code under test, for setting up and checking buckets."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def create_bucket(self) -> str:
        name = unique_bucket_name()
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Remove the bucket with every object in it (moto keeps them in memory for the session)."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)

    def stop(self) -> None:
        self._server.stop()


_GCS_SERVE = """
import sys
from functools import partial
from http.server import ThreadingHTTPServer

from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that stopped reading
            super().handle_error(request, client_address)


server = Server(("127.0.0.1", 0), partial(RequestHandler, Storage(use_memory_fs=True)))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class GcsServer:
    """The GCS emulator, in memory, on a free port of 127.0.0.1, in a child process.

    Threaded, unlike the emulator's own server: pyarrow leaves a download it stopped reading
    open, and a one-request-at-a-time server would wait on it forever.
    """

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _GCS_SERVE], stdout=subprocess.PIPE, text=True
        )
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the GCS emulator did not start (it printed {line!r})")
        self.port = int(line)
        self.endpoint = f"127.0.0.1:{self.port}"  # pyarrow's endpoint_override, with scheme="http"

    def filesystem(self):
        """A pyarrow GCS client for this emulator (anonymous: the emulator checks no credentials)."""
        from datetime import timedelta

        from pyarrow.fs import GcsFileSystem

        return GcsFileSystem(
            anonymous=True,
            scheme="http",
            endpoint_override=self.endpoint,
            retry_time_limit=timedelta(seconds=5),
        )

    def _call(self, method: str, path: str, body: bytes | None = None) -> None:
        import urllib.request

        request = urllib.request.Request(
            f"http://{self.endpoint}/storage/v1/{path}",
            data=body,
            headers={"Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def create_bucket(self) -> str:
        import json

        name = unique_bucket_name()
        self._call("POST", "b?project=asd-test", json.dumps({"name": name}).encode())
        return name

    def delete_bucket(self, name: str) -> None:
        """Remove the bucket with every object in it."""
        import json
        import urllib.parse
        import urllib.request

        listing = f"http://{self.endpoint}/storage/v1/b/{name}/o"
        with urllib.request.urlopen(listing, timeout=10) as response:
            items = json.load(response).get("items", [])
        for item in items:
            self._call("DELETE", f"b/{name}/o/{urllib.parse.quote(item['name'], safe='')}")
        self._call("DELETE", f"b/{name}")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()


SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)


@dataclass
class Seen:
    """One request the proxy received, and what it did with it ("" forwarded, else the fault)."""

    method: str
    path: str
    range: str | None
    at: float
    fault: str = ""


@dataclass
class _Fault:
    times: int  # how many more requests it hits
    pattern: re.Pattern | None = None  # searched in the request's path ("/bucket/key?query")
    methods: frozenset[str] = frozenset()  # empty: every method
    after_bytes: int = 0  # for a drop: body bytes forwarded before the connection closes

    def hits(self, seen: Seen) -> bool:
        return (
            self.times > 0
            and (not self.methods or seen.method in self.methods)
            and (self.pattern is None or self.pattern.search(seen.path) is not None)
        )


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 server, with faults programmed per test.

    ``drop_get_body`` closes the client's connection after part of a GET's response body
    (a shard cut mid-download); ``slow_down`` answers 503 SlowDown without asking the server.
    Every request is recorded (``requests``: method, path, Range, time, fault), so a test can
    count a client's attempts and their spacing. Each fault hits the first ``times`` requests
    that match it, then requests pass through unchanged. Each request goes to the server on a
    connection of its own; the client's connection is kept alive as the client asks.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._seen: list[Seen] = []
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    def drop_get_body(self, pattern: str, after_bytes: int, times: int = 1) -> None:
        """The first ``times`` GETs whose path matches ``pattern`` (a regex) and whose answer has
        more than ``after_bytes`` bytes of body lose their connection after ``after_bytes`` bytes."""
        fault = _Fault(times, re.compile(pattern), frozenset({"GET"}), after_bytes)
        with self._lock:
            self._faults["drop"] = fault

    def slow_down(self, times: int = 1, methods: tuple[str, ...] = (), pattern: str | None = None) -> None:
        """The first ``times`` requests (of ``methods``, all if empty; path matching ``pattern``)
        get a 503 SlowDown, as S3 answers a client over its request rate."""
        fault = _Fault(times, re.compile(pattern) if pattern else None, frozenset(methods))
        with self._lock:
            self._faults["slow_down"] = fault

    def injected(self, fault: str) -> int:
        """How many requests the fault ("drop" or "slow_down") has hit so far."""
        with self._lock:
            return sum(1 for seen in self._seen if seen.fault == fault)

    def requests(self, method: str | None = None, pattern: str | None = None) -> list[Seen]:
        """The requests received so far, in order (of ``method``; path matching ``pattern``)."""
        with self._lock:
            return [
                seen
                for seen in self._seen
                if (method is None or seen.method == method)
                and (pattern is None or re.search(pattern, seen.path))
            ]

    def reset(self) -> None:
        """Forget the faults and the requests seen (a test's set-up requests, say)."""
        with self._lock:
            self._faults.clear()
            self._seen.clear()

    def stop(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone does not
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            _close(connection)
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed: the proxy stops
                return
            with self._lock:
                self._connections.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take(self, name: str, seen: Seen, body_length: int | None = None) -> _Fault | None:
        """The fault ``name`` if it hits this request (it then counts one hit less); a drop only
        hits a body longer than its cut."""
        with self._lock:
            fault = self._faults.get(name)
            if fault is None or not fault.hits(seen):
                return None
            if name == "drop" and body_length is not None and body_length <= fault.after_bytes:
                return None
            fault.times -= 1
            seen.fault = name
            return fault

    def _serve(self, client: socket.socket) -> None:
        """Relay the requests of one client connection (kept alive) one at a time."""
        reader = client.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                request_line, headers = head
                method, path, _ = request_line.split(" ", 2)
                if headers.pop("expect", "").lower() == "100-continue":  # else curl waits 1 s to send it
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(reader, headers)
                seen = Seen(method, path, headers.get("range"), time.monotonic())
                with self._lock:
                    self._seen.append(seen)
                if self._take("slow_down", seen):
                    client.sendall(_slow_down_response(method))
                elif not self._forward(client, seen, request_line, headers, body):
                    return
        except OSError:
            return
        finally:
            reader.close()
            _close(client)
            with self._lock:
                self._connections.discard(client)

    def _forward(
        self, client: socket.socket, seen: Seen, request_line: str, headers: dict, body: bytes
    ) -> bool:
        """Send one request upstream on a connection of its own and relay the answer; False when
        the client's connection must end (a dropped body, or a body that ends with the server's
        connection)."""
        headers = {**headers, "connection": "close"}
        with (
            socket.create_connection(self.upstream, timeout=30) as upstream,
            upstream.makefile("rb") as answer,
        ):
            upstream.sendall(_encode_head(request_line, headers) + body)
            head = _read_head(answer)
            if head is None:
                return False
            status_line, response_headers = head
            status = int(status_line.split(" ", 2)[1])
            has_body = seen.method != "HEAD" and status not in (204, 304) and status >= 200
            length = int(response_headers["content-length"]) if "content-length" in response_headers else None
            # The server's "close" is about its connection to the proxy; the client's stays
            # open unless only the end of the connection can tell it where the body ends.
            response_headers["connection"] = "close" if has_body and length is None else "keep-alive"
            client.sendall(_encode_head(status_line, response_headers))
            if not has_body:
                return True
            drop = self._take("drop", seen, length) if status in (200, 206) else None
            cut_at = drop.after_bytes if drop else None
            sent = 0
            while length is None or sent < length:
                if sent == cut_at:
                    return False  # the drop: the connection ends mid-body
                wanted = CHUNK if length is None else min(CHUNK, length - sent)
                data = answer.read1(wanted if cut_at is None else min(wanted, cut_at - sent))
                if not data:  # the server closed: the client cannot tell the end otherwise
                    return False
                client.sendall(data)
                sent += len(data)
            return True


def _read_head(reader) -> tuple[str, dict[str, str]] | None:
    """The start line and headers (names in lower case) of one HTTP message; None at end of stream."""
    start = reader.readline()
    if not start:
        return None
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return start.decode("latin-1").rstrip("\r\n"), headers


def _read_body(reader, headers: dict[str, str]) -> bytes:
    """A request's body, chunked framing kept as it came (the server reads the same headers)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size_line = reader.readline()
            parts.append(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := reader.readline()) not in (b"\r\n", b"\n", b""):
                    parts.append(trailer)
                parts.append(b"\r\n")
                return b"".join(parts)
            parts.append(reader.read(size + 2))
    return reader.read(int(headers.get("content-length", 0)))


def _encode_head(start_line: str, headers: dict[str, str]) -> bytes:
    lines = [start_line, *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _slow_down_response(method: str) -> bytes:
    body = b"" if method == "HEAD" else SLOW_DOWN_BODY
    headers = {
        "content-type": "application/xml",
        "content-length": str(len(body)),
        "x-amz-request-id": "fault-proxy",
    }
    return _encode_head("HTTP/1.1 503 Slow Down", headers) + body


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
