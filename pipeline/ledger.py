"""The run directory: the only state a run has, kept next to its data (no database).

    RUN_DIR/run.json                  resolved config + fingerprint + shard layout (written once)
    RUN_DIR/index.parquet             the input's index, shard-aligned (pipeline/index, pipeline/run_input.py)
    RUN_DIR/shards/00042.parquet      a committed shard (retries: 00042.retry1.parquet, ...)
    RUN_DIR/shards/00042.done.json    its done marker, written LAST: the shard counts only once it exists
    RUN_DIR/shards/00042.done.json.bad   a marker set aside because its data failed verification
    RUN_DIR/locks/00042.lock          flock'ed while a process works on shard 42
    RUN_DIR/locks/index.lock          flock'ed while a process builds the index
    RUN_DIR/logs/                     one log file per invocation
    RUN_DIR/captions.json             {path as in manifest: caption}, written when every shard is done

Every file is written through pipeline/atomic.py (temp name, fsync, rename, folder fsync), so a
SIGKILL or power loss at any instant leaves either the old or the new file, never half of one.

A shard is done iff its marker parses, is the marker of that shard, carries this run's
fingerprint and names that shard's data file with the recorded size. That check reads the marker
and the data file's size only, and only for the shards asked about: an array task lists the
folder's names and parses the markers of its own slice; "is every shard committed?" counts
names; each marker is parsed at most once per process (cached by its stat). The marker also records the SHA-256
of the data file; wherever a shard is read anyway (captions.json, export, --retry-failed) its
bytes and its own index/shard columns are checked against the marker (pipeline/export.py), and a
shard that fails is set aside and redone.

Temp files of a killed writer are removed by the next process that takes that shard's lock, and
only then: a live writer holds the lock, so its temp file is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import dataclasses
import re
import socket
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from pipeline import fingerprint as fp
from pipeline.atomic import write_atomic, write_text_atomic
from pipeline.config import ArraySlice
from pipeline.digests import hash_file
from pipeline.errors import JobError

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
CAPTIONS_JSON = "captions.json"
INDEX = "index.parquet"
FORMAT_VERSION = 3              # 2: done markers carry the data file's SHA-256; 3: the layout names the input's identity


@dataclass(frozen=True)
class Layout:
    """How the input is cut into shards; a run dir only ever has one."""

    input: str                  # the input's identity: raw-bytes digests + parse options (pipeline/index/identity.py)
    n_images: int
    shard_size: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_size)

    def indices(self, shard: int) -> range:
        """Manifest positions of a shard's rows."""
        return range(shard * self.shard_size, min(self.n_images, (shard + 1) * self.shard_size))


@dataclass(frozen=True)
class ShardMarker:
    shard: int
    file: str                        # data file name inside shards/
    bytes: int                       # its size, checked on every resume
    rows: int
    status: dict[str, int]           # status -> count ("ok", "missing", ...)
    fingerprint: str
    sha256: str = ""                 # of the data file, checked wherever the shard is read
    attempt: int = 0                 # 0 = first commit, k = k-th --retry-failed pass
    processed: int = 0               # images captioned by this attempt (rows minus those kept)
    started: float = 0.0             # unix time the shard's first image was taken
    finished: float = 0.0            # unix time of the commit
    timings: dict[str, float] = field(default_factory=dict)   # summed per-image stage seconds
    new_tokens: int = 0
    host: str = ""
    pid: int = 0

    @property
    def failed(self) -> int:
        return self.rows - self.status.get("ok", 0)


@dataclass(frozen=True)
class RunDoc:
    """run.json."""

    format: int
    fingerprint: str
    fingerprint_parts: dict[str, Any]
    layout: Layout
    config: dict[str, Any]
    created: float
    created_by: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)


