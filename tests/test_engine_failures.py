"""Failures that tell the truth (issue 10), on the tiny Bunny checkpoint in fp32.

- OOM / device errors are infrastructure: the stage raises, the shard is not committed, the run
  exits 1, and a re-run completes it (equal to a run that never failed).
- An input that breaks the engine (or the encoder) fails that image only: one error row, its
  neighbours' captions exactly as without it, and the shard is committed (no failure on re-run).
- A device call that never returns is ended by the watchdog with exit 1 and a clear line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch

from caption_helpers import CKPT, ROOT, caption, markers, reference_run, rows
from conftest import BUNNY
from helpers import features_for, inputs_for
from pipeline.config import DecodeConfig
from pipeline.errors import EXIT_INFRA
from pipeline.records import Caption, Failed
from stages import faults
from stages.caption.engine import CaptionEngine, EngineOptions
from stages.encode import VisionEncoder
from stages.watchdog import Watchdog

NAMES = ["rgb_640x480", "rgb_300x200", "rgb_1000x1000", "rgb_2000x500", "gray_480x640"]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _feats(loaded, golden):
    return features_for(loaded, BUNNY, golden, NAMES, "Describe this image in detail.")


@pytest.fixture(scope="module")
def alone(bunny_fp32, bunny_golden):
    """Each golden image decoded alone: what every neighbour of a poison input must still get."""
    out = {}
    for decode in (DecodeConfig(max_new_tokens=8), DecodeConfig(max_new_tokens=8, temperature=1.0, top_k=40, seed=3)):
        for f in _feats(bunny_fp32, bunny_golden):
            out[(decode.greedy, f.ref.key)] = next(iter(
                CaptionEngine(bunny_fp32, decode, EngineOptions(max_batch_size=1)).run([f]))).token_ids
    return out


# -- the engine --------------------------------------------------------------------------------------

@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("poison", ["nan", "wrong_width"])
def test_a_poison_input_fails_alone_and_its_neighbours_are_exact(bunny_fp32, bunny_golden, alone, greedy, poison):
    feats = _feats(bunny_fp32, bunny_golden)
    bad = feats[1]
    emb = bad.prompt_embeds.clone()
    if poison == "nan":
        emb[5] = float("nan")                  # a corrupt feature: NaN logits from the first token on
    else:
        emb = torch.cat([emb, emb[:, :3]], 1)  # the wrong hidden width: prefill raises
    stream = [*feats[:1], replace(bad, prompt_embeds=emb), *feats[2:], *feats]      # 10 requests, 3 slots
    stream = [replace(f, ref=replace(f.ref, index=i)) for i, f in enumerate(stream)]
    decode = DecodeConfig(max_new_tokens=8) if greedy else DecodeConfig(max_new_tokens=8, temperature=1.0,
                                                                           top_k=40, seed=3)
    eng = CaptionEngine(bunny_fp32, decode, EngineOptions(max_batch_size=3, max_prefill_batch=3, kv_bucket=1024))
    out = list(eng.run(stream))
    failed = [r for r in out if isinstance(r, Failed)]
    assert [(r.ref.index, r.stage, r.status) for r in failed] == [(1, "caption", "caption_error")]
    assert ("non-finite logits" if poison == "nan" else "RuntimeError") in failed[0].error
    ok = [r for r in out if isinstance(r, Caption)]
    assert len(ok) == 9 and eng.stats.failed == 1
    for r in ok:                                # neighbours, and later users of the poisoned slot
        assert r.token_ids == alone[(greedy, r.ref.key)], r.ref.index


def test_an_oom_in_decoding_is_raised_not_a_row(bunny_fp32, bunny_golden, monkeypatch):
    feats = _feats(bunny_fp32, bunny_golden)
    eng = CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=8), EngineOptions(max_batch_size=2))
    real, calls = eng._decode_step, []

    def oom_on_third(rows, slots=None):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError(OOM)
        return real(rows, slots)

    monkeypatch.setattr(eng, "_decode_step", oom_on_third)
    with pytest.raises(torch.OutOfMemoryError):
        list(eng.run(feats))
    assert eng.stats.failed == 0


def test_a_device_failing_every_row_is_infrastructure(bunny_fp32, bunny_golden, monkeypatch):
    """An unrecognised error that every image hits alone is the device's: raised after a streak."""
    feats = _feats(bunny_fp32, bunny_golden) * 3
    eng = CaptionEngine(bunny_fp32, DecodeConfig(max_new_tokens=4), EngineOptions(max_batch_size=2))
    monkeypatch.setattr(eng, "_prefill", lambda group: (_ for _ in ()).throw(RuntimeError("weird driver state")))
    with pytest.raises(faults.InfrastructureError, match="8 images in a row failed in captioning"):
        list(eng.run(feats))


