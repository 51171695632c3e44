"""Bookkeeping benchmark (issue 12): everything around the model at internet scale.

Generates a 10M-line txt manifest and a 10M-row Parquet manifest of image paths that do not exist
(so only the bookkeeping counts) in a temporary folder, removed at the end, and runs the real
commands, each in its own fresh process, measuring wall time, CPU time (user + system, the
process and its children) and the peak RSS of the process and of its largest child (polled):

    plan, first task      `pipeline plan` as array task 7 of 1,000 on a new run dir: builds the index
    plan, next task       `pipeline plan` as task 8 of 1,000: checks the index (footer + stat)
    caption, one task     `pipeline caption` as task 7 of 1,000 (tiny golden model): plans, then its 39
                          shards of missing files go through the error path and are committed
    error path            `pipeline caption` as task 0 of 40 (977 shards, 250k missing files): rows/s
    resume scan           `pipeline plan` over the whole run once all 39,063 shards are committed
    status                `pipeline status`
    export parquet/json   `pipeline export --format parquet|json` (json: the sorted {path: caption})
    re-run after commit   `pipeline caption` with nothing left to do: writes captions.json (10M)
    no-op re-run          the same again: captions.json up to date

The committed shards other than those captioned above are synthesized with the project's own
writer (stages/write.ShardWriter, tests/synthetic_runs.py) under the fingerprint the real
caption run wrote, with short made-up captions, so captions.json and the exports hold 10M rows.
Synthesis is set-up, timed but not a result. Goals (issue 12): each step < 60 s CPU and < 1 GiB
peak RSS; the error path >= 20,000 rows/s.

    python benchmarks/bookkeeping.py [--rows 10000000] [--out benchmarks/results] [--parquet/--no-parquet] [--txt/--no-txt]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
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
sys.path.insert(0, str(ROOT))
CKPT = ROOT / "tests" / "golden" / "bunny-tiny" / "checkpoint"
SHARD_SIZE = 256
TASKS = 1000
TASK_INDEX = 7
ERROR_TASKS = 40            # the error-path run takes 1/40 of the shards

CLI = "import sys\nfrom cli.app import main\nsys.argv = ['pipeline', *sys.argv[1:]]\nmain()\n"
CAPTION = ("caption", "--model", str(CKPT), "--max-new-tokens", "4", "--dtype", "float32", "--quiet",
           "--shard-size", str(SHARD_SIZE))

# the child reports its own VmHWM (wait4's ru_maxrss would also count pages it was forked with)
HWM = """
import atexit, os
def _hwm():
    with open("/proc/self/status") as f, open(os.environ["BENCH_HWM"], "w") as out:
        out.write(next(l for l in f if l.startswith("VmHWM")).split()[1])
