"""Preprocessing limits on one untrusted image: progressive-scan bombs refused before decoding,
the per-image time limit (raised inside Python code, and enforced from outside by killing a
worker stuck in C), and `too_large` quoting the user's cap, not Pillow's."""

from __future__ import annotations

import io
import json
import shutil
import signal
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from caption_helpers import CKPT, SAMPLES, caption, rows
from image_files import jpeg, png_header, repeat_last_scan, scan_bomb
from pipeline.config import ImageLimits
from pipeline.records import Failed, ImageRef
from pipeline.workers import OrderedPool
from stages.jpeg_scans import MAX_SCANS, _count
from stages.preprocess import ImageError, Preprocessor, open_image, open_untrusted
from stages.time_limit import TimeLimitExceeded, time_limit

# libjpeg's default progression (jpeg_simple_progression): 10 scans for YCbCr, 6 for grayscale
DEFAULT_SCANS = {"RGB": 10, "L": 6}


def with_app1_thumbnail(data: bytes, thumb: bytes) -> bytes:
    """An APP1 segment holding a whole JPEG (an EXIF thumbnail carries its own scans) after SOI."""
    payload = b"Exif\x00\x00" + thumb
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


JPEGS = dict(mode=st.sampled_from(["RGB", "L"]), w=st.integers(8, 80), h=st.integers(8, 80), progressive=st.booleans(),
             repeats=st.integers(0, 150), thumbnail=st.booleans(), mpo_tail=st.booleans())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(**JPEGS)
def test_count_scans_counts_the_main_image_scans(mode, w, h, progressive, repeats, thumbnail, mpo_tail):
    _scans_counted(mode, w, h, progressive, repeats, thumbnail, mpo_tail)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(**JPEGS)
def test_count_scans_counts_the_main_image_scans_many(mode, w, h, progressive, repeats, thumbnail, mpo_tail):
    _scans_counted(mode, w, h, progressive, repeats, thumbnail, mpo_tail)


def _scans_counted(mode, w, h, progressive, repeats, thumbnail, mpo_tail):
    data = repeat_last_scan(jpeg(mode, (w, h), progressive), repeats)
    if thumbnail:
        data = with_app1_thumbnail(data, jpeg("RGB", (16, 12), True, seed=1))      # 10 scans of its own
    if mpo_tail:
        data += jpeg("L", (20, 20), True, seed=2)                             # a second picture: not counted
    expected = (DEFAULT_SCANS[mode] if progressive else 1) + repeats
    assert _count(data, 10**9) == expected
    assert _count(data, 5) == min(expected, 6)                               # stops once past the limit


def test_scan_bomb_is_refused_before_decoding(tmp_path):
    """One scan repeated 4,000 times (the adversarial pass's 469 KB file held a worker 32 s; this
    one decodes for minutes on this machine): refused from the marker walk in milliseconds."""
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(scan_bomb())
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as e:
        open_image(str(bomb), ImageLimits())
    assert e.value.status == "too_large" and f"over {MAX_SCANS} scans" in str(e.value)
    assert time.perf_counter() - t0 < 2.0
    ok = tmp_path / "progressive.jpg"                                       # an ordinary progressive photo
    ok.write_bytes(jpeg("RGB", (300, 200), True))
    assert np.array_equal(np.asarray(open_image(str(ok), ImageLimits())), np.asarray(Image.open(ok).convert("RGB")))


@pytest.mark.parametrize("pillow_limit", [None, "guard"])
@pytest.mark.parametrize("w,h", [(20000, 20000), (11000, 10000), (3000, 2000)])
def test_too_large_quotes_the_users_cap(tmp_path, monkeypatch, pillow_limit, w, h):
    """Whether Pillow's own guard (its default, or set to the cap by the workers) or our check
    refuses the header, the message names the size and the user's --max-image-pixels."""
    from stages.preprocess import pillow_guard

    cap = 5_000_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)       # restored after the test
    if pillow_limit == "guard":
        pillow_guard(ImageLimits(max_pixels=cap))
    (tmp_path / "big.png").write_bytes(png_header(w, h))
    with pytest.raises(ImageError) as e:
        open_untrusted(str(tmp_path / "big.png"), ImageLimits(max_pixels=cap))
    assert e.value.status == "too_large"
    assert str(e.value).endswith(f"{w * h} pixels, over the cap of {cap} (--max-image-pixels)"), str(e.value)


