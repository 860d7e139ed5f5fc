"""Every location is an fsspec URL; outputs are published atomically.

The commit protocol (docs/ARCHITECTURE.md, "Commit protocol"):
- on a filesystem with atomic rename (local disk) a file is written under a hidden temp
  name in its destination folder and renamed into place: the rename is the commit;
- on an object store (s3://, memory://, ...) the object is written under its final name
  and an empty commit marker ``<name>.committed`` is written after it: the marker is the
  commit. Readers list only committed files, so a writer killed mid-upload leaves
  nothing a reader can see.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

COMMIT_SUFFIX = ".committed"
TEMP_MARK = ".tmp-"
# A temp file names its writer (host tag and pid), so a cleanup removes only the temps
# of writers that are gone, never those of a live process publishing into the folder.
_HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"
STALE_TEMP_AGE_S = 24 * 3600.0  # temps of another host (shared disks) count as stale after


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a file was expected: never opened for
    reading (a FIFO blocks forever, /dev/zero never ends)."""


class FileTooLarge(ValueError):
    """A file above the size cap of the read; nothing past the cap was read."""


class FetchTimeout(OSError):
    """A network read that did not finish within its timeout."""


class FetchFailed(OSError):
    """A network read that failed (server error, refused or dropped connection)."""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a plain path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    url = str(url)
    if "://" in url:
        return posixpath.join(url, *parts)
    return os.path.join(url, *parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocol


def _is_temp(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _temp_name(base: str) -> str:
    return f".{base}{TEMP_MARK}{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def _temp_is_stale(folder: str, name: str, max_age_s: float) -> bool:
    """A temp whose writer is gone: a dead process of this host, or (other hosts, and
    temps of older code that named no writer) one not touched for ``max_age_s``."""
    parts = name.rsplit(TEMP_MARK, 1)[-1].split("-")
    if len(parts) == 3 and parts[0] == _HOST_TAG and parts[1].isdigit():
        return int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1]))
    try:
        return time.time() - os.stat(os.path.join(folder, name)).st_mtime > max_age_s
    except FileNotFoundError:
        return False


def _sweep_temps(folder: str, base: str | None, max_age_s: float) -> int:
    n = 0
    prefix = f".{base}{TEMP_MARK}" if base is not None else None
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for name in names:
        if not _is_temp(name) or (prefix is not None and not name.startswith(prefix)):
            continue
        if _temp_is_stale(folder, name, max_age_s):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                n += 1
    return n


@contextlib.contextmanager
def open_atomic(url: str) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears to readers only on success.

    If the block raises, nothing is published (the temp file or the unfinished upload is
    discarded) and the exception propagates.
    """
    fs, path = url_to_fs(url)
    parent = posixpath.dirname(path) if not is_local(fs) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        base = os.path.basename(path)
        tmp = os.path.join(parent, _temp_name(base))
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        # What a killed writer of this same file left behind is garbage now.
        _sweep_temps(parent or ".", base, STALE_TEMP_AGE_S)
        return

    started = time.time()
    marker = path + COMMIT_SUFFIX
    if fs.exists(marker):  # republishing: withdraw the old commit first
        fs.rm(marker)
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        # fsspec's buffered files upload on close(); discard() aborts instead.
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()
        with contextlib.suppress(Exception):
            f.close()
        raise
    f.close()
    with fs.open(marker, "wb"):
        pass
    fs.invalidate_cache(posixpath.dirname(path))
    # A killed writer of this object may have left a multipart upload open (billed, and
    # invisible to readers): abort those begun before this write.
    abort_stale_uploads(url, started_before=started, exact=True)


def write_bytes_atomic(url: str, data: bytes) -> None:
    with open_atomic(url) as f:
        f.write(data)


def write_bytes_if_changed(url: str, data: bytes) -> bool:
    """Publish ``data`` unless the committed file already holds exactly it, so a rerun
    that produces the same report writes nothing. Returns whether it wrote."""
    if is_committed(url) and read_bytes(url) == data:
        return False
    write_bytes_atomic(url, data)
    return True


def is_committed(url: str) -> bool:
    """True when ``url`` was published through :func:`open_atomic` (or placed by hand on
    local disk, where every visible file counts as committed)."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        return os.path.isfile(path)
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path + COMMIT_SUFFIX) and fs.exists(path)


def list_committed(url: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URLs of the committed files under the folder or prefix ``url`` whose names
    end with ``suffix``. Temp files and commit markers are never listed."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    if recursive:
        names = [p for p in fs.find(path) if not fs.isdir(p)]
    else:
        names = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "file"]
    names = set(names)
    out = []
    for name in names:
        base = posixpath.basename(name)
        if (
            not base.endswith(suffix)
            or base.endswith(COMMIT_SUFFIX)
            or _is_temp(base)
            or base.startswith(".")
        ):
            continue
        if not is_local(fs) and name + COMMIT_SUFFIX not in names:
            continue
        # Keep the caller's spelling of the root (s3://bucket/x, memory://x, ./x).
        out.append(str(url).rstrip("/") + name[len(path.rstrip("/")) :])
    return sorted(out)


def remove_stale_temps(url: str, max_age_s: float = STALE_TEMP_AGE_S) -> int:
    """Delete the temp files of writers that are gone (killed) from the folder ``url``;
    returns how many. Temps of live writers, in this process or another, are kept: a
    cleanup never pulls a file from under a writer that is still publishing."""
    fs, path = url_to_fs(url)
    if not is_local(fs):
        return 0
    return _sweep_temps(path, None, max_age_s)