atexit.register(_hwm)
"""


class ChildPeaks:
    """Polls the VmHWM of the measured process's descendants (its preprocessing workers) until
    stopped: their own peak after exec, which getrusage's ru_maxrss would mix with the pages they
    were forked with."""

    def __init__(self, pid: int, every_s: float = 0.1):
        import threading

        self.pid, self.every_s, self.peaks = pid, every_s, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                kids = psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                kids = []
            for k in kids:
                try:
                    with open(f"/proc/{k.pid}/status") as f:
                        kib = int(next(l for l in f if l.startswith("VmHWM")).split()[1])
                    self.peaks[k.pid] = max(self.peaks.get(k.pid, 0), kib)
                except (OSError, StopIteration, ValueError):
                    pass
            self.stop.wait(self.every_s)

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peaks.values(), default=0) / 1024


def run_measured(name: str, *args: str) -> dict:
    """`pipeline ARGS` measured: CPU time from the child's rusage (the process and its children)."""
    hwm = Path(tempfile.mktemp(prefix="hwm-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_HWM": str(hwm)}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", HWM + CLI, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    kids = ChildPeaks(p.pid)
    # read both pipes to the end, then reap with wait4 for the child's own rusage (its children included)
    out, err = _drain(p)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    children = kids.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{name} failed with exit code {code}:\n{err[-3000:]}")
    own = int(hwm.read_text())
    hwm.unlink()
    row = {"step": name, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
           "peak_rss_mib": round(own / 1024, 1), "children_peak_rss_mib": round(children, 1),
           "stdout": out[-700:], "log_tail": err[-700:], "log": err}
    print(f"{name:<34} wall {row['wall_s']:7.2f} s  cpu {row['cpu_s']:7.2f} s  peak RSS {row['peak_rss_mib']:7.1f} MiB"
          f" (children {row['children_peak_rss_mib']:6.1f} MiB)", flush=True)
    return row


def _drain(p: subprocess.Popen) -> tuple[str, str]:
    import threading

    bufs: dict[str, bytes] = {}

    def read(name, stream):
        bufs[name] = stream.read()

    threads = [threading.Thread(target=read, args=(n, s)) for n, s in (("out", p.stdout), ("err", p.stderr))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bufs["out"].decode(errors="replace"), bufs["err"].decode(errors="replace")


def paths(n: int) -> pa.Array:
    """img2dataset-like relative paths: 00000/000000123.jpg (10,000 per folder), none of which exist."""
    i = np.arange(n)
    folder = pc.utf8_lpad(pa.array(i // 10_000).cast(pa.string()), 5, "0")
    name = pc.utf8_lpad(pa.array(i).cast(pa.string()), 9, "0")
    return pc.binary_join_element_wise(folder, pc.binary_join_element_wise(name, ".jpg", ""), "/")


def machine() -> str:
    """The CPU (model and ISA, as the device module reads them), cores and this process's niceness."""
    from pipeline.device import cpu_count, cpu_info

    cpu = cpu_info()
    return f"{cpu.model} (ISA {cpu.isa}), {cpu_count()} CPUs, nice {os.nice(0)}"


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


def synthesize_rest(run: Path) -> dict:
    """Commit every shard the real runs left pending, with the project's writer (no fsync: set-up)."""
    import pipeline.atomic as atomic
    from pipeline.config import ArraySlice
    from pipeline.ledger import Ledger
    from tests.synthetic_runs import commit_shards

    atomic.fsync = lambda path: None            # durability is not what is measured; the writes are the same
    led = Ledger(run)
    led.read_run()
    todo = led.pending(ArraySlice())
    t0, c0 = time.perf_counter(), time.process_time()
    commit_shards(led, todo, model="bunny-tiny-random")
    row = {"step": f"synthesize {len(todo)} committed shards (set-up)", "wall_s": round(time.perf_counter() - t0, 1),
           "cpu_s": round(time.process_time() - c0, 1)}
    print(f"{row['step']:<34} wall {row['wall_s']:7.1f} s  cpu {row['cpu_s']:7.1f} s", flush=True)
    return row


def rows_per_s(log: str) -> float | None:
    """From the caption log's commit lines: rows committed after the first commit over the time from
    the first commit to the last (the model load and pool start-up before the first shard, and the
    pool shut-down after the last, are left out: they do not grow with the rows)."""
    commits = [(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), int(m.group(2))) for m in
               re.finditer(r"^(\S+ \S+) INFO jobs.caption: shard \d+ committed .*?: (\d+) rows", log, re.M)]
    if len(commits) < 2:
        return None
    seconds = (commits[-1][0] - commits[0][0]).total_seconds()
    return round(sum(n for _, n in commits[1:]) / max(seconds, 1e-3), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--parquet", action=argparse.BooleanOptionalAction, default=True,
                    help="also the Parquet manifest's planning and one task")
    ap.add_argument("--txt", action=argparse.BooleanOptionalAction, default=True,
                    help="the txt manifest's steps (all of them)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (default: the system's)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bookkeeping-", dir=args.tmp))
    results = []
    n_shards = -(-args.rows // SHARD_SIZE)
    try:
        for fmt, writer in (("txt", write_txt), ("parquet", write_parquet)):
            if (fmt == "parquet" and not args.parquet) or (fmt == "txt" and not args.txt):
                continue
            manifest = tmp / f"manifest.{fmt}"
            t0 = time.perf_counter()
            writer(manifest, args.rows)
            print(f"generated {manifest.name}: {args.rows:,} rows, {manifest.stat().st_size / 2**20:.0f} MiB "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
            run = tmp / f"run-{fmt}"
            inp = ("--input", str(manifest), "--out", str(run))
            task = ("--num-shards-total", str(TASKS), "--shard-index", str(TASK_INDEX))

            def step(name: str, *cli: str) -> dict:
                row = {"manifest": fmt, **run_measured(f"{fmt}: {name}", *cli)}
                results.append(row)
                return row

            step(f"plan, task {TASK_INDEX}/{TASKS}, builds index", "plan", *inp, "--shard-size", str(SHARD_SIZE),
                 *task)
            step(f"plan, task {TASK_INDEX + 1}/{TASKS}", "plan", *inp, "--shard-size", str(SHARD_SIZE),
                 "--num-shards-total", str(TASKS), "--shard-index", str(TASK_INDEX + 1))
            row = step(f"caption, task {TASK_INDEX}/{TASKS}", *CAPTION, *inp, *task)
            row["rows_per_s"] = rows_per_s(row.pop("log"))
            if fmt != "txt":
                continue
            row = step(f"caption, error path (task 0/{ERROR_TASKS})", *CAPTION, *inp, "--num-shards-total",
                       str(ERROR_TASKS), "--shard-index", "0")
            row["rows_per_s"] = rows_per_s(row.pop("log"))
            print(f"   error path: {row['rows_per_s']} rows/s from the first shard's commit to the last's", flush=True)
            results.append({"manifest": fmt, **synthesize_rest(run)})
            step(f"resume scan, plan over {n_shards} shards", "plan", *inp, "--shard-size", str(SHARD_SIZE))
            step("status", "status", str(run))
            step("export parquet", "export", str(run), "--format", "parquet", "-o", str(tmp / "export.parquet"))
            step("export json", "export", str(run), "--format", "json", "-o", str(tmp / "export.json"))
            row = step("re-run after the last commit", *CAPTION, *inp)
            row["captions_json_mib"] = round((run / "captions.json").stat().st_size / 2**20, 1)
            step("no-op re-run", *CAPTION, *inp)
            for p in (tmp / "export.parquet", tmp / "export.json"):
                p.unlink(missing_ok=True)
            shutil.rmtree(run, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        r.pop("log", None)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {"benchmark": "bookkeeping (issue 12 phase 2)", "rows": args.rows, "shard_size": SHARD_SIZE,
           "tasks": TASKS, "when": stamp, "machine": machine(),
           "python": platform.python_version(), "pyarrow": pa.__version__, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bookkeeping-{stamp}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {out / f'bookkeeping-{stamp}.json'}")


if __name__ == "__main__":
    main()
