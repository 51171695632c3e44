"""Crash test: SIGKILL `pipeline caption` at random points (several seeds), re-run the same command
each time; the final captions.json and merged Parquet equal an uninterrupted run's exactly, no key
is missing or duplicated, and no committed shard is ever recomputed.

Kill points are drawn per seed: during startup (model load, worker spawn) or after a random number
of shard commits plus a short random delay, so kills land mid-shard and around commits. Seed 0 kills only the main process (as the OOM killer does) and checks that the
preprocessing workers die with it; the others kill the whole process group (power loss)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caption_helpers import CKPT, CORPUS_ARGS, CORPUS_SIZE, ROOT, markers, reference_run, rows, session_alive

SHARDS = -(-CORPUS_SIZE // 4)


def _command(manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "caption", "--manifest", str(manifest), "--model", str(CKPT),
            "--out", str(out), "--workers", "1", *CORPUS_ARGS]


def _kill_at_random_point(cmd, out: Path, rng: random.Random, whole_group: bool, log) -> bool:
    """Start the job, SIGKILL it at a random point; False if it finished before the kill."""
    before = len(markers(out)) if (out / "shards").exists() else 0
    if rng.random() < 0.25 or before >= SHARDS - 1:
        target, delay = before, rng.uniform(0.0, 3.0)                     # likely still starting up
    else:
        target, delay = rng.randint(before + 1, SHARDS - 1), rng.uniform(0.0, 0.15)   # mid-run
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        if (out / "shards").exists() and len(markers(out)) >= target:
            break
        time.sleep(0.02)
    time.sleep(delay)
    if p.poll() is not None:
        return False
    if whole_group:
        os.killpg(p.pid, signal.SIGKILL)
    else:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # the workers die with the main process (PR_SET_PDEATHSIG): nothing of the job is left running
    for _ in range(300):                      # a worker may still be importing torch: allow 15 s
        if not session_alive(p.pid):
            break
        time.sleep(0.05)
    assert not session_alive(p.pid), "orphaned worker processes after SIGKILL"
    return True


def _crash_and_resume(seed: int, tmp_path: Path) -> None:
    manifest, reference = reference_run()
    out = tmp_path / f"run{seed}"
    cmd = _command(manifest, out)
    rng = random.Random(seed)
    kills = 0
    with open(tmp_path / f"stderr{seed}.txt", "ab") as log:
        for _ in range(3):                       # up to three kills, then let it finish
            snapshot = markers(out) if out.exists() else {}
            if not _kill_at_random_point(cmd, out, rng, whole_group=seed != 0, log=log):
                break
            kills += 1
            now = markers(out)
            assert {k: now[k] for k in snapshot} == snapshot      # committed shards untouched
            if len(now) == SHARDS:
                break                                             # killed while finishing: enough
        snapshot = markers(out) if out.exists() else {}
        final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert kills >= 1
    now = markers(out)
    assert {k: now[k] for k in snapshot} == snapshot
    assert f"this process: {SHARDS - len(snapshot)} shard(s) to do" in final.stderr

    # the outputs equal the uninterrupted run's, key for key
    assert (out / "captions.json").read_bytes() == (reference / "captions.json").read_bytes()
    got, want = rows(out), rows(reference)
    for r in got + want:
        r.pop("run_fingerprint")       # same settings -> same value; checked separately below
    assert got == want
    keys = [r["key"] for r in got]
    assert len(keys) == len(set(keys)) == CORPUS_SIZE
    assert {r["run_fingerprint"] for r in rows(out)} == {r["run_fingerprint"] for r in rows(reference)}
    # every shard was committed exactly once over all the invocations (each commit logs one line)
    commits: dict[int, int] = {}
    for f in (out / "logs").glob("caption-*.log"):
        for m in re.finditer(r"shard (\d+) committed", f.read_text(encoding="utf-8")):
            commits[int(m.group(1))] = commits.get(int(m.group(1)), 0) + 1
    assert max(commits.values()) == 1, commits
    assert not list((out / "shards").glob(".*.tmp"))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_and_resume(seed, tmp_path):
    _crash_and_resume(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_sigkill_and_resume_more_seeds(seed, tmp_path):
    _crash_and_resume(seed, tmp_path)
