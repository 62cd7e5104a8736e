"""A strict reader of the tar archives shards are made of: it sees what ``tarfile`` sees, or refuses.

Shards are untrusted, so the reader must not be fooled into a different view
of an archive than other tools have (a member relabelled for asd-ray but not
for GNU tar, Python's ``tarfile`` or webdataset), and no archive may make it
loop. It follows POSIX ustar/pax where it reads:

- every header's checksum is verified (unsigned or signed byte sum, as
  ``tarfile`` accepts) before any member of its window is yielded (see below),
  but after the walk of that window: to find the next header, the walk first
  reads each header's magic, size and type (and an extension header's data,
  which no checksum covers). That order changes only which error a corrupt
  header gets (a size past the end of the file, say, rather than its
  checksum), not whether it is refused: every header the walk reads is on the
  list whose checksums are then verified;
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
- the walk ends at the first all-zero block or at the end of the stream on a
  block boundary; anything else is a truncated or corrupt archive.

The archive is read as a stream (``read(n)`` only: no seek, no mmap), so a
shard can come from object storage as well as from a local file, and only a
window of it is held: about 256 KiB, or one member if it is larger.
Headers are walked window by window, and the checksums of one window's headers
are verified together (numpy) before any member of that window is yielded: no
name or data of a header with a failed checksum reaches a caller. Unlike a walk
of the whole file first, members of earlier windows may have been yielded when
a later header fails (its checksum, or a truncation), and a checksum error
counts the failures of its window only: callers read a shard whole or raise,
and never keep what they got from one that raised.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

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
# Bytes read at a time, their headers' checksums verified together: a window that stays in
# the CPU's cache (larger windows made the walk slower: jobs/BENCHMARKS.md, "Shards and driver").
_WINDOW = 256 << 10


def _octal(field: bytes, what: str, where: str, pos: int) -> int:
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
            f"{where}: tar header at byte {pos} has an invalid {what} field {field!r} (negative, "
            "base-256 or not octal); re-make the shard"
        )
    digits = match.group(1)
    return int(digits, 8) if digits else 0


def _utf8(raw: bytes, where: str, pos: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{where}: tar header at byte {pos} has a name that is not UTF-8; re-make the shard"
        ) from None


def _pax_records(data: bytes, where: str, pos: int) -> dict[str, str]:
    """The ``LEN key=value\\n`` records of a pax header; every length must fit exactly."""
    records, at = {}, 0
    while at < len(data):
        match = _PAX_RECORD.match(data, at)
        length = int(match.group(1)) if match else 0
        record = data[at : at + length]
        if not match or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise DataError(f"{where}: malformed pax header at byte {pos}; re-make the shard")
        key, _, value = record[match.end() - at : -1].partition(b"=")
        records[_utf8(key, where, pos)] = _utf8(value, where, pos)
        at += length
    return records


def _pax_size(records: dict[str, str], where: str, pos: int) -> int | None:
    if "size" not in records:
        return None
    if not records["size"].isdigit():
        raise DataError(f"{where}: pax header at byte {pos} has an invalid size {records['size']!r}")
    return int(records["size"])


class _Window:
    """The part of the stream the walk is in: ``data`` holds the stream's bytes from
    offset ``base`` on, read ``_WINDOW`` bytes (or one member) at a time."""

    __slots__ = ("stream", "data", "base", "eof")

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.data, self.base, self.eof = stream, b"", 0, False

    def move(self, start: int, size: int) -> int:
        """Drop ``data[:start]`` and read until ``data`` holds ``size`` bytes or the stream
        ends. ``start`` may lie past ``data`` (padding not read yet): those bytes are read
        and dropped. Returns the new position of ``start`` in ``data``: 0, or how far past
        the end of the stream it lies."""
        kept, missing = self.data[start:], start - len(self.data)
        self.base += min(start, len(self.data))
        while missing > 0 and not self.eof:
            got = len(self._read(min(missing, _WINDOW)))
            self.base, missing = self.base + got, missing - got
        parts, have, want = [kept] if kept else [], len(kept), max(size, _WINDOW)
        while have < want and not self.eof:
            # at most as much again as the stream gave: a size a header claims is never one
            # allocation (64 GiB, or a pax size of 10^30), only what the stream holds
            parts.append(self._read(min(want - have, max(have, _WINDOW))))
            have += len(parts[-1])
        self.data = parts[0] if len(parts) == 1 else b"".join(parts)  # one read: no copy
        return max(missing, 0)

    def _read(self, size: int) -> bytes:
        got = self.stream.read(size)  # may return fewer bytes (sockets, object storage)
        self.eof = not got
        return got


def tar_members(
    stream: BinaryIO,
    where: str,
    *,
    keep_data: Callable[[str], bool] | None = None,
    offsets: bool = False,
    base: int = 0,
    to_end: bool = True,
) -> Iterator[tuple[str, bytes | None]] | Iterator[tuple[str, bytes | None, int]]:
    """Yield ``(name, data)`` of every regular member of a tar stream, in order.

    Args:
        stream: read with ``read(n)`` only, from its current position to its end.
        where: the shard's path or URL, for messages.
        keep_data: given, a member whose name it refuses is walked and checked as
            any other but comes with ``None``: its data is read and dropped.
        offsets: yield ``(name, data, offset)``, ``offset`` being where the member's
            first header (an extension header's, if it has one) lies in the archive:
            where a reader of that member alone starts.
        base: where the stream starts in the archive (a range of it): byte positions,
            in offsets and messages, count from the archive's start.
        to_end: the stream runs to the archive's end, where an all-zero block may end
            it. False: it is a range of whole members, which ends with its last member;
            an all-zero block inside it (a tar's end, which would hide what follows from
            other readers) is refused.

    Raises:
        DataError: empty, truncated or corrupt archive, a failed checksum, a
            header other tools would read differently, or a non-regular member;
            naming the shard and the byte offset.
    """
    window = _Window(stream)
    window.base = base
    window.move(0, BLOCK)
    if not window.data:
        raise DataError(f"{where}: shard is empty; re-make it")
    members: list[tuple[str, int, int, int]] = []  # (name, data offset in window.data or -1, size, header)
    headers: list[tuple[int, int]] = []  # (offset in window.data, claimed checksum)
    buf, pos = window.data, 0
    pending: dict[str, object] | None = None  # path / size of the extension header just read
    pending_at = 0  # where that extension header lies in the stream
    while True:
        if pos + BLOCK > len(buf) and not window.eof:
            yield from _release(buf, window.base, headers, members, where, offsets)
            pos = window.move(pos, BLOCK)
            buf = window.data
        end, at = len(buf), window.base + pos
        if pos == end:
            break  # tolerated: no end-of-archive blocks
        if pos + BLOCK > end:
            raise DataError(f"{where}: truncated tar (partial header at byte {at}); re-make the shard")
        name, size_field, checksum, kind, magic, prefix = _HEADER.unpack_from(buf, pos)
        if magic[:5] != b"ustar":
            if buf[pos : pos + BLOCK] == _ZERO_BLOCK:
                if not to_end:
                    raise DataError(
                        f"{where}: the archive ends (an all-zero block) at byte {at}, inside the records "
                        "its manifest places after it; the shard was changed after it was made: re-make it"
                    )
                break
            raise DataError(
                f"{where}: no ustar tar header at byte {at} (corrupt or not a tar); re-make the shard"
            )
        headers.append((pos, _octal(checksum, "checksum", where, at)))
        size = _octal(size_field, "size", where, at)
        if kind in _EXTENSIONS:
            if pending is not None:
                raise DataError(
                    f"{where}: two tar extension headers in a row at byte {at}; re-make the shard"
                )
            pending_at = at
            if pos + BLOCK + size > end and not window.eof:
                yield from _release(buf, window.base, headers, members, where, offsets)
                pos = window.move(pos, BLOCK + size)
                buf, end = window.data, len(window.data)
            data_start = pos + BLOCK
            if data_start + size > end:
                raise DataError(f"{where}: truncated tar (extension header at byte {at}); re-make the shard")
            data = buf[data_start : data_start + size]
            if kind == b"L":
                pending = {"path": _utf8(data.split(b"\0", 1)[0], where, at)}
            else:
                records = _pax_records(data, where, at)
                if any(k.startswith("GNU.sparse") for k in records) or (
                    kind == b"g" and ({"path", "size"} & records.keys())
                ):
                    raise DataError(
                        f"{where}: pax header at byte {at} changes the layout of members (sparse data, "
                        "or a global path/size); shards may hold only plain files"
                    )
                if kind == b"x":
                    pending = {"path": records.get("path"), "size": _pax_size(records, where, at)}
                    pending = {k: v for k, v in pending.items() if v is not None}
            pos = data_start + -(-size // BLOCK) * BLOCK
            continue
        first_header = at if pending is None else pending_at
        overrides, pending = pending or {}, None
        if "size" in overrides:
            size = overrides["size"]
        if kind == _DIRECTORY:  # a directory's data blocks are not skipped by tarfile either
            pos += BLOCK
            continue
        if kind not in _REGULAR:
            raise DataError(
                f"{where}: member at byte {at} is not a regular file (type {kind!r}); shards may hold only files"
            )
        member = _utf8(name.split(b"\0", 1)[0], where, at)
        if kind == b"\0" and member.endswith("/"):  # old-style directory, as tarfile reads it
            pos += BLOCK
            continue
        if "path" in overrides:
            member = overrides["path"]
        elif prefix[0]:
            member = _utf8(prefix.split(b"\0", 1)[0], where, at) + "/" + member
        if pos + BLOCK + size > end and not window.eof:
            yield from _release(buf, window.base, headers, members, where, offsets)
            pos = window.move(pos, BLOCK + size)
            buf, end = window.data, len(window.data)
        data_start = pos + BLOCK
        if data_start + size > end:
            raise DataError(
                f"{where}: truncated tar (member at byte {at} needs {size} bytes, file ends after "
                f"{end - data_start}); re-make or re-copy the shard"
            )
        kept = keep_data is None or keep_data(member)
        members.append((member, data_start if kept else -1, size, first_header))
        pos = data_start + -(-size // BLOCK) * BLOCK
    if pending is not None:
        raise DataError(f"{where}: tar extension header without a member after it; re-make the shard")
    yield from _release(buf, window.base, headers, members, where, offsets)


def _release(
    buf: bytes,
    base: int,
    headers: list[tuple[int, int]],
    members: list[tuple[str, int, int, int]],
    where: str,
    offsets: bool,
) -> Iterator[tuple[str, bytes | None]] | Iterator[tuple[str, bytes | None, int]]:
    """Verify the checksums of a window's headers, then yield its members; both lists are
    emptied for the next window."""
    _verify_checksums(buf, base, headers, where)
    headers.clear()
    for name, start, size, header in members:
        data = buf[start : start + size] if start >= 0 else None
        yield (name, data, header) if offsets else (name, data)
    members.clear()


def _verify_checksums(buf: bytes, base: int, headers: list[tuple[int, int]], where: str) -> None:
    """Each header's byte sum, its checksum field counted as spaces, must equal the claimed
    checksum, unsigned or signed (both are accepted by tarfile)."""
    if not headers:
        return
    failed = _checksum_failures(buf, headers)
    if failed:
        raise DataError(
            f"{where}: tar header at byte {base + failed[0]} fails its checksum ({len(failed)} header(s)); "
            "the shard is corrupt or was tampered with: re-make or re-copy it"
        )


def _checksum_failures(buf: bytes, headers: list[tuple[int, int]]) -> list[int]:
    """The offsets of the headers that fail; ``buf`` starts on a block boundary of the archive."""
    offsets = np.fromiter((h[0] for h in headers), np.int64, len(headers))
    claimed = np.fromiter((h[1] for h in headers), np.int64, len(headers))
    blocks = np.frombuffer(buf, np.uint8, count=len(buf) // BLOCK * BLOCK).reshape(-1, BLOCK)
    rows = blocks[offsets // BLOCK]  # (k, 512), a copy
    rows[:, _CHECKSUM] = ord(" ")
    # Sums below 2^24 are exact in float32, and a matrix-vector product is the fastest sum here.
    unsigned = (rows.astype(np.float32) @ np.ones(BLOCK, np.float32)).astype(np.int64)
    suspect = np.flatnonzero(unsigned != claimed)
    if suspect.size:  # some tools write the signed sum
        signed = rows[suspect].view(np.int8).sum(1, dtype=np.int64)
        suspect = suspect[signed != claimed[suspect]]
    return offsets[suspect].tolist()
