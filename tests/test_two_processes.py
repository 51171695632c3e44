"""Two processes on one run dir: a second run (cron overlap, a Ray resume, a sweep) must never
delete the temp file a live writer is still writing.

Process A holds shard 0's lock and is half-way through writing its data file (a temp file) when
process B, `pipeline caption` on the same run, starts. B skips shard 0 (locked), captions shard 1
and removes the temp file a *killed* writer left for shard 1 (it took that shard's lock, so that
writer is dead), but leaves A's temp file alone. A then finishes its commit, which used to die
with "output ... vanished".
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from caption_helpers import CKPT, ROOT, caption, captions, cli, synthetic_corpus

WRITER = textwrap.dedent("""
    import json, sys
    from pipeline.ledger import Ledger, ShardMarker
    run, data, doc = sys.argv[1], open(sys.argv[2], "rb").read(), json.loads(sys.argv[3])
    led = Ledger(run)
    led.read_run()
    lock = led.try_lock(0)
    assert lock is not None

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            print("writing", tmp.name, flush=True)
            sys.stdin.readline()                  # paused mid-write until the test says go on
            f.write(data[len(data) // 2:])

    m = ShardMarker(shard=0, file="00000.parquet", bytes=0, rows=doc["rows"], status=doc["status"], fingerprint="")
    led.commit(m, write)
    print("committed", flush=True)
""")


def test_a_second_run_never_deletes_a_live_writers_temp_file(tmp_path):
    manifest = synthetic_corpus(tmp_path / "images", 2)
    out = tmp_path / "run"
    args = dict(manifest=manifest, out=out, shard_size=1, max_new_tokens=3, dtype="float32")
    assert caption(**args) == 0
    want = captions(out)
    shards = out / "shards"
    data, doc = (shards / "00000.parquet").read_bytes(), json.loads((shards / "00000.done.json").read_text())
    (tmp_path / "shard0.parquet").write_bytes(data)
    for p in [*shards.glob("0000[01].*"), out / "captions.json"]:      # both shards to do again
        p.unlink()
    stale = shards / ".00001.parquet.999999-deadbeef.tmp"               # left by a killed writer
    stale.write_bytes(b"half a shard")

    a = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(tmp_path / "shard0.parquet"), json.dumps(doc)],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = a.stdout.readline().split()
        assert line[:1] == ["writing"], a.stderr.read()
        live = shards / line[1]
        b = cli("caption", "--manifest", str(manifest), "--model", str(CKPT), "--out", str(out), "--shard-size", "1",
                "--max-new-tokens", "3", "--dtype", "float32", "--workers", "0", "--quiet")
        assert b.returncode == 0, b.stderr
        assert "shard 0 is being worked on by another process" in b.stderr
        assert live.exists() and not stale.exists()
        assert (shards / "00001.done.json").exists() and not (shards / "00000.done.json").exists()
        out_a, err_a = a.communicate("go\n", timeout=60)
    finally:
        a.kill()
    assert a.returncode == 0 and "committed" in out_a, err_a
    assert not list(shards.glob(".*.tmp"))
    assert caption(**args) == 0 and captions(out) == want
    assert json.loads((shards / "00000.done.json").read_text())["pid"] == a.pid
