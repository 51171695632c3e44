"""The judge on a hostile captions file: keys that name files outside --images (absolute paths,
`..`, symlinks) are never opened nor shown in the HTML report, and images go through the
captioner's safe opener (no EPS, caps), and the report renderer only renders the data it is given."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from typer.testing import CliRunner

from jobs.score import OK, OUTSIDE, ImageIndex

open_clip = pytest.importorskip("open_clip")

SECRET = (201, 13, 77)              # a colour no test image has: its thumbnail would give it away


def _solid(path: Path, rgb, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


@pytest.fixture()
def tree(tmp_path):
    """images/ (the judge's folder) next to private/ (not to be read), with links out and in."""
    root = tmp_path / "images"
    _solid(root / "a.png", (10, 120, 10))
    _solid(root / "sub" / "b.png", (10, 10, 120))
    secret = _solid(tmp_path / "private" / "secret.png", SECRET)
    (root / "sub" / "link_out.png").symlink_to(secret)                  # a file link leaving the folder
    (root / "dirlink").symlink_to(tmp_path / "private", target_is_directory=True)
    (root / "alias.png").symlink_to(root / "a.png")                     # a link that stays inside
    return root, secret


def test_keys_resolve_only_inside_images(tree):
    root, secret = tree
    idx = ImageIndex(root)
    a = os.path.realpath(root / "a.png")
    assert idx.resolve("a.png")[:2] == (a, OK)
    assert idx.resolve(str(root / "sub" / ".." / "a.png"))[:2] == (a, OK)          # `..` that stays inside
    assert idx.resolve("alias.png")[:2] == (a, OK)
    for key in (str(secret), "../private/secret.png", "sub/../../private/secret.png", "sub/link_out.png",
                "dirlink/secret.png", "link_out.png"):
        path, status, error = idx.resolve(key)
        assert (path, status) == (None, OUTSIDE) and "outside --images" in error, key
    assert idx.resolve("secret.png")[1] == "missing"          # the walk does not follow the folder link


SEGMENTS = st.sampled_from(["..", ".", "sub", "dirlink", "a.png", "secret.png", "link_out.png", "b.png", "x"])


def _resolves_inside(tmp_path_factory, parts, absolute):
    """Whatever the key, a resolved path is a real file under the real --images folder."""
    base = tmp_path_factory.getbasetemp() / "judge-tree"
    if not base.exists():
        root = base / "images"
        _solid(root / "a.png", (1, 2, 3)), _solid(root / "sub" / "b.png", (3, 2, 1))
        secret = _solid(base / "private" / "secret.png", SECRET)
        (root / "sub" / "link_out.png").symlink_to(secret)
        (root / "dirlink").symlink_to(base / "private", target_is_directory=True)
    root = base / "images"
    key = os.path.join(str(root) if absolute else "", *parts)
    path, status, _ = ImageIndex(root).resolve(key)
    real_root = os.path.realpath(root)
    assert (path is None) == (status != OK)
    if path is not None:
        assert os.path.commonpath([real_root, path]) == real_root and os.path.isfile(path)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(parts=st.lists(SEGMENTS, min_size=1, max_size=6), absolute=st.booleans())
def test_no_key_resolves_outside_images(tmp_path_factory, parts, absolute):
    _resolves_inside(tmp_path_factory, parts, absolute)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(parts=st.lists(SEGMENTS, min_size=1, max_size=10), absolute=st.booleans())
def test_no_key_resolves_outside_images_many(tmp_path_factory, parts, absolute):
    _resolves_inside(tmp_path_factory, parts, absolute)


def test_judge_opens_images_with_the_captioners_opener(tmp_path, monkeypatch):
    """EPS never reaches Pillow's EPS plugin (Ghostscript); a scan bomb and a pixel bomb are refused
    from their headers, with the captioner's statuses in the error."""
    from PIL import EpsImagePlugin

    from jobs.score import ScoreConfig, score_sources
    from image_files import png_header, scan_bomb
    from test_score import TINY, make_tiny_clip
    from jobs.score import ClipJudge

    eps_opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: eps_opened.append(1) or 1 / 0)
    root = tmp_path / "images"
    _solid(root / "ok.png", (1, 2, 3))
    (root / "ghost.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    (root / "bomb.png").write_bytes(png_header(20000, 20000))
    (root / "scans.jpg").write_bytes(scan_bomb())
    clip = make_tiny_clip(tmp_path / "clip")
    judge = ClipJudge.load(ScoreConfig(images=root, clip_weights=clip["safetensors"], clip_model=TINY, device="cpu"))
    keys = ["ok.png", "ghost.jpg", "bomb.png", "scans.jpg"]
    (rows,) = score_sources([{k: "a caption" for k in keys}], ImageIndex(root), judge)
    got = {r.key: (r.status, (r.error or "").split(":")[0]) for r in rows}
    assert got == {"ok.png": ("ok", ""), "ghost.jpg": ("unreadable", "not_an_image"),
                   "bomb.png": ("unreadable", "too_large"), "scans.jpg": ("unreadable", "too_large")}
    assert eps_opened == []


def _thumbnail_colours(report: str) -> list[tuple[int, int, int]]:
    out = []
    for b64 in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', report):
        px = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)
        out.append(tuple(int(v) for v in px.reshape(-1, 3).mean(0).round()))
    return out


