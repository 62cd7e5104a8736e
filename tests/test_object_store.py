"""The tests' own object stores (tests/object_store.py): the servers answer pyarrow's clients,
buckets come and go, and the fault proxy injects each fault exactly as often as it is told."""

from __future__ import annotations

import http.client
import os
import socket
from urllib.parse import urlsplit

import pytest
from object_store import FaultProxy, GcsServer, S3Server
from pyarrow import fs as pafs


def _s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1")


# moto routes a request by its Authorization header, but checks no signature.
_UNCHECKED_SIGNATURE = (
    "AWS4-HMAC-SHA256 Credential=key/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
)


def _get(endpoint: str, path: str) -> http.client.HTTPResponse:
    """A plain GET, so the test sees the proxy's bytes, not a client's retry."""
    connection = http.client.HTTPConnection(urlsplit(endpoint).netloc, timeout=10)
    connection.request("GET", path, headers={"Authorization": _UNCHECKED_SIGNATURE})
    return connection.getresponse()


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_s3_bucket_takes_writes_and_listings(s3_server, s3_bucket):
    assert s3_bucket.startswith("s3://")
    name = s3_bucket.removeprefix("s3://")
    fs = _s3(s3_server.endpoint)
    data = os.urandom(6 * 2**20)  # over pyarrow's 5 MiB part: a multipart upload
    with fs.open_output_stream(f"{name}/a/shard.tar") as out:
        out.write(data)
    with fs.open_input_file(f"{name}/a/shard.tar") as source:
        assert source.read_at(100, 5 * 2**20) == data[5 * 2**20 : 5 * 2**20 + 100]
    listed = fs.get_file_info(pafs.FileSelector(name, recursive=True))
    assert [(info.path, info.size) for info in listed if info.is_file] == [(f"{name}/a/shard.tar", len(data))]


def test_s3_buckets_are_fresh_and_deleted_with_their_objects(s3_server):
    first, second = s3_server.create_bucket(), s3_server.create_bucket()
    assert first != second
    client = s3_server.client()
    client.put_object(Bucket=first, Key="k", Body=b"x")
    s3_server.delete_bucket(first)
    names = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
    assert first not in names and second in names
    s3_server.delete_bucket(second)


def test_gcs_emulator_answers_pyarrow(gcs_server, gcs_bucket):
    name = gcs_bucket.removeprefix("gs://")
    fs = gcs_server.filesystem()
    data = os.urandom(20 * 2**20)  # pyarrow uploads it in several resumable chunks
    with fs.open_output_stream(f"{name}/a/shard.tar") as out:
        out.write(data)
    listed = fs.get_file_info(pafs.FileSelector(name, recursive=True))
    assert [(info.path, info.size) for info in listed if info.is_file] == [(f"{name}/a/shard.tar", len(data))]
    with fs.open_input_file(f"{name}/a/shard.tar") as source:
        assert source.read_at(1000, 15 * 2**20) == data[15 * 2**20 : 15 * 2**20 + 1000]
    with fs.open_input_stream(f"{name}/a/shard.tar", buffer_size=8 * 2**20, compression=None) as source:
        assert source.read() == data


def test_servers_stop_and_free_their_ports():
    s3 = S3Server()
    gcs = GcsServer()
    gcs_address = ("127.0.0.1", gcs.port)
    assert not _refused(s3.address) and not _refused(gcs_address)
    s3.stop()
    gcs.stop()
    assert _refused(s3.address) and _refused(gcs_address)


@pytest.fixture
def stored(s3_server, s3_bucket) -> str:
    """The path of a 100 kB object in a fresh bucket."""
    name = s3_bucket.removeprefix("s3://")
    s3_server.client().put_object(Bucket=name, Key="shard-000.tar", Body=bytes(range(256)) * 400)
    return f"/{name}/shard-000.tar"


def test_proxy_answers_slow_down_the_given_number_of_times(fault_proxy, stored):
    fault_proxy.slow_down(times=2, methods=("GET",))
    for _ in range(2):
        response = _get(fault_proxy.endpoint, stored)
        assert response.status == 503
        assert b"<Code>SlowDown</Code>" in response.read()
    response = _get(fault_proxy.endpoint, stored)
    assert response.status == 200 and response.read() == bytes(range(256)) * 400
    assert fault_proxy.injected("slow_down") == 2
    assert [seen.fault for seen in fault_proxy.requests("GET")] == ["slow_down", "slow_down", ""]


def test_proxy_drops_a_get_mid_body_once(fault_proxy, stored):
    fault_proxy.drop_get_body(r"shard-\d+\.tar$", after_bytes=1000, times=1)
    response = _get(fault_proxy.endpoint, stored)
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    assert len(cut.value.partial) == 1000
    assert _get(fault_proxy.endpoint, stored).read() == bytes(range(256)) * 400
    assert fault_proxy.injected("drop") == 1


def test_proxy_faults_spare_what_they_do_not_match(s3_server, fault_proxy, stored):
    bucket = stored.split("/")[1]
    s3_server.client().put_object(Bucket=bucket, Key="other.bin", Body=b"small")
    fault_proxy.drop_get_body(r"shard-", after_bytes=1000)
    fault_proxy.slow_down(methods=("PUT",))
    assert _get(fault_proxy.endpoint, f"/{bucket}/other.bin").read() == b"small"
    fault_proxy.drop_get_body(r"other", after_bytes=1000)  # the body is shorter than the cut
    assert _get(fault_proxy.endpoint, f"/{bucket}/other.bin").read() == b"small"
    assert fault_proxy.injected("drop") == fault_proxy.injected("slow_down") == 0


def test_proxy_reset_forgets_faults_and_requests(fault_proxy, stored):
    _get(fault_proxy.endpoint, stored).read()
    fault_proxy.slow_down(times=5)
    fault_proxy.reset()
    assert _get(fault_proxy.endpoint, stored).status == 200
    assert [(seen.method, seen.fault) for seen in fault_proxy.requests()] == [("GET", "")]


def test_pyarrow_sees_the_proxys_faults(fault_proxy, stored):
    """Through the proxy, pyarrow's S3 client meets each fault and retries it (its default: 3 attempts)."""
    fs = _s3(fault_proxy.endpoint)
    fault_proxy.slow_down(times=1, methods=("HEAD",))
    fault_proxy.drop_get_body("shard", after_bytes=1000, times=1)
    with fs.open_input_stream(stored.lstrip("/"), buffer_size=8 * 2**20, compression=None) as source:
        assert source.read() == bytes(range(256)) * 400
    assert fault_proxy.injected("slow_down") == fault_proxy.injected("drop") == 1
    assert [(seen.method, seen.fault) for seen in fault_proxy.requests()] == [
        ("HEAD", "slow_down"),
        ("HEAD", ""),
        ("GET", "drop"),
        ("GET", ""),
    ]


def test_proxy_stops_with_a_client_connected(s3_server, stored):
    proxy = FaultProxy(s3_server.address)
    kept_alive = http.client.HTTPConnection(urlsplit(proxy.endpoint).netloc, timeout=5)
    kept_alive.request("GET", stored, headers={"Authorization": _UNCHECKED_SIGNATURE})
    assert kept_alive.getresponse().read() == bytes(range(256)) * 400
    proxy.stop()
    assert kept_alive.sock.recv(1) == b""  # the proxy closed it
    kept_alive.close()
    assert _refused(("127.0.0.1", urlsplit(proxy.endpoint).port))
