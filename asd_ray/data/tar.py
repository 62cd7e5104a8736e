"""A strict reader of the tar archives shards are made of: it sees what ``tarfile`` sees, or refuses.

Shards are untrusted, so the reader must not be fooled into a different view
of an archive than other tools have (a member relabelled for asd-ray but not
for GNU tar, Python's ``tarfile`` or webdataset), and no archive may make it
loop. It follows POSIX ustar/pax where it reads:

- every header's checksum is verified (unsigned or signed byte sum, as
  ``tarfile`` accepts) before any member is yielded, but after the walk: to
  find the next header, the walk first reads each header's magic, size and
  type (and an extension header's data, which no checksum covers). That order
  changes only which error a corrupt header gets (a size past the end of the
  file, say, rather than its checksum), not whether it is refused: every
  header the walk reads is on the list whose checksums are then verified;
- sizes are plain octal; negative, base-256 and non-octal sizes are refused,
  so every step advances by at least one 512-byte block;
- a pax extended header (``x``) is parsed record by record (``LEN key=value``,
  lengths checked); its ``path`` and ``size`` apply to the next member, any
  other key that changes where data lies (``GNU.sparse.*``) is refused, as is
  a global header (``g``) that sets ``path`` or ``size``;
- a GNU long name (``L``) names the next member; two extension headers in a
  row are refused;
- directories carry no data (as ``tarfile`` reads them); links, devices,
  FIFOs, sparse and continuation members are refused;
- the walk ends at the first all-zero block or at the end of the file on a
  block boundary; anything else is a truncated or corrupt archive.

Headers are parsed in one pass and their checksums then verified together
(numpy), before any member is yielded: no name or data reaches a caller from
an archive with a failed checksum.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from asd_ray.errors import DataError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# name, size, checksum, type, magic, prefix (ustar offsets 0, 124, 148, 156, 257, 345)
_HEADER = struct.Struct("100s24x12s12x8sc100x6s82x155s")
_CHECKSUM = slice(148, 156)
_OCTAL = re.compile(rb" *([0-7]*) *(?:\0.*)?", re.DOTALL)  # tarfile: up to the first NUL, stripped
_PAX_RECORD = re.compile(rb"([1-9][0-9]*) ")
_REGULAR, _DIRECTORY = (b"0", b"\0"), b"5"
_EXTENSIONS = (b"x", b"g", b"L")


def _octal(field: bytes, what: str, path: Path, pos: int) -> int:
    """A header number field as tarfile reads it (up to the first NUL, spaces stripped), but
    only plain octal digits: signs, base-256 and anything else are refused."""
    digits = field.rstrip(b"\0 ")
    if digits.isdigit():  # the common form: digits, then only NULs and spaces; read as tarfile does
        try:
            return int(digits, 8)
        except ValueError:
            pass  # an 8 or a 9: refused below
    match = _OCTAL.fullmatch(field)
    if match is None:
        raise DataError(
            f"{path}: tar header at byte {pos} has an invalid {what} field {field!r} (negative, "
            "base-256 or not octal); re-make the shard"
        )
    digits = match.group(1)
    return int(digits, 8) if digits else 0


def _utf8(raw: bytes, path: Path, pos: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: tar header at byte {pos} has a name that is not UTF-8; re-make the shard"
        ) from None


def _pax_records(data: bytes, path: Path, pos: int) -> dict[str, str]:
    """The ``LEN key=value\\n`` records of a pax header; every length must fit exactly."""
    records, at = {}, 0
    while at < len(data):
        match = _PAX_RECORD.match(data, at)
        length = int(match.group(1)) if match else 0
        record = data[at : at + length]
        if not match or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise DataError(f"{path}: malformed pax header at byte {pos}; re-make the shard")
        key, _, value = record[match.end() - at : -1].partition(b"=")
        records[_utf8(key, path, pos)] = _utf8(value, path, pos)
        at += length
    return records


def _pax_size(records: dict[str, str], path: Path, pos: int) -> int | None:
    if "size" not in records:
        return None
    if not records["size"].isdigit():
        raise DataError(f"{path}: pax header at byte {pos} has an invalid size {records['size']!r}")
    return int(records["size"])


def tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of every regular member of a tar file, in order.

    Raises:
        DataError: empty, truncated or corrupt archive, a failed checksum, a
            header other tools would read differently, or a non-regular member;
            naming the shard and the byte offset.
    """
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap refuses empty files
            raise DataError(f"{path}: shard is empty; re-make it") from None
    with buf:
        members, headers = _walk(buf, path)
        _verify_checksums(buf, headers, path)
        for name, start, size in members:
            yield name, buf[start : start + size]