def test_crafted_captions_cannot_put_another_image_in_the_report(tree, tmp_path):
    """Both runs caption the private file under every spelling; compare scores and shows only
    the images under --images, and the private one's rows say why they were not scored."""
    from cli.app import app
    from test_score import TINY, make_tiny_clip

    root, secret = tree
    clip = make_tiny_clip(tmp_path / "clip")
    sneaky = [str(secret), "../private/secret.png", "sub/link_out.png", "dirlink/secret.png"]
    a = {"a.png": "green", "sub/b.png": "blue", **{k: "a secret" for k in sneaky}}
    b = {"a.png": "a green square", "b.png": "a blue square", **{k: "the secret" for k in sneaky}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    report = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--images",
                                   str(root), "--clip-weights", str(clip["safetensors"]), "--clip-model", TINY,
                                   "--device", "cpu", "--html", str(report), "--save-scores", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = report.read_text(encoding="utf-8")
    colours = _thumbnail_colours(text)
    assert len(colours) == 2 and all(max(abs(c - s) for c, s in zip(col, SECRET)) > 40 for col in colours)
    assert "secret.png" not in text.replace("outside_images", "")
    assert "(common images 2;" in res.output
    for side in ("a", "b"):
        rows = {r["key"]: r for r in pq.read_table(tmp_path / f"{side}.scores.parquet").to_pylist()}
        assert {k: rows[k]["status"] for k in sneaky} == dict.fromkeys(sneaky, OUTSIDE)
        assert all(rows[k]["resolved_path"] is None for k in sneaky)


def test_the_renderer_renders_data_and_opens_nothing(monkeypatch):
    """render_report takes ReportData; with every way to open a file disabled it still renders."""
    import builtins

    from jobs.compare import paired_stats
    from jobs.report_html import ReportData, ReportPair, render_report
    from jobs.score import ScoreRow

    def refuse(*a, **k):
        raise AssertionError("the renderer opened a file")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(Image, "open", refuse)
    row_a = ScoreRow("k", "/img/k.png", "<b>a</b>", "ok", 0.25, 25.0, 80, True)
    row_b = ScoreRow("k", "/img/k.png", "b & c", "ok", 0.30, 30.0, 5, False)
    stats = paired_stats([0.25], [0.30], n_boot=100)
    data = ReportData(labels=("npu", "gpu"), sources=("a.json", "b.json"), judge="open_clip tiny", context_length=77,
                      stats=stats, verdict=stats.verdict("npu", "gpu"), only=(1, 0),
                      statuses=({"ok": 1, "outside_images": 2}, {"ok": 1}), truncated=(1, 0),
                      top=(ReportPair("/img/k.png", 0.05, row_a, row_b, "data:image/jpeg;base64,AAAA"),))
    html = render_report(data)
    assert '<img src="data:image/jpeg;base64,AAAA" alt="k.png">' in html
    assert "&lt;b&gt;a&lt;/b&gt;" in html and "b &amp; c" in html and "truncated: 80 tokens" in html
    assert "ok 1, outside_images 2; truncated captions 1" in html and "only in npu: 1" in html
