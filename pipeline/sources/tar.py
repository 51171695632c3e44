"""WebDataset tar shards: list the samples of a shard (strictly) and read one member's bytes.

A WebDataset shard is a plain tar whose consecutive members sharing a *key* (the member name up to
the first dot of its file name) form a sample: `000123045.jpg` + `000123045.json` +
`000123045.txt` (what img2dataset writes). The image is the sample's first member with an image
extension; `.txt` and `.json` side files are kept as passthrough text (e.g. the original alt-text).

Why the standard library's tarfile and not the `webdataset` package: webdataset streams whole
members into memory for training loops and has no notion of a hostile shard; here a shard is
listed once (headers only: tarfile seeks over the data) and each image is later read by its byte
offset, so a worker touches only its own bytes. Nothing is ever extracted to disk, and the checks
are strict anyway, so that a hostile shard yields rows with statuses and never reaches a decoder:

    unsafe_member     an absolute name or a '..' component, a symbolic or hard link, a device,
                      FIFO or sparse member
    too_large         the header claims more bytes than the per-image cap (a 2 GB claimed size)
    truncated         the shard ends before the member's data does
    corrupt           the shard is not an uncompressed tar, or a header in the middle is invalid
                      (the rest of the shard cannot be listed: one row says so)
    missing           the shard does not exist, or a sample has side files but no image
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass

from pipeline.sources.locator import SourceError, TarLocator

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif"})
SIDE_EXTS = ("txt", "json")             # -> passthrough columns of the same names
SIDE_MAX_BYTES = 1 << 20                # a longer side file is dropped (logged), not read into memory
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")   # webdataset's base_plus_ext; no hidden files


@dataclass(frozen=True)
class TarSample:
    """One row of a shard: a sample's image member, or a refusal (status set, member maybe None)."""

    key: str
    member: str | None
    offset: int = 0
    size: int = 0
    txt: str | None = None
    json: str | None = None
    status: str | None = None         # None: a good sample; else why the row is refused
    message: str | None = None
    shard_row: bool = False           # a row about the shard itself (missing, corrupt); key = "" or "@offset"


def _shard_row(status: str, message: str, key: str = "") -> TarSample:
    return TarSample(key, None, status=status, message=message, shard_row=True)


def _broken(offset: int, what: str) -> TarSample:
    return _shard_row("corrupt", f"{what}; the rest of the shard cannot be listed", f"@{offset}")


