"""Paired comparison: bootstrap CI (deterministic, covers the truth), counts, verdicts, the CLI and its HTML."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.compare import Pair, bootstrap_mean_ci, most_different, pair_rows, paired_stats
from jobs.score import ScoreRow

ROOT = Path(__file__).resolve().parents[1]


def _row(key, path, cos, status="ok"):
    return ScoreRow(key, path, f"caption of {key}", status, cos, None if cos is None else 100 * max(cos, 0.0),
                    5, False)


# -- statistics ------------------------------------------------------------------------------------

def _synthetic(seed, n=100, true_diff=0.02):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.30, 0.05, n)
    b = a + true_diff + rng.normal(0.0, 0.03, n)     # paired: B = A + effect + noise
    return a, b


def test_bootstrap_ci_is_deterministic_for_a_seed():
    a, b = _synthetic(1)
    first = paired_stats(a, b, seed=7)
    assert paired_stats(a, b, seed=7) == first
    other = paired_stats(a, b, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    assert abs(other.ci_low - first.ci_low) < 2e-3            # but only Monte Carlo noise apart
    assert first.n_boot == 10_000 and first.seed == 7


def test_bootstrap_ci_contains_the_true_difference_and_has_the_right_width():
    a, b = _synthetic(3)
    s = paired_stats(a, b, seed=0)
    assert s.ci_low < 0.02 < s.ci_high
    assert s.ci_low < s.mean_diff < s.ci_high
    d = b - a
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))             # normal approximation of the same CI
    assert (s.ci_high - s.ci_low) / 2 == pytest.approx(half, rel=0.1)
    assert s.significant and s.verdict().startswith("B better than A: +0.0")


def test_bootstrap_coverage_is_near_95_percent():
    hits, reps = 0, 300
    for seed in range(reps):
        a, b = _synthetic(1000 + seed, n=40)
        lo, hi = bootstrap_mean_ci(b - a, n_boot=1000, seed=seed)
        hits += lo < 0.02 < hi
    assert 0.89 <= hits / reps <= 0.99, hits / reps


def test_bootstrap_chunking_does_not_change_the_result():
    d = np.random.default_rng(0).normal(size=37)
    lo, hi = bootstrap_mean_ci(d, 2500, seed=3, chunk=2500)
    lo2, hi2 = bootstrap_mean_ci(d, 2500, seed=3, chunk=1000)
    # same generator stream consumed in the same order: identical draws
    assert (lo, hi) == (lo2, hi2)


def test_wins_ties_losses_and_tie_tolerance():
    a = [0.30, 0.30, 0.30, 0.30, 0.30]
    b = [0.31, 0.3005, 0.2995, 0.29, 0.301]      # +0.01, +0.0005, -0.0005, -0.01, +0.001
    s = paired_stats(a, b, n_boot=200)
    assert (s.wins, s.ties, s.losses) == (2, 2, 1)
    s = paired_stats(a, b, n_boot=200, tie_tol=0.0)
    assert (s.wins, s.ties, s.losses) == (3, 0, 2)
    assert s.mean_diff == pytest.approx(0.0002)
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        paired_stats([1, 2], [1])


def test_verdicts():
    a, b = _synthetic(3)
    assert paired_stats(b, a).verdict("gpu", "npu").startswith("gpu better than npu: +0.0")
    s = paired_stats(b, a)
    v = s.verdict("gpu", "npu")
    assert f"[95% CI {-s.ci_high:+.4f}, {-s.ci_low:+.4f}]" in v       # stated as better − worse
    same = paired_stats(a, a + np.random.default_rng(0).normal(0, 0.01, len(a)))
    assert not same.significant and same.verdict().startswith("no significant difference: B − A = ")
    assert paired_stats([], []).verdict() == "no common images: nothing to compare"


def test_pairs_join_on_the_resolved_file():
    rows_a = [_row("/data/coco/1.jpg", "/data/coco/1.jpg", 0.30), _row("/data/coco/2.jpg", "/data/coco/2.jpg", 0.20),
              _row("/data/coco/3.jpg", None, None, "missing"),
              _row("1.jpg", "/data/coco/1.jpg", 0.99)]       # same file again under another key: ignored
    rows_b = [_row("2.jpg", "/data/coco/2.jpg", 0.25), _row("1.jpg", "/data/coco/1.jpg", 0.10),
              _row("4.jpg", "/data/coco/4.jpg", 0.5)]
    pairs = pair_rows(rows_a, rows_b)
    assert [(p.path, round(p.diff, 6)) for p in pairs] == [("/data/coco/1.jpg", -0.2), ("/data/coco/2.jpg", 0.05)]
    assert [p.path for p in most_different(pairs, 1)] == ["/data/coco/1.jpg"]
    assert isinstance(pairs[0], Pair) and pairs[0].a.key == "/data/coco/1.jpg" and pairs[0].b.key == "1.jpg"


# -- the command and its report --------------------------------------------------------------------

@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """`pipeline compare` on a tiny CLIP: A keyed by full paths (NPU style), B by file names (GPU style)."""
    pytest.importorskip("open_clip")
    from test_score import make_images, make_tiny_clip

    from cli.app import app

    tmp = tmp_path_factory.mktemp("compare")
    clip = make_tiny_clip(tmp / "clip")
    root = tmp / "images"
    files = make_images(root)
    names = ["rgb_64x48.png", "rgb_40x90.jpg", "sub/gray_50x50.jpg", "sub/rgba_33x20.png"]
    a = {str(files[n]): f"a photo, number {i}" for i, n in enumerate(names)}
    a[str(files["broken.jpg"])] = "broken"
    b = {Path(n).name: f"<script>alert({i})</script> & a drawing \"{i}\"" for i, n in enumerate(names)}
    b["only_b_missing.png"] = "missing in both"
    (tmp / "npu.json").write_text(json.dumps(a))
    (tmp / "gpu.json").write_text(json.dumps(b))
    report = tmp / "report.html"
    res = CliRunner().invoke(app, ["compare", str(tmp / "npu.json"), str(tmp / "gpu.json"), "--images", str(root),
                                   "--clip-weights", str(clip["safetensors"]), "--clip-model", "tiny-clip-test",
                                   "--device", "cpu", "--html", str(report), "--top-k", "3", "--seed", "5",
                                   "--save-scores", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"tmp": tmp, "res": res, "report": report, "a": a, "b": b, "files": files, "clip": clip, "root": root}


def test_compare_cli_equals_two_score_runs(compared):
    import pyarrow.parquet as pq

    tmp = compared["tmp"]
    sa = pq.read_table(tmp / "npu.scores.parquet").to_pylist()
    sb = pq.read_table(tmp / "gpu.scores.parquet").to_pylist()
    ca = {r["resolved_path"]: r["cosine"] for r in sa if r["status"] == "ok"}
    cb = {r["resolved_path"]: r["cosine"] for r in sb if r["status"] == "ok"}
    common = sorted(set(ca) & set(cb))
    assert len(common) == 4
    diff = np.array([cb[p] - ca[p] for p in common])
    expected = paired_stats([ca[p] for p in common], [cb[p] for p in common], seed=5)
    out = compared["res"].output
    assert expected.verdict("npu", "gpu") in out
    assert f"npu: mean cosine {np.mean(list(ca.values())):.4f}" in out
    assert "(common images 4; only in npu 0, only in gpu 0)" in out
    biggest = common[int(np.argmax(np.abs(diff)))]
    assert f"Δ {cb[biggest] - ca[biggest]:+.4f}  {biggest}" in out


def test_html_report_is_self_contained_and_escaped(compared):
    text = compared["report"].read_text(encoding="utf-8")
    assert text.count('<tr class="pair"') == 3                            # --top-k 3
    assert len(re.findall(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"', text)) == 3
    assert "<script>" not in text and "&lt;script&gt;alert(0)&lt;/script&gt; &amp; a drawing &quot;0&quot;" in text
    assert not re.search(r'(src|href)="(?!data:)', text)                 # nothing fetched from outside
    assert "npu vs gpu" in text and "unreadable 1" in text and "missing 1" in text


def _render_script():
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "scripts" / "render_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_check_refuses_images_that_are_not_embedded():
    """The headless check's verdict on what Chromium reported (no browser needed for this part)."""
    render = _render_script()
    good = {"alt": "a.png", "w": 32, "h": 24, "ok": True, "scheme": "data"}
    assert render.problems({"rows": 1, "imgs": [good]}) == []
    for bad, why in (({**good, "scheme": "file"}, "not embedded (a 'file' URL)"),
                     ({**good, "scheme": "https"}, "not embedded (a 'https' URL)"),
                     ({**good, "w": 0}, "did not render (0x24)")):
        assert [why in p for p in render.problems({"rows": 1, "imgs": [bad]})] == [True]
    assert render.problems({"rows": 2, "imgs": [good]}) == ["2 image rows but 1 images"]


@pytest.mark.skipif(not Path("/usr/bin/chromium").is_file(),
                    reason="headless check needs /usr/bin/chromium (apt-get install -y chromium)")
def test_html_report_renders_every_image_in_chromium(compared, tmp_path):
    render = _render_script()
    info = render.probe_report(compared["report"], "/usr/bin/chromium")
    assert info["rows"] == 3 and len(info["imgs"]) == 3
    assert all(i["ok"] and 0 < i["w"] <= 256 and 0 < i["h"] <= 256 for i in info["imgs"]), info["imgs"]
    shown = {i["alt"] for i in info["imgs"]}
    assert shown <= {"rgb_64x48.png", "rgb_40x90.jpg", "gray_50x50.jpg", "rgba_33x20.png"} and len(shown) == 3
    assert info["verdict"].startswith(("npu better", "gpu better", "no significant difference"))
    assert render.problems(info) == []
    # the probe really can fail: a broken data URI is reported
    bad = tmp_path / "bad.html"
    bad.write_text(compared["report"].read_text(encoding="utf-8").replace("base64,/9j/", "base64,AAAA", 1))
    assert len(render.problems(render.probe_report(bad, "/usr/bin/chromium"))) == 1