def _walk(buf, path: Path) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]]]:
    """Every regular member as (name, data offset, size), and every header as (offset, claimed checksum)."""
    members, headers = [], []
    pos, end = 0, len(buf)
    pending: dict[str, object] | None = None  # path / size of the extension header just read
    while True:
        if pos == end:
            break  # tolerated: no end-of-archive blocks
        if pos + BLOCK > end:
            raise DataError(f"{path}: truncated tar (partial header at byte {pos}); re-make the shard")
        name, size_field, checksum, kind, magic, prefix = _HEADER.unpack_from(buf, pos)
        if magic[:5] != b"ustar":
            if buf[pos : pos + BLOCK] == _ZERO_BLOCK:
                break
            raise DataError(
                f"{path}: no ustar tar header at byte {pos} (corrupt or not a tar); re-make the shard"
            )
        headers.append((pos, _octal(checksum, "checksum", path, pos)))
        size = _octal(size_field, "size", path, pos)
        if kind in _EXTENSIONS:
            if pending is not None:
                raise DataError(
                    f"{path}: two tar extension headers in a row at byte {pos}; re-make the shard"
                )
            data_start = pos + BLOCK
            if data_start + size > end:
                raise DataError(f"{path}: truncated tar (extension header at byte {pos}); re-make the shard")
            data = bytes(buf[data_start : data_start + size])
            if kind == b"L":
                pending = {"path": _utf8(data.split(b"\0", 1)[0], path, pos)}
            else:
                records = _pax_records(data, path, pos)
                if any(k.startswith("GNU.sparse") for k in records) or (
                    kind == b"g" and ({"path", "size"} & records.keys())
                ):
                    raise DataError(
                        f"{path}: pax header at byte {pos} changes the layout of members (sparse data, "
                        "or a global path/size); shards may hold only plain files"
                    )
                if kind == b"x":
                    pending = {"path": records.get("path"), "size": _pax_size(records, path, pos)}
                    pending = {k: v for k, v in pending.items() if v is not None}
            pos = data_start + -(-size // BLOCK) * BLOCK
            continue
        overrides, pending = pending or {}, None
        if "size" in overrides:
            size = overrides["size"]
        if kind == _DIRECTORY:  # a directory's data blocks are not skipped by tarfile either
            pos += BLOCK
            continue
        if kind not in _REGULAR:
            raise DataError(
                f"{path}: member at byte {pos} is not a regular file (type {kind!r}); shards may hold only files"
            )
        member = _utf8(name.split(b"\0", 1)[0], path, pos)
        if kind == b"\0" and member.endswith("/"):  # old-style directory, as tarfile reads it
            pos += BLOCK
            continue
        if "path" in overrides:
            member = overrides["path"]
        elif prefix[0]:
            member = _utf8(prefix.split(b"\0", 1)[0], path, pos) + "/" + member
        data_start = pos + BLOCK
        if data_start + size > end:
            raise DataError(
                f"{path}: truncated tar (member at byte {pos} needs {size} bytes, file ends after "
                f"{end - data_start}); re-make or re-copy the shard"
            )
        members.append((member, data_start, size))
        pos = data_start + -(-size // BLOCK) * BLOCK
    if pending is not None:
        raise DataError(f"{path}: tar extension header without a member after it; re-make the shard")
    return members, headers


def _verify_checksums(buf, headers: list[tuple[int, int]], path: Path) -> None:
    """Each header's byte sum, its checksum field counted as spaces, must equal the claimed
    checksum, unsigned or signed (both are accepted by tarfile)."""
    if not headers:
        return
    failed = _checksum_failures(buf, headers)  # returns before raising: its view of the mmap is gone
    if failed:
        raise DataError(
            f"{path}: tar header at byte {failed[0]} fails its checksum ({len(failed)} header(s)); "
            "the shard is corrupt or was tampered with: re-make or re-copy it"
        )


def _checksum_failures(buf, headers: list[tuple[int, int]]) -> list[int]:
    offsets = np.fromiter((h[0] for h in headers), np.int64, len(headers))
    claimed = np.fromiter((h[1] for h in headers), np.int64, len(headers))
    blocks = np.frombuffer(buf, np.uint8, count=len(buf) // BLOCK * BLOCK).reshape(-1, BLOCK)
    rows = blocks[offsets // BLOCK]  # (k, 512), a copy
    del blocks
    rows[:, _CHECKSUM] = ord(" ")
    # Sums below 2^24 are exact in float32, and a matrix-vector product is the fastest sum here.
    unsigned = (rows.astype(np.float32) @ np.ones(BLOCK, np.float32)).astype(np.int64)
    suspect = np.flatnonzero(unsigned != claimed)
    if suspect.size:  # some tools write the signed sum
        signed = rows[suspect].view(np.int8).sum(1, dtype=np.int64)
        suspect = suspect[signed != claimed[suspect]]
    return offsets[suspect].tolist()
