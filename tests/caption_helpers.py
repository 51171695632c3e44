"""Helpers for the end-to-end `pipeline caption` tests (tiny Bunny checkpoint, CPU)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.caption import run_caption
from pipeline import array_task, jobfile
from pipeline.ledger import Ledger
from pipeline.export import iter_shards

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "tests" / "golden" / "bunny-tiny" / "checkpoint"
SAMPLES = ROOT / "data" / "samples.txt"
TIMING_COLUMNS = ("preprocess_s", "encode_s", "prefill_s", "decode_s")


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`pipeline ...` in a fresh interpreter (as cron would run it)."""
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_cli(*args: str | Path) -> int:
    """`pipeline ARGS` through the real command line (typer, flags, guard), in this process: the exit code."""
    from cli.app import app

    try:
        code = app([str(a) for a in args], prog_name="pipeline", standalone_mode=False)
    except SystemExit as e:
        code = e.code
    return int(code or 0)


def caption(**opts) -> int:
    """`pipeline caption` in this process (saves an interpreter start per call)."""
    opts = {"model": str(CKPT), "max_new_tokens": 4, "workers": 0, "quiet": True, **opts}
    opts = {k: str(v) if isinstance(v, Path) else v for k, v in opts.items()}
    part = array_task.resolve(opts.get("num_shards_total"), opts.get("shard_index"), {})
    return run_caption(jobfile.to_run_config(opts, part))


def session_alive(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session: a job started with start_new_session=True."""
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return alive


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def rows(run_dir: Path, keep_timings: bool = False) -> list[dict]:
    """The merged rows of a run, without the per-image timings (which vary run to run)."""
    led = Ledger(run_dir)
    led.read_run()
    bad: list[int] = []
    out = pa.concat_tables(iter_shards(led, led.markers(), bad)).to_pylist()
    assert bad == []
    if not keep_timings:
        for r in out:
            for c in TIMING_COLUMNS:
                r.pop(c)
    return out


def read_parquet_rows(path: Path) -> list[dict]:
    out = pq.read_table(path).to_pylist()
    for r in out:
        for c in TIMING_COLUMNS:
            r.pop(c)
    return out


def captions(run_dir: Path) -> dict[str, str]:
    return json.loads((Path(run_dir) / "captions.json").read_text(encoding="utf-8"))


def markers(run_dir: Path) -> dict[str, str]:
    """{marker file name: its exact content}: unchanged content means the shard was not redone."""
    return {p.name: p.read_text() for p in sorted((Path(run_dir) / "shards").glob("*.done.json"))}


def run_with_a_late_image(tmp_path: Path, names: tuple[str, ...] = ("a", "late", "b")) -> tuple[Path, Path, dict]:
    """A run (shards of 2) over imgs/<name>.png where late.png is missing at first, so it is a
    `missing` row; late.png then appears. Returns (manifest, run dir, the first run's rows by key)."""
    img = tmp_path / "imgs"
    img.mkdir()
    colours = {"a": ((64, 48), (200, 30, 30)), "b": ((50, 70), (30, 200, 30)), "late": ((40, 40), (30, 30, 200))}
    for name in names:
        if name != "late":
            Image.new("RGB", *colours[name]).save(img / f"{name}.png")
    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"imgs/{n}.png\n" for n in names))
    out = tmp_path / "run"
    assert caption(manifest=manifest, out=out, shard_size=2) == 0
    first = {r["key"]: r for r in rows(out)}
    assert first["imgs/late.png"]["status"] == "missing" and "imgs/late.png" not in captions(out)
    Image.new("RGB", *colours["late"]).save(img / "late.png")
    return manifest, out, first


def synthetic_corpus(folder: Path, n: int, seed: int = 0) -> Path:
    """n small random images of varied sizes and formats, and a manifest listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(24, 160, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        name = f"img{i:03d}.{'png' if i % 3 else 'jpg'}"
        img.save(folder / name, quality=90) if name.endswith("jpg") else img.save(folder / name)
        lines.append(name)
    manifest = folder / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# -- one 44-image corpus + its uninterrupted run, shared by the crash and array-job tests -------------
# float32: the exact-equality checks compare runs whose batches were composed differently.
CORPUS_ARGS = ("--max-new-tokens", "4", "--shard-size", "4", "--dtype", "float32", "--quiet")
CORPUS_SIZE = 44


@functools.cache
def reference_run() -> tuple[Path, Path]:
    """(manifest, run dir) of an uninterrupted in-process run over the shared corpus."""
    root = Path(tempfile.mkdtemp(prefix="caption-corpus-"))
    atexit.register(shutil.rmtree, root, True)
    manifest = synthetic_corpus(root / "images", CORPUS_SIZE)
    out = root / "reference"
    code = caption(manifest=manifest, out=out, max_new_tokens=4, shard_size=4, dtype="float32")
    assert code == 0
    return manifest, out