def _is(value: Any, hint: Any) -> bool:
    """isinstance for the plain JSON-ish hints of the records here (float accepts int; no bools as numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _is(v, args[1]) for k, v in value.items())
    if hint is Any:
        return True
    if isinstance(value, bool) and hint is not bool:
        return False
    return isinstance(value, (int, float) if hint is float else hint)


@functools.cache
def _shape(cls: type) -> tuple[dict[str, Any], tuple, frozenset[str]]:
    """(type hints, fields, field names) of a record class: looked up once, not per marker."""
    return typing.get_type_hints(cls), fields(cls), frozenset(f.name for f in fields(cls))


def _typed(cls: type, doc: Any) -> Any:
    """cls(**doc) for a dataclass of plain fields, or ValueError naming the first field that is
    missing, unknown or of the wrong type: a damaged or hand-edited file must not reach the code."""
    if not isinstance(doc, dict):
        raise ValueError(f"not a JSON object but {type(doc).__name__}")
    hints, cls_fields, names = _shape(cls)
    if not names.issuperset(doc):
        raise ValueError(f"unknown field {sorted(set(doc) - names)[0]!r}")
    for f in cls_fields:
        if f.name not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"no {f.name!r}")
        elif not _is(doc[f.name], hints[f.name]):
            raise ValueError(f"{f.name!r} is {json.dumps(doc[f.name], default=str)[:40]}")
    return cls(**doc)


def parse_run(text: str) -> RunDoc:
    """run.json's text -> RunDoc, or ValueError saying what is wrong with it."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not a JSON object but {type(doc).__name__}")
    if doc.get("format") != FORMAT_VERSION:
        raise ValueError(f"run format {doc.get('format')!r}, this version reads {FORMAT_VERSION}: made by "
                         f"another version of vlm-caption-pipeline")
    layout = _typed(Layout, doc.get("layout"))
    if layout.n_images < 1 or layout.shard_size < 1:
        raise ValueError(f"its layout has {layout.n_images} images in shards of {layout.shard_size}")
    return _typed(RunDoc, {**doc, "layout": layout})


def layout_mismatch(old: Layout, new: Layout) -> str | None:
    """Why a run's layout is not this one (one phrase), or None."""
    if old.shard_size != new.shard_size:
        return f"its shard size was {old.shard_size}, now {new.shard_size}"
    if old.input != new.input:
        return (f"it was made from another input ({old.n_images} images, now {new.n_images}, "
                f"or the same count with other content)")
    return None


