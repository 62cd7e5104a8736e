"""The tar walk sees what Python's tarfile sees, or refuses: hostile archives, a differential
test against tarfile, and a bounded fuzz of mutated real shards."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shards, time_limit

from asd_ray.data import tar
from asd_ray.data.tar import BLOCK, tar_members
from asd_ray.errors import DataError


def tarfile_view(path: Path):
    """Regular members as Python's tarfile reads them, or None where it fails."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError):
        return None


@pytest.fixture
def our_view(open_shard):
    """The members as tar_members reads them (from a local file, or a stream of short reads in
    small windows), or "refused"."""

    def view(path: Path):
        with time_limit(5), open_shard(path) as stream:
            try:
                return [(name, bytes(data)) for name, data in tar_members(stream, str(path))]
            except DataError:
                return "refused"

    return view


def header(name: bytes, size: bytes, kind: bytes, *, prefix: bytes = b"", checksum: bool = True) -> bytes:
    """A ustar header with raw field bytes (so fields can be hostile) and a valid checksum."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124 : 124 + len(size)] = size
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[345 : 345 + len(prefix)] = prefix
    if checksum:
        block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        text = f" {key}={value}\n".encode()
        length = len(text) + 1
        length += len(str(length + len(str(length)))) - 1
        body += f"{length}".encode() + text
    return body


def archive(tmp_path: Path, *parts: bytes) -> Path:
    path = tmp_path / "hostile.tar"
    path.write_bytes(b"".join(parts) + bytes(2 * BLOCK))
    return path


def member(name: bytes, data: bytes, **kw) -> bytes:
    return header(name, b"%011o\0" % len(data), b"0", **kw) + pad(data)


def test_negative_size_is_refused_not_a_hang(tmp_path, our_view) -> None:
    path = archive(tmp_path, header(b"dir/", b"-1000", b"5"), member(b"000000.cls", b"1"))
    assert our_view(path) == "refused"


@pytest.mark.parametrize("size", [b"-1000", b"\x80\0\0\0\0\0\0\0\0\0\x10\0", b"12x", b"1 2"])
def test_sizes_that_are_not_plain_octal_are_refused(tmp_path, our_view, size: bytes) -> None:
    assert our_view(archive(tmp_path, header(b"000000.cls", size, b"0"), pad(b"1" * 16))) == "refused"


def test_a_pax_size_is_honoured_as_tarfile_honours_it(tmp_path, our_view) -> None:
    records = pax({"size": "2"})
    path = archive(
        tmp_path,
        header(b"PaxHeader", b"%011o\0" % len(records), b"x") + pad(records),
        header(b"000000.cls", b"%011o\0" % 1, b"0") + pad(b"12"),
    )
    assert our_view(path) == tarfile_view(path) == [("000000.cls", b"12")]


def test_a_pax_path_renames_the_next_member_for_every_reader(tmp_path, our_view) -> None:
    records = pax({"path": "000001.cls"})
    path = archive(
        tmp_path,
        header(b"PaxHeader", b"%011o\0" % len(records), b"x") + pad(records),
        member(b"000000.cls", b"3"),
    )
    assert our_view(path) == tarfile_view(path) == [("000001.cls", b"3")]


@pytest.mark.parametrize(
    "records",
    [{"size": "99999999999"}, {"size": "-5"}, {"size": "abc"}, {"GNU.sparse.size": "10"}],
)
def test_absurd_or_layout_changing_pax_records_are_refused(tmp_path, our_view, records) -> None:
    data = pax(records)
    path = archive(
        tmp_path, header(b"PaxHeader", b"%011o\0" % len(data), b"x") + pad(data), member(b"000000.cls", b"1")
    )
    assert our_view(path) == "refused"


def test_malformed_pax_lengths_are_refused(tmp_path, our_view) -> None:
    data = b"99 path=000001.cls\n"
    path = archive(
        tmp_path, header(b"PaxHeader", b"%011o\0" % len(data), b"x") + pad(data), member(b"000000.cls", b"1")
    )
    assert our_view(path) == "refused"


def test_a_global_pax_path_is_refused(tmp_path, our_view) -> None:
    data = pax({"path": "000009.cls"})
    path = archive(
        tmp_path, header(b"GlobalHead", b"%011o\0" % len(data), b"g") + pad(data), member(b"000000.cls", b"1")
    )
    assert our_view(path) == "refused"


def test_a_failed_checksum_is_refused_even_after_the_first_member(tmp_path, our_view) -> None:
    bad = bytearray(member(b"000001.cls", b"2"))
    bad[0] = ord("9")  # relabel the member without fixing the checksum
    path = archive(tmp_path, member(b"000000.cls", b"1"), bytes(bad))
    assert tarfile_view(path) == [("000000.cls", b"1")]  # tarfile silently stops there
    assert our_view(path) == "refused"


def test_a_directory_with_a_size_hides_nothing(tmp_path, our_view) -> None:
    hidden = member(b"000000.cls", b"7")
    path = archive(tmp_path, header(b"dir/", b"%011o\0" % len(hidden), b"5"), hidden)
    assert our_view(path) == tarfile_view(path) == [("000000.cls", b"7")]


def test_fields_with_embedded_nuls_read_as_tarfile_reads_them(tmp_path, our_view) -> None:
    nul_name = archive(tmp_path, header(b"000000.cls\0" + b"000001.cls", b"%011o\0" % 1, b"0") + pad(b"1"))
    assert our_view(nul_name) == tarfile_view(nul_name) == [("000000.cls", b"1")]
    # a size field starting with NULs is 0 for tarfile: the next header follows at once
    nul_size = archive(
        tmp_path, header(b"000000.cls", b"\0\0\0\0" + b"%07o" % 1, b"0"), member(b"000001.cls", b"2")
    )
    assert our_view(nul_size) == tarfile_view(nul_size) == [("000000.cls", b""), ("000001.cls", b"2")]


def test_prefix_long_names_and_links(tmp_path, our_view) -> None:
    long_name = b"x" * 120 + b"/000000.cls"
    path = archive(
        tmp_path,
        header(b"././@LongLink", b"%011o\0" % (len(long_name) + 1), b"L") + pad(long_name + b"\0"),
        member(b"ignored.cls", b"5"),
    )
    assert our_view(path) == tarfile_view(path) == [(long_name.decode(), b"5")]
    prefixed = archive(tmp_path, member(b"000000.cls", b"6", prefix=b"sub"))
    assert our_view(prefixed) == tarfile_view(prefixed) == [("sub/000000.cls", b"6")]
    link = archive(tmp_path, header(b"000000.cls", b"%011o\0" % 0, b"2"))
    assert our_view(link) == "refused"


def test_gzip_disguised_as_tar_is_refused(tmp_path, our_view) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("000000.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    path = tmp_path / "gz.tar"
    path.write_bytes(buffer.getvalue())
    assert our_view(path) == "refused"


def test_archives_made_by_tarfile_in_every_format_read_the_same(tmp_path, our_view) -> None:
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in (
                ("000000.cls", b"1"),
                ("d" * 120 + "/000001.png", b"\x89PNG" * 300),
                ("é/000002.cls", b"2"),
            ):
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert our_view(path) == tarfile_view(path) != "refused"


def test_fuzzed_real_shards_read_as_tarfile_or_are_refused(tmp_path, our_view, request) -> None:
    """Seeded mutations of a real shard (flipped bytes, truncations, header field edits with
    the checksum fixed up so the edit reaches the parser); every mutant agrees with tarfile
    or raises DataError within the time limit, never another exception. From S3 every 10th
    mutant is read (10 of each kind): an object costs a PUT and a GET (~25 ms), and what the
    store adds to the local reads (the bytes streamed through the seam, an object that ends
    early) is the same for each mutant of a kind."""
    every = 10 if request.node.callspec.params["open_shard"] == "s3 object" else 1
    shards = make_shards(tmp_path / "s", n=6, size=8, per_shard=6)
    original = shards.paths[0].local.read_bytes()
    headers = [pos for pos in range(0, len(original), BLOCK) if original[pos + 257 : pos + 262] == b"ustar"]
    rng = np.random.default_rng(0)
    fields = {"name": (0, 100), "size": (124, 12), "type": (156, 1), "prefix": (345, 155), "chksum": (148, 8)}
    tokens = [
        b"-1",
        b"7777777777",
        b"0",
        b"\0",
        b"x",
        b"5",
        b"L",
        b"g",
        b"2",
        b"\x80",
        b"1 2",
        b"../a.cls",
        b" ",
    ]
    outcomes = {"agree": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(original)
        kind = trial % 3
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            pos = int(rng.choice(headers))
            offset, width = list(fields.values())[int(rng.integers(0, len(fields)))]
            token = tokens[int(rng.integers(0, len(tokens)))][:width]
            data[pos + offset : pos + offset + len(token)] = token
            if offset != 148:
                block = data[pos : pos + BLOCK]
                block[148:156] = b" " * 8
                data[pos + 148 : pos + 156] = b"%06o\0 " % sum(block)
        if trial % every:
            continue
        path = tmp_path / f"m{trial}.tar"
        path.write_bytes(bytes(data))
        ours = our_view(path)
        assert ours == "refused" or ours == tarfile_view(path), f"trial {trial} ({kind}) read differently"
        outcomes["refused" if ours == "refused" else "agree"] += 1
    assert outcomes["refused"] > 50 // every and outcomes["agree"] > 20 // every  # both were exercised


def test_a_failed_checksum_in_a_later_window_yields_nothing_of_that_window(
    tmp_path, open_shard, monkeypatch
) -> None:
    """Windows of 4 blocks hold 2 one-block members each: members 0-3 (two windows) reach the
    caller, member 4 shares its window with the corrupt header 5 and must not."""
    monkeypatch.setattr(tar, "_WINDOW", 4 * BLOCK)
    names = [f"{i:06d}.cls".encode() for i in range(8)]
    corrupt = bytearray(member(names[5], b"5"))
    corrupt[0] = ord("9")  # relabelled without fixing the checksum
    path = archive(
        tmp_path, *(corrupt if i == 5 else member(name, b"%d" % i) for i, name in enumerate(names))
    )
    got = []
    with (
        open_shard(path) as stream,
        pytest.raises(DataError, match=f"byte {5 * 2 * BLOCK} fails its checksum"),
    ):
        for name, data in tar_members(stream, "s3://bucket/train/train-000000.tar"):
            got.append((name, data))
    assert got == [(names[i].decode(), b"%d" % i) for i in range(4)]


def test_truncated_and_empty_streams_name_the_shard_and_what_the_stream_gave(tmp_path, open_shard) -> None:
    truncated = tmp_path / "t.tar"
    truncated.write_bytes(
        member(b"000000.cls", b"1") + header(b"000001.png", b"%011o\0" % 3000, b"0") + bytes(1000)
    )
    where = "s3://bucket/train/t.tar"
    with open_shard(truncated) as stream, pytest.raises(DataError) as err:
        list(tar_members(stream, where))
    assert str(err.value) == (
        f"{where}: truncated tar (member at byte {2 * BLOCK} needs 3000 bytes, file ends after 1000); "
        "re-make or re-copy the shard"
    )
    empty = tmp_path / "e.tar"
    empty.write_bytes(b"")
    with (
        open_shard(empty) as stream,
        pytest.raises(DataError, match=f"^{where}: shard is empty; re-make it$"),
    ):
        list(tar_members(stream, where))


def test_dropped_members_are_walked_but_come_without_data(tmp_path, our_view, open_shard) -> None:
    path = archive(
        tmp_path, *(member(b"%06d.%s" % (i, ext), b"x" * 700) for i in range(4) for ext in (b"png", b"cls"))
    )
    with open_shard(path) as stream:
        got = list(tar_members(stream, str(path), keep_data=lambda name: name.endswith(".cls")))
    assert got == [(name, None if name.endswith(".png") else data) for name, data in our_view(path)]


@pytest.mark.parametrize("claim", ["size", "pax size"])
def test_a_huge_claimed_size_is_a_truncation_not_an_allocation(tmp_path, open_shard, claim) -> None:
    """Past the first window the data is read from the stream: a claimed size of 64 GiB or
    10^30 bytes must not become one read of that size (MemoryError, OverflowError)."""
    huge = 8**12 - 1 if claim == "size" else 10**30
    filler = member(b"000000.png", bytes(300_000))
    if claim == "size":
        liar = header(b"000001.png", b"%012o" % huge, b"0")
    else:
        records = pax({"size": str(huge)})
        liar = (
            header(b"PaxHeader", b"%011o\0" % len(records), b"x") + pad(records) + member(b"000001.png", b"")
        )
    path = archive(tmp_path, filler, liar, bytes(600_000))  # the liar is read before the stream ends
    with open_shard(path) as stream, pytest.raises(DataError, match=f"needs {huge} bytes, file ends after"):
        list(tar_members(stream, str(path)))
