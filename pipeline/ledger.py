"""The run directory: the only state a run has, kept next to its data (no database).

    RUN_DIR/run.json                  resolved config + fingerprint + shard layout (written once)
    RUN_DIR/shards/00042.parquet      a committed shard (retries: 00042.retry1.parquet, ...)
    RUN_DIR/shards/00042.done.json    its done marker, written LAST: the shard counts only once it exists
    RUN_DIR/locks/00042.lock          flock'ed while a process works on shard 42
    RUN_DIR/logs/                     one log file per invocation
    RUN_DIR/captions.json             {path as in manifest: caption}, written when every shard is done

Every file is written to a temporary name in the same folder, fsynced, renamed over the final
name, and the folder fsynced, so a SIGKILL or power loss at any instant leaves either the old or
the new file, never a half-written one. A shard is done iff its marker parses, carries this run's
fingerprint and names a data file of the recorded size; anything else is redone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import fingerprint as fp
from pipeline.config import ArraySlice
from pipeline.errors import JobError

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
CAPTIONS_JSON = "captions.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """How the manifest is cut into shards; a run dir only ever has one."""

    manifest_digest: str
    n_images: int
    shard_size: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_size)


@dataclass(frozen=True)
class ShardMarker:
    shard: int
    file: str                        # data file name inside shards/
    bytes: int                       # its size, checked on read
    rows: int
    status: dict[str, int]           # status -> count ("ok", "missing", ...)
    fingerprint: str
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


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(path: Path, e: OSError) -> JobError:
    what = "vanished" if e.errno == errno.ENOENT else "is not writable" if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else "failed"
    return JobError(f"output {path} {what} ({e.strerror or e}); fix the output folder and re-run the same command")


def temp_name(path: Path) -> Path:
    """A hidden sibling unique to this writer (pid + random: threads and array tasks never collide)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then fsync + rename over `path`; never creates missing folders (a vanished run
    dir is an error, not something to silently recreate)."""
    tmp = temp_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _io_error(path.parent, e) from None
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


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


class Ledger:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.locks = self.root / "locks"
        self.logs = self.root / "logs"
        self.run: dict[str, Any] = {}
        self._flock_ok = True

    # -- run.json ------------------------------------------------------------------------------------
    def read_run(self) -> dict[str, Any]:
        p = self.root / RUN_JSON
        try:
            self.run = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobError(f"{self.root} is not a run directory (no {RUN_JSON})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise JobError(f"cannot read {p}: {e}") from None
        return self.run

    @property
    def fingerprint(self) -> str:
        return self.run["fingerprint"]

    @property
    def layout(self) -> Layout:
        return Layout(**self.run["layout"])

    def open(self, finger: fp.Fingerprint, layout: Layout, config: dict[str, Any], overwrite: bool,
             part: ArraySlice) -> None:
        """Create the run dir (or join it): refuse a different fingerprint or layout unless overwrite."""
        try:
            for d in (self.root, self.shards, self.locks, self.logs):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error(self.root, e) from None
        doc = {"format": FORMAT_VERSION, "fingerprint": finger.digest, "fingerprint_parts": finger.parts,
               "layout": asdict(layout), "config": config, "created": time.time(),
               "created_by": f"{socket.gethostname()}:{os.getpid()}"}
        existing = self._existing_run()
        if existing is not None:
            why = self._mismatch(existing, finger, layout)
            if why is None:
                self.run = existing
                if overwrite:
                    self._clear(part, everything=part.total == 1)
                return
            if not overwrite:
                raise JobError(f"{self.root} holds a different run: {why}; use --overwrite to start over "
                               f"or another --out")
            log.warning("--overwrite: %s holds a different run (%s); starting over", self.root, why)
            self._clear(part, everything=part.total == 1)
            atomic_write_text(self.root / RUN_JSON, json.dumps(doc, indent=1, ensure_ascii=False))
            self.run = doc
            return
        self._create_run(doc)

    def _existing_run(self) -> dict[str, Any] | None:
        p = self.root / RUN_JSON
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise JobError(f"{p} is unreadable ({e}); use --overwrite to start over") from None

    @staticmethod
    def _mismatch(existing: dict[str, Any], finger: fp.Fingerprint, layout: Layout) -> str | None:
        if existing.get("fingerprint") != finger.digest:
            return fp.explain(existing.get("fingerprint_parts", {}), finger.parts) or "its fingerprint differs"
        old = existing.get("layout", {})
        if old.get("manifest_digest") != layout.manifest_digest:
            return (f"it was made from a different manifest ({old.get('n_images')} images, "
                    f"now {layout.n_images}, or the same count with different entries)")
        if old.get("shard_size") != layout.shard_size:
            return f"its shard size was {old.get('shard_size')}, now {layout.shard_size}"
        return None

    def _create_run(self, doc: dict[str, Any]) -> None:
        """Create run.json if absent; with array tasks starting together exactly one creation wins
        (link() fails if the name exists) and the others verify against the winner."""
        path = self.root / RUN_JSON
        tmp = temp_name(path)
        try:
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                fsync_dir(self.root)
                self.run = doc
            except FileExistsError:
                existing = self._existing_run()
                why = self._mismatch(existing, fp.Fingerprint(doc["fingerprint_parts"]), Layout(**doc["layout"]))
                if why:
                    raise JobError(f"{self.root} holds a different run: {why}; use --overwrite to start over "
                                   f"or another --out") from None
                self.run = existing
        except OSError as e:
            raise _io_error(self.root, e) from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    def _clear(self, part: ArraySlice, everything: bool) -> None:
        """--overwrite: drop this slice's shards (all of them for a single process) and captions.json."""
        for p in list(self.shards.iterdir()):
            if everything or (self._shard_of(p.name) is not None and part.owns(self._shard_of(p.name))):
                p.unlink(missing_ok=True)
        (self.root / CAPTIONS_JSON).unlink(missing_ok=True)

    @staticmethod
    def _shard_of(name: str) -> int | None:
        head = name.lstrip(".").split(".", 1)[0]
        return int(head) if head.isdigit() else None

    # -- markers -------------------------------------------------------------------------------------
    def marker_path(self, shard: int) -> Path:
        return self.shards / f"{shard_name(shard)}.done.json"

    def marker(self, shard: int) -> ShardMarker | None:
        """The shard's done marker if it is valid for this run, else None (the shard is redone)."""
        return self._valid(self.marker_path(shard))

    def _valid(self, path: Path) -> ShardMarker | None:
        try:
            m = ShardMarker(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring unreadable done marker %s (%s); its shard will be redone", path, e)
            return None
        if m.fingerprint != self.fingerprint:
            log.warning("ignoring done marker %s of another run (%s)", path, m.fingerprint)
            return None
        try:
            size = (self.shards / m.file).stat().st_size
        except OSError:
            size = -1
        if size != m.bytes:
            log.warning("shard %d: data file %s is missing or changed; the shard will be redone", m.shard, m.file)
            return None
        return m

    def markers(self) -> dict[int, ShardMarker]:
        """All valid done markers of the run, by shard."""
        out = {}
        n = self.layout.n_shards
        try:
            names = sorted(os.listdir(self.shards))
        except OSError as e:
            raise _io_error(self.shards, e) from None
        for name in names:
            if name.endswith(".done.json") and not name.startswith("."):
                s = self._shard_of(name)
                if s is not None and s < n:
                    m = self._valid(self.shards / name)
                    if m is not None:
                        out[s] = m
        return out

    def pending(self, part: ArraySlice) -> list[int]:
        done = self.markers()
        return [s for s in range(self.layout.n_shards) if part.owns(s) and s not in done]

    # -- committing ----------------------------------------------------------------------------------
    def commit(self, marker: ShardMarker, write_data: Callable[[Path], None]) -> ShardMarker:
        """Write the shard's data file, then its marker (the commit point), then drop the data file
        of the attempt it replaces. Returns the marker with the file's size filled in."""
        data = self.shards / marker.file
        previous = self.marker(marker.shard)
        atomic_write(data, write_data)
        try:
            size = data.stat().st_size
        except OSError as e:
            raise _io_error(self.shards, e) from None
        marker = ShardMarker(**{**asdict(marker), "bytes": size, "fingerprint": self.fingerprint,
                                "host": socket.gethostname(), "pid": os.getpid()})
        atomic_write_text(self.marker_path(marker.shard), json.dumps(asdict(marker), indent=1, ensure_ascii=False))
        if previous is not None and previous.file != marker.file:
            (self.shards / previous.file).unlink(missing_ok=True)
        return marker

    def data_file(self, shard: int, attempt: int) -> str:
        return f"{shard_name(shard)}.parquet" if attempt == 0 else f"{shard_name(shard)}.retry{attempt}.parquet"

    def remove_stale_temp(self, part: ArraySlice) -> None:
        """Temp files left by killed processes; only this slice's (other tasks may be mid-write)."""
        for p in self.shards.glob(".*.tmp"):
            s = self._shard_of(p.name)
            if s is not None and part.owns(s):
                p.unlink(missing_ok=True)

    # -- locks ---------------------------------------------------------------------------------------
    def try_lock(self, shard: int) -> ShardLock | None:
        """An exclusive lock on the shard, or None if another live process holds it."""
        if not self._flock_ok:
            return ShardLock(None)
        try:
            fd = os.open(self.locks / f"{shard_name(shard)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _io_error(self.locks, e) from None
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

    # -- whole-run outputs ---------------------------------------------------------------------------
    def write_captions(self, captions: dict[str, str]) -> Path:
        path = self.root / CAPTIONS_JSON
        atomic_write_text(path, json.dumps(captions, ensure_ascii=False, indent=1) + "\n")
        return path