def different_run(root: Path, why: str) -> JobError:
    return JobError(f"{root} holds a different run: {why}; use --overwrite to start over or another --out")


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def io_error(path: Path, e: OSError) -> JobError:
    what = "vanished" if e.errno == errno.ENOENT else "is not writable" if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else "failed"
    return JobError(f"output {path} {what} ({e.strerror or e}); fix the output folder and re-run the same command")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """pipeline.atomic.write_atomic for the run dir: an OSError becomes a one-line JobError."""
    try:
        write_atomic(path, write)
    except OSError as e:
        raise io_error(path.parent, e) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class ShardLock:
    """An exclusive flock on locks/<shard>.lock; released on close or when the process dies."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_SHARD_FILE = re.compile(r"^\.?(\d+)\.")
_MARKER = re.compile(r"^(\d+)\.done\.json$")


class Ledger:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.locks = self.root / "locks"
        self.logs = self.root / "logs"
        self._run: RunDoc | None = None
        self._flock_ok = True
        self._temps: dict[int, list[Path]] | None = None     # shard -> its temp files, listed once
        self._parsed: dict[int, tuple[tuple[int, int, int], ShardMarker | None]] = {}   # shard -> (marker stat, result)

    @property
    def index(self) -> Path:
        """The input's index (pipeline/run_input.py builds and checks it)."""
        return self.root / INDEX

    # -- run.json ------------------------------------------------------------------------------------
    @property
    def run(self) -> RunDoc:
        if self._run is None:
            raise RuntimeError("the ledger has no run yet: read_run() or open() first")
        return self._run

    def _load_run(self) -> RunDoc:
        """run.json parsed; FileNotFoundError if absent, OSError/ValueError (saying why) otherwise."""
        try:
            text = (self.root / RUN_JSON).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        return parse_run(text)

    def read_run(self) -> RunDoc:
        """This run's run.json, or a one-line JobError (missing, unreadable, damaged)."""
        p = self.root / RUN_JSON
        try:
            self._run = self._load_run()
        except FileNotFoundError:
            raise JobError(f"{self.root} is not a run directory (no {RUN_JSON})") from None
        except OSError as e:
            raise JobError(f"cannot read {p}: {e.strerror or e}") from None
        except ValueError as e:
            raise JobError(f"{p} is damaged ({e}); re-run the caption command with --overwrite to start over") from None
        return self._run

    def peek_run(self) -> RunDoc | None:
        """run.json if the run dir has a readable one, else None (absent or damaged: open() decides)."""
        try:
            return self._load_run()
        except (OSError, ValueError):
            return None

    @property
    def fingerprint(self) -> str:
        return self.run.fingerprint

    @property
    def layout(self) -> Layout:
        return self.run.layout

    def open(self, finger: fp.Fingerprint, layout: Layout, config: dict[str, Any], overwrite: bool,
             part: ArraySlice) -> None:
        """Create the run dir (or join it): refuse a different fingerprint or layout, or a damaged
        run.json, unless overwrite (which then starts over)."""
        try:
            for d in (self.root, self.shards, self.locks, self.logs):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise io_error(self.root, e) from None
        doc = RunDoc(format=FORMAT_VERSION, fingerprint=finger.digest, fingerprint_parts=finger.parts, layout=layout,
                     config=config, created=time.time(), created_by=f"{socket.gethostname()}:{os.getpid()}")
        try:
            existing = self._load_run()
            why = self._mismatch(existing, doc)
        except FileNotFoundError:
            self._create_run(doc)
            return
        except (OSError, ValueError) as e:
            existing, why = None, f"its {RUN_JSON} is damaged or unreadable ({getattr(e, 'strerror', None) or e})"
        if why is None:
            self._run = existing
            if overwrite:
                self._clear(part, everything=part.total == 1)
            return
        if not overwrite:
            raise different_run(self.root, why)
        log.warning("--overwrite: %s holds a different run (%s); starting over", self.root, why)
        self._clear(part, everything=part.total == 1)
        atomic_write_text(self.root / RUN_JSON, doc.to_json())
        self._run = doc

    @staticmethod
    def _mismatch(existing: RunDoc, new: RunDoc) -> str | None:
        """Why a run dir's run.json is not this run (one phrase), or None."""
        if existing.fingerprint != new.fingerprint:
            return fp.explain(existing.fingerprint_parts, new.fingerprint_parts) or "its fingerprint differs"
        return layout_mismatch(existing.layout, new.layout)

    def _create_run(self, doc: RunDoc) -> None:
        """Create run.json if absent; with array tasks starting together exactly one creation wins
        (an exclusive link) and the others verify against the winner."""
        try:
            write_text_atomic(self.root / RUN_JSON, doc.to_json(), exclusive=True)
            self._run = doc
        except FileExistsError:
            why = self._mismatch(self.read_run(), doc)
            if why:
                raise different_run(self.root, why) from None
        except OSError as e:
            raise io_error(self.root, e) from None

    def _clear(self, part: ArraySlice, everything: bool) -> None:
        """--overwrite: drop this slice's shards (all of them for a single process) and captions.json."""
        for p in list(self.shards.iterdir()):
            s = self._shard_of(p.name)
            if everything or (s is not None and part.owns(s)):
                p.unlink(missing_ok=True)
        (self.root / CAPTIONS_JSON).unlink(missing_ok=True)

    @staticmethod
    def _shard_of(name: str) -> int | None:
        m = _SHARD_FILE.match(name)
        return int(m.group(1)) if m else None

    # -- markers -------------------------------------------------------------------------------------
    def marker_path(self, shard: int) -> Path:
        return self.shards / f"{shard_name(shard)}.done.json"

    def marker(self, shard: int) -> ShardMarker | None:
        """The shard's done marker if it is valid for this run, else None (the shard is redone)."""
        return self._valid(shard, self.marker_path(shard))

    def _valid(self, shard: int, path: Path) -> ShardMarker | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("ignoring unreadable done marker %s (%s); its shard will be redone", path, e.strerror or e)
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._parsed.get(shard)
        if cached is not None and cached[0] == key:
            m = cached[1]
        else:
            m = self._parse_marker(shard, path)
            self._parsed[shard] = (key, m)
        if m is None:
            return None
        try:
            size = (self.shards / m.file).stat().st_size
        except OSError:
            size = -1
        if size != m.bytes:
            log.warning("shard %d: data file %s is missing or changed; the shard will be redone", shard, m.file)
            return None
        return m

    def _parse_marker(self, shard: int, path: Path) -> ShardMarker | None:
        """The marker file, typed and checked against this run and shard; None (with a warning) if not valid."""
        try:
            m = _typed(ShardMarker, json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring unreadable done marker %s (%s); its shard will be redone", path, e)
            return None
        if m.fingerprint != self.fingerprint:
            log.warning("ignoring done marker %s of another run (%s)", path, m.fingerprint)
            return None
        if m.shard != shard or m.file != self.data_file(shard, m.attempt) or len(m.sha256) != 64:
            log.warning("ignoring done marker %s: it does not describe shard %d's own data file (shard %d, "
                        "file %r); the shard will be redone", path, shard, m.shard, m.file)
            return None
        return m

    def marker_mtime_ns(self, shard: int) -> int:
        """When the shard's marker was written, as last seen by marker()/markers() (no new stat)."""
        cached = self._parsed.get(shard)
        return cached[0][0] if cached is not None else os.stat(self.marker_path(shard)).st_mtime_ns

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.shards)
        except OSError as e:
            raise io_error(self.shards, e) from None

    def marked(self, names: list[str] | None = None) -> list[int]:
        """Shards that have a marker file, by name alone (none is read): sorted. A count of these
        below the shard count means the run is not complete, without parsing a marker."""
        n = self.layout.n_shards
        found = (_MARKER.match(name) for name in (self._names() if names is None else names))
        return sorted(s for m in found if m is not None and (s := int(m.group(1))) < n)

    def markers(self, part: ArraySlice | None = None) -> dict[int, ShardMarker]:
        """The valid done markers of the run (or of the shards `part` owns), by shard. Names are
        filtered before any marker is read; no data file is read."""
        out = {}
        for s in self.marked():
            if part is None or part.owns(s):
                m = self._valid(s, self.marker_path(s))
                if m is not None:
                    out[s] = m
        return out

    def pending(self, part: ArraySlice) -> list[int]:
        done = self.markers(part)
        return [s for s in part.shards(self.layout.n_shards) if s not in done]

    def set_aside_shards(self, names: list[str] | None = None) -> list[int]:
        """Shards with a marker set aside (NNNNN.done.json.bad), whether redone since or not."""
        return sorted(s for name in (self._names() if names is None else names)
                      if name.endswith(".done.json.bad") and (s := self._shard_of(name)) is not None)

    def set_aside(self, marker: ShardMarker, why: str) -> bool:
        """A committed shard whose data does not match its marker: rename the marker away (to
        NNNNN.done.json.bad, kept for a look) so the shard is pending again. Done under the shard's
        lock and only if the marker is still the one that was checked; False if another process
        holds the shard (it is redoing it) or already replaced the marker."""
        lock = self.try_lock(marker.shard)
        if lock is None:
            return False
        try:
            return self.set_aside_locked(marker, why)
        finally:
            lock.release()

    def set_aside_locked(self, marker: ShardMarker, why: str) -> bool:
        """set_aside() for a caller that holds the shard's lock."""
        if self.marker(marker.shard) != marker:
            return False
        path = self.marker_path(marker.shard)
        try:
            os.replace(path, path.with_name(path.name + ".bad"))
        except OSError as e:
            raise io_error(self.shards, e) from None
        log.error("shard %d: %s; its done marker is set aside and the shard will be redone", marker.shard, why)
        return True

    # -- committing ----------------------------------------------------------------------------------
    def commit(self, marker: ShardMarker, write_data: Callable[[Path], None]) -> ShardMarker:
        """Write the shard's data file, then its marker (the commit point), then drop the data file
        of the attempt it replaces. Returns the marker with the file's size and hash filled in."""
        data = self.shards / marker.file
        previous = self.marker(marker.shard)
        atomic_write(data, write_data)
        try:
            size, digest = data.stat().st_size, hash_file(data)
        except OSError as e:
            raise io_error(self.shards, e) from None
        marker = ShardMarker(**{**asdict(marker), "bytes": size, "sha256": digest, "fingerprint": self.fingerprint,
                                "host": socket.gethostname(), "pid": os.getpid()})
        atomic_write_text(self.marker_path(marker.shard), json.dumps(asdict(marker), indent=1, ensure_ascii=False))
        if previous is not None and previous.file != marker.file:
            (self.shards / previous.file).unlink(missing_ok=True)
        return marker

    def data_file(self, shard: int, attempt: int) -> str:
        return f"{shard_name(shard)}.parquet" if attempt == 0 else f"{shard_name(shard)}.retry{attempt}.parquet"

    def remove_temps(self, shard: int) -> int:
        """Delete the shard's temp files. Call only while holding its lock: any temp file of the
        shard is then a leftover of a killed writer (a live one would hold the lock). The folder
        is listed once per process, not per shard (it holds two files per shard, 78,000 at 10M
        images); a temp file left after that listing is removed by the next run."""
        if self._temps is None:
            self._temps = {}
            try:
                with os.scandir(self.shards) as entries:
                    for e in entries:
                        s = self._shard_of(e.name) if e.name.startswith(".") and e.name.endswith(".tmp") else None
                        if s is not None:
                            self._temps.setdefault(s, []).append(Path(e.path))
            except OSError as e:
                raise io_error(self.shards, e) from None
        n = 0
        for p in self._temps.pop(shard, []):
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                raise io_error(self.shards, e) from None
        if n:
            log.info("shard %d: removed %d temp file(s) left by a killed process", shard, n)
        return n

    # -- locks ---------------------------------------------------------------------------------------
    def try_lock(self, shard: int) -> ShardLock | None:
        """An exclusive lock on the shard, or None if another live process holds it."""
        if not self._flock_ok:
            return ShardLock(None)
        try:
            fd = os.open(self.locks / f"{shard_name(shard)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise io_error(self.locks, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:    # a filesystem without flock: fall back to no locking, loudly
            os.close(fd)
            log.warning("file locks unsupported in %s (%s); do not run two processes on one slice", self.locks, e)
            self._flock_ok = False
            return ShardLock(None)
        return ShardLock(fd)

    @contextlib.contextmanager
    def index_lock(self):
        """Held while the input's index is built or replaced, so that of many array tasks starting
        together one builds it and the others wait, then find it ready. Blocks; a holder that dies
        releases it (flock). Creates the run dir's folders, as building the index starts the run."""
        try:
            self.locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.locks / "index.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise io_error(self.root, e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another process is building the input's index in %s; waiting for it", self.root)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:            # no flock on this filesystem: build anyway (the publish is atomic)
                log.warning("file locks unsupported in %s (%s); concurrent tasks may each build the index",
                            self.locks, e)
            yield
        finally:
            os.close(fd)
