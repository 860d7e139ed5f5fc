"""What ingest lists: the items of an image folder tree or a manifest, streamed.

An item is a dict ``{image, source, label, caption, hashtags, boxes}`` plus, where one
row of the source is unusable, ``error = (reason, detail)``: a bad row becomes one item
that ingest turns into one reject row, never a refused source. Memory does not grow with
the source: folders are walked one directory at a time, manifests read a row at a time.

- Folders: every file whose suffix is an image format Pillow may open
  (:func:`cvpipe.data.images.source_suffixes`) is an item, in sorted path order
  (depth-first, as ``sorted(find(root))`` would give). Symlinked directories are
  followed (a loop is an error item); an unreadable directory is an error item; a file
  or directory that is not listed (hidden, not an image suffix) is reported to the
  ``skipped`` callback with the reason. Names that are not UTF-8 are escaped in
  ``source`` and kept as bytes in ``image_raw``/``source_raw``.
- Manifests: Parquet, JSONL (``.jsonl``/``.json``) or CSV with an ``image`` column. A
  broken line, a ragged row, a field of the wrong type, a row over ``max_row_bytes``
  or text not in the manifest's encoding is an error item; the rest is read.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvpipe.core.storage import is_local, join, url_to_fs
from cvpipe.data import images
from cvpipe.data.shards import loads_json, safe_text

OPTIONAL_COLUMNS = ("label", "caption", "hashtags", "boxes")
MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
DEFAULT_MAX_ROW_BYTES = 1 << 20  # one manifest row; a longer one is an error item
MAX_FOLDER_DEPTH = 64

Skipped = Callable[[str, str, str], None]  # (path, reason, detail)


def _ignore(path: str, reason: str, detail: str) -> None:
    pass


def iter_source(
    src: str,
    *,
    skipped: Skipped = _ignore,
    encoding: str = "utf-8",
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> Iterator[dict[str, Any]]:
    """The items of a source folder or manifest, in a deterministic order."""
    fs, path = url_to_fs(src)
    if fs.isdir(path):
        if is_local(fs):
            yield from _walk_local(path, skipped)
        else:
            yield from _walk_remote(fs, path, skipped)
        return
    lower = path.lower()
    if lower.endswith(".parquet"):
        yield from _read_parquet(src, max_row_bytes)
    elif lower.endswith((".jsonl", ".json")):
        yield from _read_jsonl(src, encoding, max_row_bytes)
    elif lower.endswith(".csv"):
        yield from _read_csv(src, encoding, max_row_bytes)
    else:
        raise ValueError(
            f"source {src} is neither a folder of images nor a manifest "
            f"({', '.join(MANIFEST_SUFFIXES)})"
        )


def error_item(source: str, reason: str, detail: str) -> dict[str, Any]:
    return {"image": "", "source": safe_text(source), "error": (reason, detail)}


# ------------------------------------------------------------------------- folders


def _walk_local(root: str, skipped: Skipped) -> Iterator[dict[str, Any]]:
    suffixes = images.source_suffixes()
    root = os.path.abspath(root)
    ancestors: list[tuple[int, int]] = []

    def rel_of(path: str) -> str:  # paths are built by joining onto root
        return path[len(root) + 1 :].replace(os.sep, "/") if path != root else "."

    def item(path: str, rel: str, error: tuple[str, str] | None = None) -> dict[str, Any]:
        parts = rel.split("/")
        raw = os.fsencode(rel)
        escaped = safe_text(rel)
        out = {
            "image": safe_text(path),
            "source": escaped,
            "label": safe_text(parts[-2]) if len(parts) >= 2 else None,
        }
        if escaped != rel:  # not UTF-8: keep the real bytes to open and to record
            out["image_raw"], out["source_raw"] = os.fsencode(path), raw
        if error:
            out["error"] = error
        return out

    def walk(folder: str, depth: int) -> Iterator[dict[str, Any]]:
        st = os.stat(folder)
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            yield item(folder, rel_of(folder), ("symlink_loop", "directory links to itself"))
            return
        if depth > MAX_FOLDER_DEPTH:
            yield item(folder, rel_of(folder), ("too_deep", f"over {MAX_FOLDER_DEPTH} levels"))
            return
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:  # unreadable: its images would vanish without a row
            yield item(folder, rel_of(folder), ("unreadable_dir", f"{type(e).__name__}: {e}"))
            return
        ancestors.append(ident)
        # Only names are kept (a folder of a million files is a list of a million names);
        # a folder sorts as "name/", so the walk gives sorted(find(root)) order.
        names = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            names.append(e.name + "/" if is_dir else e.name)
        del entries
        names.sort()
        for entry in names:
            name = entry.rstrip("/")
            path = os.path.join(folder, name)
            rel = rel_of(path)
            if name.startswith("."):
                skipped(safe_text(rel), "hidden", "dot-file or dot-folder")
            elif entry.endswith("/"):
                yield from walk(path, depth + 1)
            elif not name.lower().endswith(suffixes):
                skipped(safe_text(rel), "not_an_image_suffix", _kind(path))
            else:
                yield item(path, rel)  # FIFOs and devices are refused when read
        ancestors.pop()

    yield from walk(root, 0)


def _kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return "file" if stat.S_ISREG(mode) else f"not a regular file ({stat.filemode(mode)})"


def _walk_remote(fs: Any, root: str, skipped: Skipped) -> Iterator[dict[str, Any]]:
    suffixes = images.source_suffixes()
    root = root.rstrip("/")

    def walk(folder: str) -> Iterator[dict[str, Any]]:
        entries = fs.ls(folder, detail=True)
        keyed = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            is_dir = e["type"] == "directory"
            keyed.append((name + "/" if is_dir else name, name, e["name"].rstrip("/"), is_dir))
        for _, name, path, is_dir in sorted(keyed):
            rel = path[len(root) + 1 :]
            if name.startswith("."):
                skipped(rel, "hidden", "dot-file or dot-folder")
            elif is_dir:
                yield from walk(path)
            elif not name.lower().endswith(suffixes):
                skipped(rel, "not_an_image_suffix", "file")
            else:
                parts = rel.split("/")
                label = parts[-2] if len(parts) >= 2 else None
                yield {"image": fs.unstrip_protocol(path), "source": rel, "label": label}

    yield from walk(root)


# ------------------------------------------------------------------------- manifests


def _base(src: str) -> str:
    return src.rsplit("/", 1)[0] if "/" in src else "."


def _manifest_item(
    values: dict[str, Any], where: str, base: str
) -> dict[str, Any]:  # fmt: skip
    image = values.get("image")
    if not isinstance(image, str) or not image:
        kind = "missing" if image in (None, "") else f"a {type(image).__name__}"
        return error_item(where, "bad_manifest_row", f"image is {kind}, want a path or URL")
    url = image if ("://" in image or image.startswith("/")) else join(base, image)
    out: dict[str, Any] = {"image": url, "source": image}
    for k in OPTIONAL_COLUMNS:
        v = values.get(k)
        out[k] = None if v == "" else v  # CSV has no null: an empty cell is "not given"
    return out


def _read_parquet(src: str, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    fs, path = url_to_fs(src)
    name = path.rsplit("/", 1)[-1]
    base = _base(src)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, pre_buffer=False)
        if "image" not in pf.schema_arrow.names:
            raise ValueError(
                f"manifest {src} has no 'image' column (columns: {pf.schema_arrow.names})"
            )
        wanted = [c for c in ("image", *OPTIONAL_COLUMNS) if c in pf.schema_arrow.names]
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=wanted):
            for values in pa.Table.from_batches([batch]).to_pylist():
                row += 1
                yield _manifest_item(values, f"{name}:row {row}", base)


def _read_jsonl(src: str, encoding: str, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    fs, path = url_to_fs(src)
    name = path.rsplit("/", 1)[-1]
    base = _base(src)
    objects = with_image = 0
    with fs.open(path, "rb") as f:
        line_no = 0
        while True:
            line = f.readline(max_row_bytes + 1)
            if not line:
                break
            line_no += 1
            where = f"{name}:{line_no}"
            if len(line) > max_row_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # the rest of the long line
                    line = f.readline(1 << 20)
                yield error_item(where, "row_too_large", f"line over {max_row_bytes} bytes")
                continue
            if not line.strip():
                continue
            try:
                text = line.decode(encoding)
                values = loads_json(text.encode("utf-8"))
            except UnicodeDecodeError as e:
                yield error_item(where, "bad_encoding", f"not {encoding}: {e}")
                continue
            except ValueError as e:
                yield error_item(where, "bad_manifest_row", f"not a JSON object: {e}")
                continue
            if not isinstance(values, dict):
                kind = type(values).__name__
                yield error_item(where, "bad_manifest_row", f"a JSON {kind}, not an object")
                continue
            objects += 1
            with_image += "image" in values
            yield _manifest_item(values, where, base)
    if objects and not with_image:  # a manifest of another kind, not a few bad rows
        raise ValueError(f"manifest {src} has no 'image' column (no row has an image field)")


def _records(text: io.TextIOBase, max_chars: int) -> Iterator[tuple[int, str | None]]:
    """(first line number, record text) of CSV records, a record ending where its
    quotes balance; None for a record over ``max_chars`` (skipped to its line's end)."""
    line_no = 0
    while True:
        line = text.readline(max_chars + 1)
        if not line:
            return
        line_no += 1
        start, record = line_no, line
        while record.count('"') % 2 and len(record) <= max_chars:
            more = text.readline(max_chars + 1 - len(record))
            if not more:
                break
            line_no += 1
            record += more
        if len(record) > max_chars:
            while record and not record.endswith("\n"):
                record = text.readline(1 << 20)
            yield start, None
            continue
        yield start, record


def _read_csv(src: str, encoding: str, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    fs, path = url_to_fs(src)
    name = path.rsplit("/", 1)[-1]
    base = _base(src)
    with fs.open(path, "rb") as raw:
        # surrogateescape: a byte that is not in the encoding fails its row, not the file.
        text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
        records = _records(text, max_row_bytes)
        header: list[str] | None = None
        for line_no, record in records:
            where = f"{name}:{line_no}"
            if record is None:
                if header is None:
                    raise ValueError(f"manifest {src}: header over {max_row_bytes} bytes")
                yield error_item(where, "row_too_large", f"row over {max_row_bytes} bytes")
                continue
            try:
                fields = next(csv.reader([record], strict=True), [])
            except csv.Error as e:
                if header is None:
                    raise ValueError(f"manifest {src}: bad header: {e}") from None
                yield error_item(where, "bad_manifest_row", f"CSV: {e}")
                continue
            if not fields:
                continue  # a blank line
            if header is None:
                header = [h.strip() for h in fields]
                if "image" not in header:
                    raise ValueError(f"manifest {src} has no 'image' column (columns: {header})")
                continue
            if len(fields) != len(header):
                yield error_item(
                    where, "bad_manifest_row",
                    f"ragged row: {len(fields)} fields, the header has {len(header)}",
                )  # fmt: skip
                continue
            joined = "".join(fields)
            if not joined.isascii() and safe_text(joined) != joined:
                bad = next(h for h, v in zip(header, fields, strict=True) if safe_text(v) != v)
                yield error_item(where, "bad_encoding", f"column {bad!r} is not {encoding}")
                continue
            yield _manifest_item(dict(zip(header, fields, strict=True)), where, base)
