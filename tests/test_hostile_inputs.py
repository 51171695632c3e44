"""Hostile inputs: a corpus of broken, odd and malicious files (generated here) captioned in one
run through the CLI with worker processes. Every item gets exactly one row with the expected
status, the run completes, and the good images around them get the captions they get alone."""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_helpers import CKPT, SAMPLES, captions, cli, rows
from image_files import png_header, scan_bomb
from pipeline.config import ImageLimits
from stages.preprocess import ImageError, open_image

SAMPLE_DIR = SAMPLES.parent / "samples"


def _exif_rotated(path: Path) -> Image.Image:
    """A 96x48 JPEG whose EXIF says 'rotate 90 CW to display' (orientation 6); returns the upright image."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)
    return Image.open(path).transpose(Image.Transpose.ROTATE_270)     # what a viewer shows: 48 x 96


def build_corpus(root: Path) -> tuple[Path, dict[str, str], dict[str, Path]]:
    """Files + manifest; returns (manifest, {manifest line: expected status}, {line: equivalent clean image})."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}
    same_as: dict[str, Path] = {}
    clean = root / "clean"
    clean.mkdir()

    shutil.copy(SAMPLE_DIR / "chelsea.png", root / "good_first.png")
    expect["good_first.png"] = "ok"
    jpg = io.BytesIO()
    Image.open(SAMPLE_DIR / "coffee.png").convert("RGB").save(jpg, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) * 6 // 10])
    expect["truncated.jpg"] = "truncated"
    (root / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "not_an_image"
    (root / "text.jpg").write_text("this is not an image\n")
    expect["text.jpg"] = "not_an_image"
    # Pillow would hand this to Ghostscript if EPS were allowed
    (root / "ghost.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    expect["ghost.jpg"] = "not_an_image"
    (root / "bomb.png").write_bytes(png_header(20000, 20000))      # 4e8 px: Pillow's own error
    expect["bomb.png"] = "too_large"
    (root / "bomb_small.png").write_bytes(png_header(11000, 10000))  # 1.1e8 px: between cap and 2 x cap
    expect["bomb_small.png"] = "too_large"
    Image.new("CMYK", (80, 60), (0, 128, 255, 10)).save(root / "cmyk.jpg")
    expect["cmyk.jpg"] = "ok"
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(root / "gray16.png")
    expect["gray16.png"] = "ok"
    pal = Image.new("P", (50, 40), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    pal.paste(0, (0, 0, 25, 40))
    pal.save(root / "palette_alpha.png", transparency=0)
    expect["palette_alpha.png"] = "ok"
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.open(root / "animated.gif").convert("RGB").save(clean / "gif_frame0.png")
    expect["animated.gif"] = "ok"
    same_as["animated.gif"] = clean / "gif_frame0.png"
    _exif_rotated(root / "exif_rotated.jpg").save(clean / "upright.png")
    expect["exif_rotated.jpg"] = "ok"
    same_as["exif_rotated.jpg"] = clean / "upright.png"
    Image.new("RGB", (1, 20000), (9, 9, 9)).save(root / "strip.png")
    expect["strip.png"] = "extreme_aspect"
    expect["does/not/exist.jpg"] = "missing"
    (root / "dir.jpg").mkdir()
    expect["dir.jpg"] = "not_a_file"
    os.mkfifo(root / "fifo.jpg")                                    # opening it would block forever
    expect["fifo.jpg"] = "not_a_file"
    shutil.copy(SAMPLE_DIR / "rocket.jpg", root / "unreadable.jpg")      # EACCES injected (see the test)
    expect["unreadable.jpg"] = "unreadable"
    (root / "scan_bomb.jpg").write_bytes(scan_bomb())                 # decodes for tens of seconds
    expect["scan_bomb.jpg"] = "too_large"
    (root / "图片").mkdir()
    shutil.copy(SAMPLE_DIR / "camera.png", root / "图片" / "猫 ü.png")
    expect["图片/猫 ü.png"] = "ok"
    shutil.copy(SAMPLE_DIR / "rocket.jpg", root / "good_last.jpg")
    expect["good_last.jpg"] = "ok"
    manifest = root / "hostile.txt"
    manifest.write_text("\n".join(expect) + "\n", encoding="utf-8")
    return manifest, expect, same_as


def test_hostile_corpus_one_run(tmp_path):
    manifest, expect, same_as = build_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    # the workers get EACCES on unreadable.jpg whoever runs the test (root reads a chmod 000 file)
    paths = [str(Path(__file__).parent / "inject_eacces"), os.environ.get("PYTHONPATH", "")]
    inject = {"PYTHONPATH": os.pathsep.join(p for p in paths if p),
              "VLM_TEST_EACCES": str(manifest.parent / "unreadable.jpg")}
    r = cli("caption", "--manifest", str(manifest), "--model", str(CKPT), "--out", str(out), "--max-new-tokens", "4",
            "--shard-size", "4", "--workers", "2", "--quiet", timeout=400, env=inject)
    assert r.returncode == 0, r.stderr
    got = rows(out)
    assert [g["key"] for g in got] == list(expect)                  # exactly one row each, in manifest order
    assert {g["key"]: g["status"] for g in got} == expect
    for g in got:
        if g["status"] == "ok":
            assert g["caption"] and g["error"] is None
        else:
            assert g["caption"] is None and g["error"] and g["stage"] == "preprocess"
    by_key = {g["key"]: g for g in got}
    assert (by_key["exif_rotated.jpg"]["width"], by_key["exif_rotated.jpg"]["height"]) == (48, 96)
    assert "110000000" in by_key["bomb_small.png"]["error"]      # refused from the header, never decoded
    assert by_key["bomb.png"]["error"] == "400000000 pixels, over the cap of 100000000 (--max-image-pixels)"
    assert "permission denied" in by_key["unreadable.jpg"]["error"]
    assert "scans" in by_key["scan_bomb.jpg"]["error"]

    # the good images, and clean equivalents of the odd-but-valid ones, captioned on their own
    alone_dir = tmp_path / "alone"
    alone_dir.mkdir()
    lines = []
    for key in ("good_first.png", "图片/猫 ü.png", "good_last.jpg"):
        lines.append(str(manifest.parent / key))
    lines += [str(p) for p in same_as.values()]
    (alone_dir / "m.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = cli("caption", "--manifest", str(alone_dir / "m.txt"), "--model", str(CKPT), "--out", str(alone_dir / "run"),
            "--max-new-tokens", "4", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    alone = captions(alone_dir / "run")
    hostile = captions(out)
    for key in ("good_first.png", "图片/猫 ü.png", "good_last.jpg"):
        assert hostile[key] == alone[str(manifest.parent / key)]
    for key, clean in same_as.items():
        assert hostile[key] == alone[str(clean)]


def test_unreadable_file(tmp_path, monkeypatch):
    """EACCES from the open itself (injected: root would read a chmod 000 file) is `unreadable`."""
    p = tmp_path / "x.jpg"
    shutil.copy(SAMPLE_DIR / "rocket.jpg", p)
    real = os.open

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == str(p):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageError) as e:
        open_image(str(p), ImageLimits())
    assert e.value.status == "unreadable" and str(p) in str(e.value)


def test_conversions_keep_content(tmp_path):
    """16-bit data is scaled (not clipped to white); transparency shows white; CMYK becomes RGB."""
    # CMYK -> RGB as (255 - ink) x (255 - black) / 255 per channel: (0, 128, 255, 10) -> (245, 122, 0)
    c, k = np.array([0, 128, 255]), 10
    Image.new("CMYK", (6, 4), (*c.tolist(), k)).save(tmp_path / "cmyk.tif")
    im = open_image(str(tmp_path / "cmyk.tif"), ImageLimits())
    want = np.round((255 - c) * (255 - k) / 255).astype(int).tolist()
    assert im.mode == "RGB" and want == [245, 122, 0] and np.asarray(im).reshape(-1, 3).tolist() == [want] * 24
    a16 = np.full((10, 10), 0x8000, dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g.png")
    assert np.asarray(open_image(str(tmp_path / "g.png"), ImageLimits()))[0, 0].tolist() == [128, 128, 128]
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(open_image(str(tmp_path / "t.png"), ImageLimits()))[0, 0].tolist() == [255, 255, 255]
    im = open_image(str(tmp_path / "g.png"), ImageLimits(max_pixels=100))
    assert im.mode == "RGB"
    with pytest.raises(ImageError) as e:
        open_image(str(tmp_path / "g.png"), ImageLimits(max_pixels=99))
    assert e.value.status == "too_large"


def test_long_side_bounded_before_the_processor(tmp_path):
    """Bunny pads to a square before resizing: a wide image under the pixel cap must not make the
    processor allocate longer_side^2 pixels. The row still reports the original size."""
    from pipeline.records import ImageRef
    from stages.preprocess import Preprocessor, bound_side

    limits = ImageLimits(max_pixels=10**6)                      # longest side fed to a processor: 1000
    assert bound_side(Image.new("RGB", (3000, 100)), limits).size == (1000, 33)
    small = Image.new("RGB", (900, 80))
    assert bound_side(small, limits) is small
    Image.new("RGB", (3000, 100), (10, 200, 10)).save(tmp_path / "wide.png")
    seen = []
    pre = Preprocessor(str(CKPT), "Describe this image.", None, limits).setup()
    real = pre.processor
    pre.processor = lambda im: seen.append(im.size) or real(im)
    rec = pre(ImageRef("wide.png", "wide.png", str(tmp_path / "wide.png")))
    assert seen == [(1000, 33)] and (rec.width, rec.height) == (3000, 100)
    assert tuple(rec.pixels.crops[0].shape) == (3, 384, 384)
