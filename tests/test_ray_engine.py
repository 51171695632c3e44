"""--engine ray on a local Ray instance (2 CPUs, tiny Bunny checkpoint, two model actors).

- the Ray engine writes the same rows, captions.json and fingerprint as the local engine;
- SIGKILL of the driver leaves only committed shards (its actors die with it); the same command
  then finishes the run without recomputing or duplicating a shard;
- the engines resume each other's runs (local after a killed Ray run, Ray after a killed local run);
- the actor pool survives an actor dying mid-item and reports actors that cannot start.

The corpus and the uninterrupted local reference run are the shared ones of caption_helpers
(float32, so batch composition cannot change a caption)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caption_helpers import CKPT, CORPUS_ARGS, ROOT, caption, captions, markers, reference_run, rows
from pipeline.errors import EXIT_USAGE, JobError
from pipeline.ledger import Ledger

ray = pytest.importorskip("ray")
# the pool tests' worker classes live in this file, which Ray's workers cannot import: ship it by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHARDS = 11                                     # the shared corpus: 44 images in shards of 4
RAY_FLAGS = ("--engine", "ray", "--ray-actors", "2", "--threads", "1", "--workers", "0")
RAY_OPTS = {"engine": "ray", "ray_actors": 2, "threads": 1, "workers": 0}
CORPUS_OPTS = {"max_new_tokens": 4, "shard_size": 4, "dtype": "float32"}      # = CORPUS_ARGS


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance in this process; subprocess drivers join it with --ray-address."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _marker_docs(out: Path) -> list[dict]:
    return [json.loads(text) for text in markers(out).values()]


def _wait_unlocked(out: Path, timeout: float = 30.0) -> None:
    """Until no process holds a shard lock (the killed driver's actors have exited)."""
    led = Ledger(out)
    deadline = time.monotonic() + timeout
    for shard in range(SHARDS):
        while (lock := led.try_lock(shard)) is None:
            assert time.monotonic() < deadline, f"shard {shard} still locked {timeout} s after the kill"
            time.sleep(0.05)
        lock.release()


def _only_committed(out: Path) -> None:
    """What a kill may leave: committed shards (a valid marker and the data file it names), hidden
    temp files, and per actor at most one data file whose marker was not written yet (the data
    file is renamed first; without its marker it does not count and is rewritten on resume)."""
    led = Ledger(out)
    led.read_run()
    valid = led.markers()
    assert len(valid) == len(markers(out))                          # every marker on disk is a valid one
    visible = {p.name for p in (out / "shards").iterdir() if not p.name.startswith(".")}
    extra = visible - {f"{s:05d}.done.json" for s in valid} - {m.file for m in valid.values()}
    assert len(extra) <= 2 and all(re.fullmatch(r"\d{5}\.parquet", n) and int(n[:5]) not in valid for n in extra)
    assert not (out / "captions.json").exists()


def test_ray_engine_equals_local_engine(cluster, tmp_path):
    manifest, ref = reference_run()
    out = tmp_path / "ray"
    assert caption(manifest=manifest, out=out, **CORPUS_OPTS, **RAY_OPTS) == 0
    assert rows(out) == rows(ref) and len(rows(out)) == 44
    assert captions(out) == captions(ref)
    run, ref_run = (json.loads((d / "run.json").read_text()) for d in (out, ref))
    assert run["fingerprint"] == ref_run["fingerprint"]            # the engine is not part of it
    assert run["config"]["engine"] == "ray" and run["config"]["resolved"]["device"] == "cpu"
    docs = _marker_docs(out)
    assert sorted(d["shard"] for d in docs) == list(range(SHARDS))
    assert os.getpid() not in {d["pid"] for d in docs}             # captioned and committed by the actors
    logs = [p.name for p in (out / "logs").iterdir()]
    actor_logs = [n for n in logs if n.startswith("caption-actor-")]
    assert len(logs) - len(actor_logs) == 1 and 1 <= len(actor_logs) <= 2     # the driver's + one per actor


@pytest.fixture(scope="module")
def killed_ray_run(cluster, tmp_path_factory):
    """A Ray driver SIGKILLed right after its first shard commit (as the OOM killer would), once its
    actors have gone. Returns (command, run dir, markers at that point)."""
    manifest, _ = reference_run()
    out = tmp_path_factory.mktemp("killed") / "run"
    cmd = [sys.executable, "-m", "cli", "caption", "--manifest", str(manifest), "--model", str(CKPT),
           "--out", str(out), *CORPUS_ARGS, *RAY_FLAGS, "--ray-address", cluster]
    log = open(tmp_path_factory.mktemp("logs") / "driver.log", "w+")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if (out / "shards").exists() and markers(out):
            break
        time.sleep(0.01)
    if p.poll() is not None:
        log.seek(0)
        pytest.fail(f"the driver ended before the kill (exit {p.returncode}):\n{log.read()}")
    p.send_signal(signal.SIGKILL)
    p.wait()
    _wait_unlocked(out)
    log.close()
    return cmd, out, markers(out)


def test_killed_ray_driver_leaves_only_committed_shards(killed_ray_run):
    _, out, before = killed_ray_run
    assert 1 <= len(before) < SHARDS
    _only_committed(out)


def test_same_command_resumes_killed_ray_run(killed_ray_run, tmp_path):
    cmd, src, before = killed_ray_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    cmd = [str(out) if a == str(src) else a for a in cmd]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"this process: {SHARDS - len(before)} shard(s) to do" in r.stderr
    after = markers(out)
    assert {k: after[k] for k in before} == before                 # committed shards were not redone
    _, ref = reference_run()
    assert rows(out) == rows(ref) and captions(out) == captions(ref)       # nothing missing or twice
    assert not list((out / "shards").glob(".*.tmp"))


def test_local_engine_resumes_killed_ray_run(killed_ray_run, tmp_path):
    _, src, before = killed_ray_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    manifest, ref = reference_run()
    assert caption(manifest=manifest, out=out, **CORPUS_OPTS) == 0
    after = markers(out)
    assert {k: after[k] for k in before} == before
    assert {json.loads(after[k])["pid"] for k in set(after) - set(before)} == {os.getpid()}
    assert rows(out) == rows(ref) and captions(out) == captions(ref)


class _ReleaseWhenRefused(logging.Handler):
    """Releases a shard lock the moment the driver logs that an actor found it locked."""

    def __init__(self, shard_lock, message: str):
        super().__init__()
        self.shard_lock, self.message, self.seen = shard_lock, message, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.message in record.getMessage():
            self.seen += 1
            self.shard_lock.release()


def test_ray_engine_resumes_partial_local_run_past_a_held_lock(cluster, tmp_path, caplog):
    manifest, ref = reference_run()
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    redo = {1, 4, 7, 10}
    for shard in redo:                             # as if the local run was killed before these commits
        for p in (out / "shards").glob(f"{shard:05d}.*"):
            p.unlink()
    (out / "captions.json").unlink()
    before = markers(out)
    # shard 4 is locked, as by a killed run's process that has not exited yet, until an actor has
    # found it locked: the driver then offers it again a little later instead of giving up on it
    refused = _ReleaseWhenRefused(Ledger(out).try_lock(4), "shard 4 is locked")
    caplog.set_level(logging.INFO, logger="jobs.caption_ray")
    logging.getLogger("jobs.caption_ray").addHandler(refused)
    try:
        assert caption(manifest=manifest, out=out, **CORPUS_OPTS, **RAY_OPTS) == 0
    finally:
        logging.getLogger("jobs.caption_ray").removeHandler(refused)
        refused.shard_lock.release()
    assert refused.seen == 1
    after = markers(out)
    assert {k: after[k] for k in before} == before
    assert sorted(json.loads(after[k])["shard"] for k in set(after) - set(before)) == sorted(redo)
    assert os.getpid() not in {json.loads(after[k])["pid"] for k in set(after) - set(before)}
    assert rows(out) == rows(ref) and captions(out) == captions(ref)


def test_missing_accelerator_is_refused_before_anything_is_written(cluster, tmp_path):
    manifest, _ = reference_run()
    with pytest.raises(JobError, match=r"^device 'cuda' asked for, but the Ray cluster has no GPU resource"):
        caption(manifest=manifest, out=tmp_path / "run", device="cuda", **CORPUS_OPTS, **RAY_OPTS)
    assert not (tmp_path / "run").exists()


# -- the actor pool on its own (no model) -------------------------------------------------------------

class _Squarer:
    """Squares numbers; the first time it sees 3 its process dies (as an OOM kill would)."""

    def __init__(self, flag: str):
        self.flag = flag
        self.where = f"pid {os.getpid()}"

    def process(self, x: int) -> int:
        if x == 3 and not os.path.exists(self.flag):
            Path(self.flag).touch()
            os._exit(1)
        return x * x


class _NoModel:
    def __init__(self):
        raise JobError("the model folder is missing on this node", EXIT_USAGE)


def test_pool_replaces_a_dead_actor_and_requeues_items(cluster, tmp_path):
    from pipeline.distribute import run_pool

    seen: dict[int, list[int]] = {}

    def on_result(x: int, y: int):
        seen.setdefault(x, []).append(y)
        return 0.1 if x == 5 and len(seen[x]) == 1 else None      # 5 is handed out again once

    report = run_pool(_Squarer, (str(tmp_path / "died"),), {"num_cpus": 1}, 2, range(7), on_result)
    assert (tmp_path / "died").exists() and report.replaced == 1 and report.lost == ()
    assert seen == {x: [x * x] * (2 if x == 5 else 1) for x in range(7)}


def test_pool_reports_actors_that_cannot_start(cluster):
    from pipeline.distribute import run_pool

    with pytest.raises(JobError, match="no Ray actor could start: the model folder is missing") as e:
        run_pool(_NoModel, (), {"num_cpus": 1}, 2, range(3), lambda x, y: None)
    assert e.value.exit_code == EXIT_USAGE
