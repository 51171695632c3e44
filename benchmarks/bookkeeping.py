"""Bookkeeping benchmark (issue 12, phase 1): the manifest index at internet scale.

Generates a 10M-line txt manifest and a 10M-row Parquet manifest in a temporary folder (removed
at the end) and measures, each step in its own fresh process (wall, user+system CPU, peak RSS
from wait4), with the default shard size of 256 (39,063 shards):

    build      resolve the input + one streamed pass writing the shard-aligned index
    task       one array task of 1,000: validate the index against the manifest (stat fast path),
               open it, read only its 39 row groups and build their ImageRef fields
    touched    the same task after the manifest's mtime changed (the raw-bytes digest decides)
    errors     the source layer's error path: read_bytes over 200,000 missing local files

No model, no images. Goals (issue 12): each step < 60 s CPU and < 1 GiB RSS; error path
>= 20,000 rows/s. The plan/resume/status/export measurements come with phase 2's wiring.

    python benchmarks/bookkeeping.py [--rows 10000000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 256
TASKS = 1000
TASK_INDEX = 7

BUILD = """
import sys
from pipeline.index import build_index, resolve_input
info = build_index(resolve_input(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
print(info.n_rows, info.n_shards)
"""

TASK = """
import sys
from pipeline.index import ManifestIndex, check_index, resolve_input
spec = resolve_input(sys.argv[1])
size, total, index = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
reason = check_index(sys.argv[2], spec, size)
assert reason is None, reason
idx = ManifestIndex(sys.argv[2])
n = sum(len(idx.refs(s)) for s in range(index, idx.n_shards, total))
print(n)
"""

ERRORS = """
import sys, time
from pipeline.sources.fetch import read_bytes
from pipeline.sources.locator import SourceError
n = int(sys.argv[1])
t0 = time.perf_counter()
statuses = set()
for i in range(n):
    try:
        read_bytes(f"/nonexistent/bench/{i:08d}.jpg")
    except SourceError as e:
        statuses.add(e.status)
assert statuses == {"missing"}, statuses
print(n / (time.perf_counter() - t0))
"""


# the child reports its own VmHWM: wait4's ru_maxrss also counts the parent's pages it was forked with
HWM = """
import atexit, os
def _hwm():
    with open("/proc/self/status") as f, open(os.environ["BENCH_HWM"], "w") as out:
        out.write(next(l for l in f if l.startswith("VmHWM")).split()[1])
atexit.register(_hwm)
"""


def measure(name: str, code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; wall, CPU (user+sys) and peak RSS of that process."""
    hwm = Path(tempfile.mktemp(prefix="hwm-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_HWM": str(hwm)}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", HWM + code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    out = p.stdout.read().decode().strip()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{name} failed with exit code {p.returncode}")
    peak_kib = int(hwm.read_text())
    hwm.unlink()
    row = {"step": name, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
           "peak_rss_mib": round(peak_kib / 1024, 1), "output": out}
    print(f"{name:<28} wall {row['wall_s']:7.2f} s  cpu {row['cpu_s']:7.2f} s  peak RSS {row['peak_rss_mib']:7.1f} MiB"
          f"  -> {out}", flush=True)
    return row


def paths(n: int) -> pa.Array:
    """img2dataset-like relative paths: 00000/000000123.jpg (10,000 per folder)."""
    i = np.arange(n)
    folder = pc.utf8_lpad(pa.array(i // 10_000).cast(pa.string()), 5, "0")
    name = pc.utf8_lpad(pa.array(i).cast(pa.string()), 9, "0")
    return pc.binary_join_element_wise(folder, pc.binary_join_element_wise(name, ".jpg", ""), "/")


def write_txt(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("# bookkeeping benchmark manifest\n")
        for start in range(0, n, 1_000_000):
            f.write("\n".join(paths(n)[start:start + 1_000_000].to_pylist()) + "\n")


def write_parquet(path: Path, n: int) -> None:
    p = paths(n)
    table = pa.table({"path": p, "width": pa.array(np.arange(n) % 4096, pa.int32()),
                      "url": pc.binary_join_element_wise("https://example.org/", p, "")})
    pq.write_table(table, path, row_group_size=1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bookkeeping-"))
    results = []
    try:
        for fmt, writer in (("txt", write_txt), ("parquet", write_parquet)):
            manifest = tmp / f"manifest.{fmt}"
            t0 = time.perf_counter()
            writer(manifest, args.rows)
            print(f"generated {manifest.name}: {args.rows:,} rows, {manifest.stat().st_size / 2**20:.0f} MiB "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
            index = tmp / f"run-{fmt}" / "index.parquet"
            results.append({"manifest": fmt, **measure(f"{fmt}: build index", BUILD, str(manifest), str(index),
                                                      str(SHARD_SIZE))})
            results[-1]["index_mib"] = round(index.stat().st_size / 2**20, 1)
            task = (str(manifest), str(index), str(SHARD_SIZE), str(TASKS), str(TASK_INDEX))
            results.append({"manifest": fmt, **measure(f"{fmt}: task {TASK_INDEX}/{TASKS} slice", TASK, *task)})
            os.utime(manifest)
            results.append({"manifest": fmt, **measure(f"{fmt}: task, manifest touched", TASK, *task)})
        results.append({"manifest": "-", **measure("errors: 200k missing files", ERRORS, "200000")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {"benchmark": "bookkeeping (issue 12 phase 1)", "rows": args.rows, "shard_size": SHARD_SIZE,
           "tasks": TASKS, "when": stamp, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
           "python": platform.python_version(), "pyarrow": pa.__version__, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bookkeeping-{stamp}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {out / f'bookkeeping-{stamp}.json'}")


if __name__ == "__main__":
    main()