def abort_stale_uploads(
    url: str, *, started_before: float | None = None, older_than_s: float = STALE_TEMP_AGE_S,
    exact: bool = False,
) -> int:  # fmt: skip
    """Abort the unfinished S3 multipart uploads under the prefix ``url`` (only ``url``
    itself with ``exact``) begun before ``started_before`` (epoch seconds; default:
    ``older_than_s`` ago); returns how many. A writer killed mid-upload leaves one open,
    invisible to readers but holding its parts. No-op on other filesystems."""
    fs, path = url_to_fs(url)
    if not is_s3(fs):
        return 0
    cutoff = time.time() - older_than_s if started_before is None else started_before
    bucket, _, prefix = path.partition("/")
    try:
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    except Exception:  # listing is housekeeping: never fail a commit over it
        return 0
    n = 0
    for upload in listing.get("Uploads", []):
        if exact and upload["Key"] != prefix:
            continue
        if upload["Initiated"].timestamp() >= cutoff:
            continue
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                       UploadId=upload["UploadId"])  # fmt: skip
            n += 1
    return n


_CREATE_LOCK = threading.Lock()


def create_if_absent(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there; True if this call created it.

    Atomic among concurrent callers (processes or hosts): a hard link of a complete temp
    file on local disk, a conditional PUT (If-None-Match) on S3. Other object stores are
    in-process (memory://) and take a lock.
    """
    fs, path = url_to_fs(url)
    if is_local(fs):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, _temp_name(os.path.basename(path)))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    if is_s3(fs):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as e:  # botocore's PreconditionFailed when not translated
            if "PreconditionFailed" in repr(e) or "412" in str(e):
                return False
            raise
        fs.invalidate_cache(posixpath.dirname(path))
        return True
    with _CREATE_LOCK:
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def _too_large(url: str, size: int, max_bytes: int) -> FileTooLarge:
    return FileTooLarge(f"{url} is {size} bytes > cap {max_bytes}")


def _read_local(path: str, max_bytes: int | None) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(path, st.st_size, max_bytes)
        # One byte over the size asks for the end of file; never a cap-sized buffer.
        data = f.read(st.st_size + 1) if max_bytes is not None else f.read()
        if max_bytes is not None and len(data) > st.st_size:  # grew while being read
            data += f.read(max_bytes + 1 - len(data))
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(path, len(data), max_bytes)
    return data


def _read_http(url: str, max_bytes: int | None, timeout: float) -> bytes:
    """GET with a deadline for the whole transfer, not only per socket operation: a
    server dripping a byte a second cannot hold a worker."""
    import http.client
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "cvpipe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                raise _too_large(url, int(length), max_bytes)
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise FetchTimeout(f"{url}: no complete answer within {timeout:g} s")
                chunk = response.read1(1 << 16)  # what has arrived: read() waits for all
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise _too_large(url, total, max_bytes)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"{url}: HTTP {e.code}") from None
        raise FetchFailed(f"{url}: HTTP {e.code} {e.reason}") from None
    except TimeoutError as e:
        raise FetchTimeout(f"{url}: no answer within {timeout:g} s ({e})") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise FetchTimeout(f"{url}: no answer within {timeout:g} s") from None
        raise FetchFailed(f"{url}: {e.reason}") from None
    except (http.client.HTTPException, ConnectionError) as e:
        raise FetchFailed(f"{url}: {type(e).__name__}: {e}") from None


def read_bytes(url: str, max_bytes: int | None = None, timeout: float = 60.0) -> bytes:
    """The bytes of a file or URL, read with bounds: at most ``max_bytes`` (else
    :class:`FileTooLarge`, before reading past the cap), only regular files
    (:class:`NotRegularFile`), and http(s) within ``timeout`` seconds
    (:class:`FetchTimeout`, :class:`FetchFailed`; 404 is FileNotFoundError)."""
    url = str(url)
    if "://" not in url:  # plain local path: skip fsspec's resolution (ingest hot path)
        return _read_local(url, max_bytes)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return _read_http(url, max_bytes, timeout)
    fs, path = url_to_fs(url)
    if is_local(fs):
        return _read_local(path, max_bytes)
    with fs.open(path, "rb") as f:
        size = getattr(f, "size", None)
        if max_bytes is not None and isinstance(size, int) and size > max_bytes:
            raise _too_large(url, size, max_bytes)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(url, len(data), max_bytes)
    return data


def expand_urls(spec: str, suffix: str) -> list[str]:
    """Resolve a user's input spec to sorted committed file URLs ending in ``suffix``.

    ``spec`` is one file, a folder or prefix (searched recursively), or a brace pattern
    such as ``shards/day/digits-{000000..000009}.tar``.
    """
    import braceexpand

    spec = str(spec)
    if "{" in spec:
        urls = [u for u in braceexpand.braceexpand(spec)]
        missing = [u for u in urls if not is_committed(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) of {spec} missing, e.g. {missing[0]}")
        return urls
    fs, path = url_to_fs(spec)
    if fs.isfile(path) and path.endswith(suffix):
        if not is_committed(spec):
            raise FileNotFoundError(f"{spec} is not committed")
        return [spec]
    urls = list_committed(spec, suffix=suffix, recursive=True)
    if not urls:
        raise FileNotFoundError(f"no committed *{suffix} files under {spec}")
    return urls


def expand_specs(specs: str | Sequence[str], suffix: str) -> list[str]:
    """:func:`expand_urls` over one spec or a list of specs (URLs, folders, patterns),
    in the order given, without duplicates."""
    if isinstance(specs, str):
        return expand_urls(specs, suffix)
    return list(dict.fromkeys(u for spec in specs for u in expand_urls(spec, suffix)))