def test_infrastructure_classification():
    assert faults.is_infrastructure(torch.OutOfMemoryError(OOM))
    assert faults.is_infrastructure(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert faults.is_infrastructure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert faults.is_infrastructure(RuntimeError("call aclnnMatmul failed, detail:EZ9999: Inner Error!"))
    assert faults.is_infrastructure(MemoryError())
    assert not faults.is_infrastructure(RuntimeError("The size of tensor a (131) must match the size of tensor b (128)"))
    assert not faults.is_infrastructure(ValueError("prompt has 3 image slots but the encoder gave 4 features"))


# -- the encoder -------------------------------------------------------------------------------------

def _inputs(loaded, golden):
    return inputs_for(loaded, BUNNY, golden, NAMES, "Describe.")


def test_encoder_oom_is_raised_and_logged(bunny_fp32, bunny_golden, monkeypatch, caplog):
    enc = VisionEncoder(bunny_fp32)
    monkeypatch.setattr(bunny_fp32.model, "encode_images", lambda px: (_ for _ in ()).throw(torch.OutOfMemoryError(OOM)))
    with caplog.at_level(logging.ERROR), pytest.raises(torch.OutOfMemoryError):
        enc(_inputs(bunny_fp32, bunny_golden))
    assert "vision encoding of 5 images failed: OutOfMemoryError" in caplog.text


def test_encoder_isolates_the_image_whose_error_recurs_alone(bunny_fp32, bunny_golden, monkeypatch, caplog):
    enc = VisionEncoder(bunny_fp32)
    items = _inputs(bunny_fp32, bunny_golden)
    clean = enc(items)
    real = type(bunny_fp32.model).encode_images
    poison = items[2].pixels

    def encode(px):
        if any(p is poison for p in px):
            raise RuntimeError("Input type (double) and bias type (float) should be the same")
        return real(bunny_fp32.model, px)

    monkeypatch.setattr(bunny_fp32.model, "encode_images", encode)
    with caplog.at_level(logging.WARNING):
        out = enc(items)
    assert "retrying them one by one" in caplog.text and "Traceback" in caplog.text     # the batch exception
    assert [type(r).__name__ for r in out] == ["VisionFeatures"] * 2 + ["Failed"] + ["VisionFeatures"] * 2
    assert out[2].status == "encode_error" and "should be the same" in out[2].error
    for a, b in zip(out, clean):
        if not isinstance(a, Failed):
            torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds, rtol=1e-5, atol=1e-5)


# -- through the caption job -------------------------------------------------------------------------
# The first 12 images of the shared corpus (3 shards of 4): its rows must equal those of the
# shared uninterrupted reference run.

@pytest.fixture(scope="module")
def corpus12():
    manifest, reference = reference_run()
    small = manifest.parent / "first12.txt"
    small.write_text("".join(manifest.read_text().splitlines(keepends=True)[:12]))
    return small, rows(reference)[:12]


def test_oom_in_encode_mid_shard_exits_1_and_a_rerun_completes(tmp_path, monkeypatch, corpus12):
    manifest, want = corpus12
    out = tmp_path / "run"
    real = VisionEncoder._encode

    def oom_on_img007(self, batch):           # img007 is in shard 1 (shards of 4)
        if any(b.ref.key == "img007.png" for b in batch):
            raise torch.OutOfMemoryError(OOM)
        return real(self, batch)

    monkeypatch.setattr(VisionEncoder, "_encode", oom_on_img007)
    args = dict(manifest=manifest, out=out, max_new_tokens=4, shard_size=4, dtype="float32", batch_size=2)
    assert caption(**args) == EXIT_INFRA
    done = markers(out)
    # the shards open in the dead stream (1, and 0 if it was not finished yet) are not committed;
    # the run went on with a fresh stream for shard 2
    assert "00001.done.json" not in done and "00002.done.json" in done
    assert not (out / "captions.json").exists()
    monkeypatch.setattr(VisionEncoder, "_encode", real)
    assert caption(**args) == 0
    assert {k: v for k, v in markers(out).items() if k in done} == done            # committed shards untouched
    assert rows(out) == want


