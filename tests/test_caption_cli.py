"""End-to-end `pipeline caption` on the shipped samples with the tiny Bunny checkpoint (CPU), and the
run-dir contract around it: outputs, status, export, no-op re-run, fingerprint refusal,
--overwrite, --retry-failed, job files, presets, and unwritable / vanished output dirs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from caption_helpers import (CKPT, SAMPLES, caption, captions, cli, error_lines, markers, read_parquet_rows, rows,
                             run_with_a_late_image)
from pipeline.errors import JobError

MINICPM = CKPT.parents[1] / "minicpmv2-tiny" / "checkpoint"
SIZES = {"samples/camera.png": (512, 512), "samples/chelsea.png": (451, 300), "samples/coffee.png": (600, 400),
         "samples/retina.jpg": (1411, 1411), "samples/rocket.jpg": (640, 427)}


@pytest.fixture(scope="module")
def samples_run(tmp_path_factory):
    """The samples run through the real CLI with worker processes, as a user would start it.
    float32: bf16 captions of the random tiny model can flip late tokens with the batch
    composition (which depends on timing), and one test below compares with a batch of one."""
    out = tmp_path_factory.mktemp("samples") / "run"
    r = cli("caption", "--manifest", str(SAMPLES), "--model", str(CKPT), "--out", str(out), "--dtype", "float32",
            "--max-new-tokens", "6", "--shard-size", "2", "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_samples_outputs(samples_run):
    out, log = samples_run
    caps = captions(out)
    assert list(caps) == sorted(SIZES) and all(isinstance(c, str) and c for c in caps.values())
    run = json.loads((out / "run.json").read_text())
    got = rows(out, keep_timings=True)
    assert [r["key"] for r in got] == sorted(SIZES) == [r["path"] for r in got]
    for r in got:
        assert r["status"] == "ok" and r["error"] is None and r["caption"] == caps[r["path"]]
        assert (r["width"], r["height"]) == SIZES[r["path"]]
        assert r["n_prompt_tokens"] == 769                        # 31 + 729 image slots + 9 (golden README)
        assert 1 <= r["n_new_tokens"] <= 6 and r["finish_reason"] in ("eos", "length")
        assert r["preprocess_s"] > 0 and r["encode_s"] > 0 and r["prefill_s"] > 0
        assert r["model"] == "bunny-tiny-random" and r["run_fingerprint"] == run["fingerprint"]
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4] and [r["shard"] for r in got] == [0, 0, 1, 1, 2]
    meta = pq.read_schema(out / "shards" / "00000.parquet").metadata
    assert meta[b"pipeline.run_fingerprint"].decode() == run["fingerprint"]
    assert "model busy" in log and "run complete: 5 captions" in log
    assert len(list((out / "logs").glob("caption-*.log"))) == 1


def test_pipeline_equals_stages_called_directly(samples_run):
    """The pipeline adds nothing to a caption: same text as preprocess -> encode -> engine by hand."""
    from models.registry import load_model
    from pipeline.config import DecodeConfig, ImageLimits
    from pipeline.manifest import read_manifest
    from stages.caption.engine import CaptionEngine, EngineOptions
    from stages.encode import VisionEncoder
    from stages.preprocess import Preprocessor

    out, _ = samples_run
    ref = read_manifest(SAMPLES).ref(1, 0)                     # chelsea
    pre = Preprocessor(str(CKPT), "Describe this image in detail.", None, ImageLimits()).setup()
    loaded = load_model(CKPT, torch.float32, torch.device("cpu"))
    feats = VisionEncoder(loaded)([pre(ref)])
    cap = next(CaptionEngine(loaded, DecodeConfig(max_new_tokens=6), EngineOptions(max_batch_size=1)).run(feats))
    assert captions(out)[ref.path] == cap.text


def test_status_and_export(samples_run, tmp_path):
    out, _ = samples_run
    r = cli("status", str(out))
    assert r.returncode == 0, r.stderr
    assert "done       5 images in 3 shard(s): 5 ok, 0 failed" in r.stdout
    assert "pending    0 images in 0 shard(s)" in r.stdout and "img/s" in r.stdout and "complete   yes" in r.stdout
    base = rows(out)
    for fmt in ("json", "jsonl", "csv", "parquet"):
        target = tmp_path / f"all.{fmt}"
        r = cli("export", str(out), "--format", fmt, "-o", str(target))
        assert r.returncode == 0, r.stderr
        if fmt == "json":
            assert json.loads(target.read_text()) == captions(out)
        elif fmt == "jsonl":
            got = [json.loads(line) for line in target.read_text().splitlines()]
            assert [g["caption"] for g in got] == [b["caption"] for b in base]
        elif fmt == "csv":
            got = list(csv.DictReader(target.open(encoding="utf-8")))
            assert [g["key"] for g in got] == [b["key"] for b in base]
            assert [g["caption"] for g in got] == [b["caption"] for b in base]
        else:
            assert read_parquet_rows(target) == base


def test_rerun_is_a_noop(samples_run):
    out, _ = samples_run
    before = markers(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    r = cli("caption", "--manifest", str(SAMPLES), "--model", str(CKPT), "--out", str(out), "--dtype", "float32",
            "--max-new-tokens", "6", "--shard-size", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "this process: 0 shard(s) to do" in r.stderr and "loaded" not in r.stderr   # no model load
    assert "captions.json is up to date" in r.stderr                                  # not rebuilt either
    assert markers(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes


def test_changed_prompt_refused_then_overwrite(samples_run, tmp_path):
    src, _ = samples_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    r = cli("caption", "--manifest", str(SAMPLES), "--model", str(CKPT), "--out", str(out), "--dtype", "float32",
            "--max-new-tokens", "6", "--shard-size", "2", "--prompt", "What is this?")
    assert r.returncode == 2
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and 'question was "Describe this image in detail.", now "What is this?"' in errs[0]
    assert "--overwrite" in errs[0] and "Traceback" not in r.stderr
    assert markers(out) == markers(src)                       # nothing touched
    r = cli("caption", "--manifest", str(SAMPLES), "--model", str(CKPT), "--out", str(out), "--max-new-tokens", "6",
            "--dtype", "float32", "--shard-size", "2", "--prompt", "What is this?", "--overwrite", "--workers", "0")
    assert r.returncode == 0, r.stderr
    new = json.loads((out / "run.json").read_text())
    assert new["fingerprint_parts"]["question"] == "What is this?"
    assert all(r["run_fingerprint"] == new["fingerprint"] for r in rows(out))
    assert captions(out) != captions(src)


def test_retry_failed_recaptions_only_failed_rows(tmp_path):
    manifest, out, first = run_with_a_late_image(tmp_path)
    before = markers(out)
    assert caption(manifest=manifest, out=out, shard_size=2) == 0          # plain re-run: nothing to do
    assert markers(out) == before
    assert caption(manifest=manifest, out=out, shard_size=2, retry_failed=True) == 0
    after = markers(out)
    assert after["00001.done.json"] == before["00001.done.json"]              # shard 1 had no failure
    m0 = json.loads(after["00000.done.json"])
    assert (m0["attempt"], m0["processed"], m0["rows"], m0["status"]) == (1, 1, 2, {"ok": 2})
    assert m0["file"] == "00000.retry1.parquet" and not (out / "shards" / "00000.parquet").exists()
    second = {r["key"]: r for r in rows(out)}
    assert second["imgs/a.png"] == first["imgs/a.png"] and second["imgs/b.png"] == first["imgs/b.png"]
    assert second["imgs/late.png"]["status"] == "ok"
    fresh = tmp_path / "fresh"
    assert caption(manifest=manifest, out=fresh, shard_size=2) == 0
    assert captions(fresh) == captions(out) and len(captions(out)) == 3


def test_job_file_and_flag_override(tmp_path):
    job = tmp_path / "job.toml"
    shutil.copy(SAMPLES.parent / "samples" / "chelsea.png", tmp_path / "cat.png")
    (tmp_path / "m.txt").write_text("cat.png\n")
    job.write_text(f'manifest = "m.txt"\nmodel = "{CKPT}"\nout = "runs/cat"\nmax-new-tokens = 3\n'
                   f'workers = 0\nquiet = true\nprompt = "Name the animal."\n')
    r = cli("caption", "--config", str(job), "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "runs" / "cat" / "run.json").read_text())
    assert run["config"]["decode"]["max_new_tokens"] == 2 and run["config"]["prompt"] == "Name the animal."
    assert run["config"]["config_file"] == str(job)
    assert rows(tmp_path / "runs" / "cat")[0]["n_new_tokens"] <= 2


def test_batching_knobs_reach_the_code_that_uses_them(tmp_path, monkeypatch):
    """One BatchConfig, from flags to every consumer (engine, encoder batches, pool look-ahead, the
    MiniCPM-V-2 crops per vision call) and into run.json."""
    from pipeline import workers
    from pipeline.runner import Runner
    from stages.caption.engine import CaptionEngine

    seen = {}
    real_engine, real_pool, real_runner = CaptionEngine.__init__, workers.OrderedPool.__init__, Runner.__init__

    def engine(self, loaded, decode, options):
        seen.update(options=options, crops=loaded.model.max_crops_per_call)
        real_engine(self, loaded, decode, options)

    def pool(self, factory, n, ahead, on_crash, **limits):
        seen["ahead"] = ahead
        real_pool(self, factory, n, ahead, on_crash, **limits)

    def runner(self, stages):
        seen["encode_batch"] = stages.encode_batch
        real_runner(self, stages)

    monkeypatch.setattr(CaptionEngine, "__init__", engine)
    monkeypatch.setattr(workers.OrderedPool, "__init__", pool)
    monkeypatch.setattr(Runner, "__init__", runner)
    from PIL import Image

    Image.new("RGB", (60, 40), (90, 120, 150)).save(tmp_path / "r.png")
    (tmp_path / "m.txt").write_text("r.png\n")
    knobs = dict(batch_size=3, memory_budget=1.5, prefill_batch=2, kv_bucket=32, encode_batch=5, crops_per_call=2,
                 lookahead=7)
    out = tmp_path / "run"
    assert caption(manifest=tmp_path / "m.txt", model=MINICPM, out=out, max_new_tokens=2, **knobs) == 0
    o = seen["options"]
    assert (o.max_batch_size, o.memory_budget_gib, o.max_prefill_batch, o.kv_bucket) == (3, 1.5, 2, 32)
    assert (seen["crops"], seen["encode_batch"], seen["ahead"]) == (2, 5, 7)
    batch = json.loads((out / "run.json").read_text())["config"]["batch"]
    assert {k: batch[k] for k in ("max_batch_size", "max_prefill_batch", "kv_bucket", "encode_batch", "crops_per_call",
                                  "lookahead", "workers")} == {"max_batch_size": 3, "max_prefill_batch": 2,
                                                               "kv_bucket": 32, "encode_batch": 5, "crops_per_call": 2,
                                                               "lookahead": 7, "workers": 0}


def test_prompt_preset(tmp_path):
    from models.presets import BUNNY_MINDIE_NPU_TEMPLATE, MINDIE_BUNNY_QUESTION

    shutil.copy(SAMPLES.parent / "samples" / "rocket.jpg", tmp_path / "r.jpg")
    (tmp_path / "m.txt").write_text("r.jpg\n")
    r = cli("caption", "--manifest", str(tmp_path / "m.txt"), "--model", str(CKPT), "--out", str(tmp_path / "x"),
            "--prompt-preset", "mindie-minicpmv2")
    assert r.returncode == 2 and error_lines(r.stderr)[0].endswith(
        "prompt preset 'mindie-minicpmv2' is for minicpmv2, but the model is bunny")
    assert caption(manifest=tmp_path / "m.txt", out=tmp_path / "y", prompt_preset="mindie-bunny", max_new_tokens=2) == 0
    parts = json.loads((tmp_path / "y" / "run.json").read_text())["fingerprint_parts"]
    assert parts["template"] == BUNNY_MINDIE_NPU_TEMPLATE and parts["question"] == MINDIE_BUNNY_QUESTION
    # The row's prompt is exactly the preset's (9 spaces between the system sentences change the
    # ids), and that is not the model card template's length for the same question.
    from models.registry import load_frontend
    _, preset = load_frontend(CKPT, BUNNY_MINDIE_NPU_TEMPLATE)
    _, card = load_frontend(CKPT)
    n_preset, n_card = (len(p.build(MINDIE_BUNNY_QUESTION).ids) for p in (preset, card))
    assert n_preset != n_card
    assert rows(tmp_path / "y")[0]["n_prompt_tokens"] == n_preset


def test_usage_errors_are_one_line(tmp_path):
    (tmp_path / "m.txt").write_text("a.jpg\n")
    r = cli("caption", "--manifest", str(tmp_path / "m.txt"), "--model", str(CKPT), "--out", str(tmp_path / "o"),
            "--engine", "spark")
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "--engine must be local or ray" in r.stderr
    r = cli("caption", "--manifest", str(tmp_path / "nope.txt"), "--model", str(CKPT), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "manifest" in error_lines(r.stderr)[0] and "Traceback" not in r.stderr
    (tmp_path / "file").write_text("")
    r = cli("caption", "--manifest", str(tmp_path / "m.txt"), "--model", str(CKPT), "--out", str(tmp_path / "file" / "run"))
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr


def test_unwritable_output_one_error_no_half_shard(tmp_path, monkeypatch, caplog):
    """The shards folder refuses writes (EACCES, injected where the shard is written, so the test
    runs as root too): one error line, exit 2, and no half-written shard or temp file left."""
    import errno

    import pyarrow.parquet
    from typer.testing import CliRunner

    from cli.app import app

    shutil.copy(SAMPLES.parent / "samples" / "chelsea.png", tmp_path / "a.png")
    shutil.copy(SAMPLES.parent / "samples" / "coffee.png", tmp_path / "b.png")
    (tmp_path / "m.txt").write_text("a.png\nb.png\n")
    out = tmp_path / "run"
    assert caption(manifest=tmp_path / "m.txt", out=out, shard_size=1, max_new_tokens=2) == 0
    for p in (out / "shards").glob("00001.*"):      # as if killed before shard 1 was committed
        p.unlink()
    (out / "captions.json").unlink()

    def refuse(table, where, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(where))

    monkeypatch.setattr(pyarrow.parquet, "write_table", refuse)
    caplog.clear()
    res = CliRunner().invoke(app, ["caption", "--manifest", str(tmp_path / "m.txt"), "--model", str(CKPT), "--out",
                                   str(out), "--shard-size", "1", "--max-new-tokens", "2", "--workers", "0", "--quiet"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert len(errors) == 1 and "is not writable" in errors[0], errors
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.done.json", "00000.parquet"]


def test_vanished_output_dir(tmp_path, monkeypatch):
    from stages.write import ShardWriter

    shutil.copy(SAMPLES.parent / "samples" / "chelsea.png", tmp_path / "a.png")
    (tmp_path / "m.txt").write_text("a.png\n")
    out = tmp_path / "run"
    real = ShardWriter.commit

    def vanish_then_commit(self, *a, **k):
        shutil.rmtree(out)                 # e.g. a cleanup job or an unmounted volume
        return real(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "commit", vanish_then_commit)
    with pytest.raises(JobError, match=r"output .*run/shards vanished .*re-run") as e:
        caption(manifest=tmp_path / "m.txt", out=out, max_new_tokens=2)
    assert "\n" not in str(e.value) and not out.exists()


def test_infrastructure_failure_exit_code_then_resume(tmp_path, monkeypatch, caplog):
    """An engine that dies (device lost) on one shard: the other shards are committed, the run
    exits non-zero with a summary, and the same command afterwards finishes the job."""
    from stages.caption.engine import CaptionEngine

    names = ["camera.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    for n in names:
        shutil.copy(SAMPLES.parent / "samples" / n, tmp_path / n)
    (tmp_path / "m.txt").write_text("\n".join(names) + "\n")
    real = CaptionEngine.run

    def flaky(self, items):
        for rec in real(self, items):
            if rec.ref.key == "coffee.png":
                raise RuntimeError("NPU device lost")
            yield rec

    monkeypatch.setattr(CaptionEngine, "run", flaky)
    out = tmp_path / "run"
    assert caption(manifest=tmp_path / "m.txt", out=out, shard_size=1) == 1
    # shards already in the stream when it died (2, and 3 if the engine had pulled it) are not committed
    assert re.search(r"shard\(s\) not committed \(2(, 3)?\); re-run the same command", caplog.text)
    assert {"00000.done.json", "00001.done.json"} <= set(markers(out)) and "00002.done.json" not in markers(out)
    assert not (out / "captions.json").exists()
    monkeypatch.setattr(CaptionEngine, "run", real)
    assert caption(manifest=tmp_path / "m.txt", out=out, shard_size=1) == 0
    assert sorted(captions(out)) == sorted(names)
