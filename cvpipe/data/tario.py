"""The tar block format, written and streamed directly.

Python's tarfile spends more time per member on header bookkeeping than Pillow spends
decoding a small image, so shards are written and read here: USTAR headers for the
writer (fixed owner, mode and mtime, so the same samples give byte-identical tars), and
a streaming reader that understands what other tools write too (USTAR and its name
prefix, POSIX pax and GNU long names, base-256 sizes) and validates every checksum.
Member data is only read when the caller asks for it; skipped members are seeked over.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular, contiguous
_DIRECTORY = b"5"
_PAX = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"


class CorruptTar(ValueError):
    """The tar stream is damaged: bad checksum, bad number, or unexpected end of data."""


def ustar_header(name: bytes, size: int) -> bytes:
    """A USTAR header block for a regular file (mode 0644, uid/gid 0, mtime 0)."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def member_bytes(name: str, data: bytes) -> bytes:
    """Header + data + padding of one regular-file member."""
    raw = name.encode("utf-8")
    if len(raw) < 100 and raw.isascii():
        header = ustar_header(raw, len(data))
    else:  # long or non-ASCII names: let tarfile write the pax header
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "", ""
        header = ti.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    return header + data + bytes(-len(data) % BLOCK)


END_OF_ARCHIVE = bytes(2 * BLOCK)


@dataclass
class Member:
    name: str
    size: int
    kind: str  # "file" | "dir" | "other" (links, devices, fifos)


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptTar(f"bad number field {field!r}") from None


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptTar(f"unexpected end of data ({len(data)} of {n} bytes)")
    return data


MAX_META_BYTES = 1 << 20  # a pax or GNU long-name header's data; real ones are tiny


def _parse_pax(data: bytes) -> dict[str, str]:
    """Records ``"%d %s=%s\n"`` (length counts the whole record). Anything else is a
    :class:`CorruptTar`: a length of 0 or less once looped here forever."""
    out, pos, n = {}, 0, len(data)
    while pos < n:
        if data[pos] == 0:  # some writers pad the record block with NULs
            if data[pos:].strip(b"\0"):
                raise CorruptTar(f"pax header: data after NUL padding at byte {pos}")
            break
        space = data.find(b" ", pos, min(n, pos + 21))
        digits = data[pos:space] if space > 0 else b""
        if not digits.isdigit():
            raise CorruptTar(f"pax header: bad record length at byte {pos}")
        length = int(digits)
        end = pos + length
        if length <= len(digits) + 1 or end > n or data[end - 1 : end] != b"\n":
            raise CorruptTar(f"pax header: record length {length} at byte {pos} is invalid")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise CorruptTar(f"pax header: record at byte {pos} has no key=value")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


def _pax_size(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise CorruptTar(f"pax header: size {value!r} is not a number")
    return int(value)


def iter_members(f: BinaryIO) -> Iterator[tuple[Member, BinaryIO]]:
    """Stream the members of a tar. For each, yield (member, f) positioned at its data;
    the caller may read ``member.size`` bytes with :func:`read_data` or not at all —
    the reader skips what was not consumed before going on."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (or a tar without its end blocks)
        if len(header) < BLOCK:
            raise CorruptTar(f"unexpected end of data in a header ({len(header)} bytes)")
        stored = _number(header[148:156])
        actual = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != actual:
            raise CorruptTar(f"header checksum mismatch (stored {stored}, actual {actual})")
        kind = header[156:157]
        size = _number(header[124:136])
        if size < 0:
            raise CorruptTar(f"negative member size {size}")
        padded = size + (-size % BLOCK)
        if kind in (_PAX, _GNU_LONGNAME, _GNU_LONGLINK, _PAX_GLOBAL):
            if size > MAX_META_BYTES:
                raise CorruptTar(f"extended header of {size} bytes > {MAX_META_BYTES}")
            data = _read_exact(f, padded)[:size]
            if kind == _PAX:
                pax = _parse_pax(data)
            elif kind == _GNU_LONGNAME:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        member_name = pax.get("path") or long_name or name.decode("utf-8", "surrogateescape")
        if "size" in pax:
            size = _pax_size(pax["size"])
            padded = size + (-size % BLOCK)
        pax, long_name = {}, None
        kind_name = "file" if kind in _REGULAR else "dir" if kind == _DIRECTORY else "other"
        start = f.tell()
        yield Member(member_name, size, kind_name), f
        consumed = f.tell() - start
        if consumed > size:
            raise CorruptTar("member data over-read")
        skip = padded - consumed
        if skip:
            _skip(f, skip)


def _skip(f: BinaryIO, n: int) -> None:
    # Read rather than seek: seeking past the end of a truncated file succeeds silently.
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise CorruptTar("unexpected end of data while skipping a member")
        n -= len(chunk)


def read_data(member: Member, f: BinaryIO) -> bytes:
    return _read_exact(f, member.size)