def test_a_poison_image_is_one_error_row_and_its_shard_commits(tmp_path, monkeypatch, corpus12):
    manifest, want = corpus12
    out = tmp_path / "run"
    real = VisionEncoder._encode

    def nan_features_for_img007(self, batch):
        feats = real(self, batch)
        return [replace(f, prompt_embeds=torch.full_like(f.prompt_embeds, float("nan")))
                if f.ref.key == "img007.png" else f for f in feats]

    monkeypatch.setattr(VisionEncoder, "_encode", nan_features_for_img007)
    args = dict(manifest=manifest, out=out, max_new_tokens=4, shard_size=4, dtype="float32")
    assert caption(**args) == 0
    got = rows(out)
    bad = [r for r in got if r["status"] != "ok"]
    assert [(r["key"], r["status"], r["stage"]) for r in bad] == [("img007.png", "caption_error", "caption")]
    assert [r for r in got if r["key"] != "img007.png"] == [r for r in want if r["key"] != "img007.png"]
    before = markers(out)
    assert caption(**args) == 0 and markers(out) == before                         # nothing redone on re-run


# -- the watchdog ------------------------------------------------------------------------------------

def test_watchdog_reports_a_call_that_does_not_return():
    stalls = []
    dog = Watchdog(0.3, on_stall=lambda what, s: stalls.append((what, s)))
    with dog.guard("fast step"):
        time.sleep(0.01)
    with dog.guard("decode step"):
        time.sleep(1.2)
    assert len(stalls) == 1 and stalls[0][0] == "decode step" and stalls[0][1] > 0.3
    time.sleep(0.5)
    assert len(stalls) == 1                    # idle time between calls is not a stall


def test_a_call_holding_the_gil_is_ended_by_the_c_level_fallback():
    """A hang inside C code that keeps the GIL starves the watchdog thread: faulthandler exits."""
    code = textwrap.dedent("""
        import ctypes
        from stages import watchdog
        watchdog.GRACE_S = 1.0
        dog = watchdog.Watchdog(1.0)
        with dog.guard("decode step"):
            ctypes.PyDLL(None).sleep(60)      # PyDLL: the GIL stays held for the whole call
    """)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert p.returncode == EXIT_INFRA and "Timeout" in p.stderr and time.monotonic() - t0 < 40, p.stderr


HANG = textwrap.dedent("""
    import sys, time
    from stages.caption.engine import CaptionEngine
    real, calls = CaptionEngine._decode_step, []
    def hang(self, rows, slots=None):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(3600)                  # a device call that never returns
        return real(self, rows, slots)
    CaptionEngine._decode_step = hang
    from cli.app import main
    sys.argv = ["pipeline", *sys.argv[1:]]
    main()
""")


def test_a_hung_decode_ends_the_process_with_exit_1_and_a_rerun_completes(tmp_path, corpus12):
    manifest, want = corpus12
    out = tmp_path / "run"
    args = ["caption", "--manifest", str(manifest), "--model", str(CKPT), "--out", str(out), "--workers", "0",
            "--max-new-tokens", "4", "--shard-size", "4", "--dtype", "float32", "--quiet"]
    env = {**os.environ, "PIPELINE_STEP_TIMEOUT": "5"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HANG, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == EXIT_INFRA, p.stderr[-3000:]
    assert "decode step has not returned after" in p.stderr and "re-run the same command" in p.stderr
    assert time.monotonic() - t0 < 200
    assert len(markers(out)) < 3 and not (out / "captions.json").exists()
    subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, check=True, capture_output=True,
                   timeout=240)
    assert rows(out) == want