# -- the time limit ------------------------------------------------------------------------------

def test_time_limit_interrupts_python_code_and_restores_the_signal_state():
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(TimeLimitExceeded):
        with time_limit(0.2):
            while True:                        # pure Python: interrupted between bytecodes
                pass
    assert 0.15 < time.perf_counter() - t0 < 2.0
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_limit(5):                        # a block that finishes leaves no timer behind
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_time_limit_leaves_a_sooner_outer_timer_and_threads_alone():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with time_limit(10):                   # the outer timer fires first: ours is not armed
            time.sleep(0.5)
        assert fired == [1]
        signal.setitimer(signal.ITIMER_REAL, 30)
        with time_limit(0.1):                  # ours fires first; the outer one gets its rest back
            with pytest.raises(TimeLimitExceeded):
                time.sleep(2)
        assert 25 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30 and fired == [1]
        signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    out = []
    t = threading.Thread(target=lambda: out.append(time_limit(0.01).__enter__() is None))
    t.start(), t.join()
    assert out == [True]                       # off the main thread: a no-op, no error


def test_preprocessor_reports_timeout_and_goes_on(tmp_path):
    shutil.copy(SAMPLES.parent / "samples" / "chelsea.png", tmp_path / "a.png")
    pre = Preprocessor(str(CKPT), "Describe this image.", None, ImageLimits(max_seconds=0.3)).setup()
    real = pre.processor
    pre.processor = lambda im: time.sleep(30)
    ref = ImageRef("a.png", "a.png", str(tmp_path / "a.png"))
    t0 = time.perf_counter()
    rec = pre(ref)
    assert isinstance(rec, Failed) and rec.status == "timeout" and "over 0.3 s" in rec.error
    assert time.perf_counter() - t0 < 5
    pre.processor = real
    assert pre(ref).pixels.crops[0].shape == (3, 384, 384)          # the next image is unaffected


@dataclass(frozen=True)
class StuckInC:
    """Picklable stand-in stage: 'hang' blocks SIGALRM and sleeps, as a decoder stuck in one C
    call would (no Python-level limit can reach it); anything else comes back doubled."""

    def setup(self):
        return self

    def __call__(self, item):
        if item == "hang":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(600)
        return item * 2


def test_pool_kills_a_worker_stuck_past_the_limit_and_keeps_order():
    timeouts = []

    def on_timeout(item, msg):
        timeouts.append(msg)
        return "timeout"

    items = ["a", "b", "hang", "c", "d", "e"]
    t0 = time.perf_counter()
    with OrderedPool(StuckInC(), 2, ahead=4, on_crash=lambda i, m: "crashed", time_limit_s=0.5,
                     on_timeout=on_timeout, grace_s=1.0) as pool:
        out = list(pool.map(iter(items)))
    assert out == ["aa", "bb", "timeout", "cc", "dd", "ee"]
    assert len(timeouts) == 1 and "killed after 1.5 s" in timeouts[0] and pool.restarts == 1
    assert time.perf_counter() - t0 < 60                             # not the 600 s sleep


def test_max_image_seconds_through_the_caption_job(tmp_path):
    """--max-image-seconds reaches the workers' limit (every image times out at 1 ms) and is
    recorded in run.json with the other limits."""
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(SAMPLES.parent / "samples" / name, tmp_path / name)
    (tmp_path / "m.txt").write_text("chelsea.png\ncoffee.png\n")
    assert caption(manifest=tmp_path / "m.txt", out=tmp_path / "run", max_image_seconds=0.001) == 0
    got = rows(tmp_path / "run")
    assert [(r["status"], r["stage"]) for r in got] == [("timeout", "preprocess")] * 2
    assert "--max-image-seconds" in got[0]["error"]
    limits = json.loads((tmp_path / "run" / "run.json").read_text())["config"]["limits"]
    assert limits == {"max_pixels": 100_000_000, "max_aspect_ratio": 50.0, "max_seconds": 0.001}