@dataclass
class _Group:
    key: str
    members: list[tarfile.TarInfo]


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, webdataset-style; None for names without an extension."""
    if name.startswith("./"):
        name = name[2:]
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def _unsafe(m: tarfile.TarInfo) -> str | None:
    parts = m.name.split("/")
    if m.name.startswith("/") or ".." in parts:
        return f"member {m.name!r} names a path outside the shard"
    if m.issym() or m.islnk():
        return f"member {m.name!r} is a {'symbolic' if m.issym() else 'hard'} link (links are not followed)"
    if m.issparse():
        return f"member {m.name!r} is a sparse file (unsupported)"
    if not m.isreg():
        return f"member {m.name!r} is not a regular file"
    return None


def _sample(group: _Group, tf: tarfile.TarFile, file_size: int, max_bytes: int, h) -> TarSample:
    names = [m.name for m in group.members]
    for m in group.members:
        why = _unsafe(m)
        if why:
            return TarSample(group.key, m.name, status="unsafe_member", message=why)
    image = next((m for m in group.members if split_name(m.name)[1].lower() in IMAGE_EXTS), None)
    side: dict[str, str | None] = {}
    for m in group.members:
        ext = split_name(m.name)[1].lower()
        if ext not in SIDE_EXTS or ext in side:
            continue
        if m.size > SIDE_MAX_BYTES or m.offset_data + m.size > file_size:
            log.warning("%s: side file %s (%d bytes) not read", tf.name, m.name, m.size)
            side[ext] = None
            continue
        data = tf.extractfile(m).read()
        h.update(data)
        side[ext] = data.decode("utf-8", errors="replace")
    if image is None:
        return TarSample(group.key, None, txt=side.get("txt"), json=side.get("json"), status="missing",
                         message=f"sample {group.key!r} has no image member (members: {', '.join(names)})")
    row = TarSample(group.key, image.name, image.offset_data, image.size, side.get("txt"), side.get("json"))
    if image.size > max_bytes:
        return TarSample(**{**vars(row), "status": "too_large",
                            "message": f"member {image.name!r} claims {image.size} bytes, over the cap of {max_bytes}"})
    if image.offset_data + image.size > file_size:
        return TarSample(**{**vars(row), "status": "truncated",
                            "message": f"the shard ends before member {image.name!r} does ({image.size} bytes claimed)"})
    return row


def scan_tar(path: str, max_bytes: int) -> tuple[list[TarSample], str]:
    """The rows of one shard and a digest of what was listed (headers and side files).

    Never raises for a bad shard: a missing or corrupt shard (or its unreadable rest) is itself a
    row with `shard_row` set, which the caller names after the shard."""
    h = hashlib.sha256()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return [_shard_row("missing", f"no such shard: {path}")], "missing"
    except OSError as e:
        return [_shard_row("unreadable", f"cannot open shard: {e.strerror or e}")], "unreadable"
    rows: list[TarSample] = []
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return [_shard_row("not_a_file", "the shard is not a regular file")], "not_a_file"
        try:
            tf = tarfile.open(fileobj=f, mode="r:")          # uncompressed only: members are read by offset
        except (tarfile.TarError, OSError) as e:
            return [_shard_row("corrupt", f"not an uncompressed tar shard ({e})")], "corrupt"
        group: _Group | None = None
        beyond_eof = False
        broken: TarSample | None = None
        ignored = 0
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError) as e:
                if not beyond_eof:    # after a member claiming data past the end, this is just the end
                    broken = _broken(tf.offset, f"unreadable tar header at byte {tf.offset} ({e})")
                break
            tf.members.clear()            # tarfile keeps every header otherwise: a shard can hold 10^6
            if m is None:
                break
            h.update(f"{m.name}\0{m.size}\0{m.type!r}\0{m.offset_data}\n".encode("utf-8", "surrogateescape"))
            beyond_eof = m.offset_data + m.size > st.st_size
            if m.isdir():
                continue
            parts = split_name(m.name)
            if parts is None:
                ignored += 1
                continue
            if group is not None and group.key == parts[0]:
                group.members.append(m)
                continue
            if group is not None:
                rows.append(_sample(group, tf, st.st_size, max_bytes, h))
            group = _Group(parts[0], [m])
        if group is not None:
            rows.append(_sample(group, tf, st.st_size, max_bytes, h))
        if broken is None and not beyond_eof:
            f.seek(tf.offset)
            if f.read(tarfile.BLOCKSIZE).strip(b"\0"):     # tarfile stops quietly at a later bad header
                broken = _broken(tf.offset, f"invalid tar header at byte {tf.offset}")
        if broken is not None:
            rows.append(broken)
        if ignored:
            log.info("%s: %d member(s) without an extension ignored", path, ignored)
    return rows, "sha256:" + h.hexdigest()


def read_member(loc: TarLocator, max_bytes: int) -> bytes:
    """The bytes of one member, by offset; SourceError if the shard changed or is short."""
    if loc.size > max_bytes:
        raise SourceError("too_large", f"member {loc.member!r} has {loc.size} bytes, over the cap of {max_bytes}")
    try:
        with open(loc.file, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SourceError("not_a_file", f"shard {loc.file} is not a regular file")
            f.seek(loc.offset)
            data = f.read(loc.size)
    except FileNotFoundError:
        raise SourceError("missing", f"no such shard: {loc.file}") from None
    except OSError as e:
        raise SourceError("unreadable", f"cannot read shard {loc.file}: {e.strerror or e}") from None
    if len(data) != loc.size:
        raise SourceError("truncated", f"shard {loc.file} ends inside member {loc.member!r}")
    return data
