"""Scheduler arrays: 3 tasks started together on one manifest and one run dir (one of them
finding its index in SLURM_* variables, one in JOB_COMPLETION_INDEX) + `pipeline export` give
exactly the single-process result; each shard is written by the task that owns it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from caption_helpers import CKPT, CORPUS_ARGS, CORPUS_SIZE, ROOT, captions, cli, read_parquet_rows, reference_run, rows

TASKS = 3


def test_three_tasks_then_export_equal_single_process(tmp_path):
    manifest, reference = reference_run()
    out = tmp_path / "run"
    base = [sys.executable, "-m", "cli", "caption", "--manifest", str(manifest), "--model", str(CKPT),
            "--out", str(out), "--workers", "0", "--threads", "1", *CORPUS_ARGS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "JOB_COMPLETION_INDEX"}
    launches = [
        (base + ["--num-shards-total", "3", "--shard-index", "0"], env),
        (base, {**env, "SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}),
        (base + ["--num-shards-total", "3"], {**env, "JOB_COMPLETION_INDEX": "2"}),
    ]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd, e in launches]
    errs = [p.communicate(timeout=400)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err
    for i, err in enumerate(errs):
        assert f"array task {i} of 3" in err

    shard_dir = out / "shards"
    owners = {}
    for f in sorted(shard_dir.glob("*.done.json")):
        m = json.loads(f.read_text())
        owners.setdefault(m["pid"], set()).add(m["shard"] % TASKS)
    assert len(owners) == TASKS and all(len(v) == 1 for v in owners.values())   # one task per residue class

    r = cli("export", str(out), "--format", "parquet", "-o", str(tmp_path / "merged.parquet"))
    assert r.returncode == 0, r.stderr
    r = cli("export", str(out), "--format", "json", "-o", str(tmp_path / "merged.json"))
    assert r.returncode == 0, r.stderr
    want = rows(reference)
    got = read_parquet_rows(tmp_path / "merged.parquet")
    assert len(got) == CORPUS_SIZE and got == want
    assert json.loads((tmp_path / "merged.json").read_text()) == captions(reference)
    # the last task to finish also wrote captions.json
    assert (out / "captions.json").read_bytes() == (reference / "captions.json").read_bytes()


def test_export_refuses_unfinished_run(tmp_path):
    manifest, _ = reference_run()
    out = tmp_path / "run"
    r = cli("caption", "--manifest", str(manifest), "--model", str(CKPT), "--out", str(out), "--workers", "0",
            "--num-shards-total", "5", "--shard-index", "4", *CORPUS_ARGS)
    assert r.returncode == 0, r.stderr
    assert "2 of 11 shards committed" in r.stderr and not (out / "captions.json").exists()
    r = cli("export", str(out), "--format", "jsonl")
    assert r.returncode == 2 and "9 shard(s) are not committed yet" in r.stderr
    r = cli("export", str(out), "--format", "jsonl", "--partial")
    assert r.returncode == 0
    assert r.stdout.strip() == str(out / "captions.partial.jsonl")           # never captions.<fmt>: not complete
    assert len((out / "captions.partial.jsonl").read_text().splitlines()) == 8       # shards 4 and 9
    r = cli("status", str(out))
    assert "pending    36 images in 9 shard(s): 0, 1, 2, 3, 5, 6, 7, 8, 10" in r.stdout
