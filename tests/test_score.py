"""CLIP judge: scores equal a direct open_clip computation (the MindIE scorer's loop), through the
same `--clip-weights` path users take, with a tiny random open_clip model registered at test time."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

open_clip = pytest.importorskip("open_clip")

from jobs import score as score_job  # noqa: E402
from jobs.score import ImageIndex, ScoreConfig, ScoreError, read_captions  # noqa: E402
from cli.app import app  # noqa: E402

TINY = "tiny-clip-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
LONG = "a " * 76          # 76 BPE tokens + sot + eot = 78 > 77: truncated
EDGE = "a " * 75          # 77 tokens: exactly the context, not truncated


def make_tiny_clip(root: Path, seed: int = 0) -> dict[str, Path]:
    """Register the tiny config and save one random state dict as .safetensors and as torch .pt."""
    from safetensors.torch import save_file
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / f"{TINY}.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, pretrained=None)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(root / "tiny.safetensors"))
    torch.save(sd, root / "tiny.pt")
    return {"config": cfg, "safetensors": root / "tiny.safetensors", "pt": root / "tiny.pt"}


def make_images(root: Path) -> dict[str, Path]:
    """Varied sizes and modes, a nested folder, a duplicate base name and a broken file."""
    rng = np.random.default_rng(0)
    files = {
        "rgb_64x48.png": (64, 48, "RGB"), "rgb_40x90.jpg": (40, 90, "RGB"),
        "sub/gray_50x50.jpg": (50, 50, "L"), "sub/rgba_33x20.png": (33, 20, "RGBA"),
        "dup/a/same.png": (30, 30, "RGB"), "dup/b/same.png": (31, 31, "RGB"),
    }
    out = {}
    for rel, (w, h, mode) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, size=(h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(p)
        out[rel] = p
    broken = root / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    out["broken.jpg"] = broken
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    return root, make_images(root)


def reference_scores(weights: Path, captions: dict[str, str], paths: dict[str, Path]) -> dict[str, float]:
    """The MindIE clip_score script's loop, unbatched, with open_clip's own weight loading."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(weights))
    model.eval()
    tok = open_clip.get_tokenizer(TINY)
    out = {}
    with torch.no_grad():
        for key, cap in captions.items():
            img = preprocess(Image.open(paths[key])).unsqueeze(0)
            s = F.cosine_similarity(model.encode_image(img).float(), model.encode_text(tok([cap])).float())
            out[key] = float(s.squeeze())
    return out


def run_cli(*args: str):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_cli_scores_equal_direct_open_clip(tiny, images, tmp_path):
    root, files = images
    captions = {
        str(files["rgb_64x48.png"]): "a photo of a red cat on a sofa",          # absolute path
        "sub/gray_50x50.jpg": "a grey square",                                # relative to --images
        "rgba_33x20.png": "一只猫坐在沙发上",                                   # base name, nested
        "rgb_40x90.jpg": LONG,                                                # base name, truncated
        "/elsewhere/rgb_40x90.jpg": EDGE,                                     # absolute, not there -> name
        "same.png": "ambiguous",                                              # two files of that name
        "nothere.png": "missing",
        "broken.jpg": "unreadable",
        "sub/rgba_33x20.png": None,                                           # failed row upstream
    }
    src = tmp_path / "predict_result.json"
    src.write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    res = run_cli("score", src, "--images", root, "--clip-weights", tiny["safetensors"],
                  "--clip-model", TINY, "--device", "cpu", "--batch-size", "2", "--quiet")

    out = tmp_path / "predict_result.scores.parquet"
    table = pq.read_table(out)
    assert table.column_names == ["key", "resolved_path", "caption", "status", "cosine", "clip_score",
                                  "n_tokens", "truncated", "error"]
    rows = {r["key"]: r for r in table.to_pylist()}
    assert list(rows) == list(captions)
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {
        str(files["rgb_64x48.png"]): "ok", "sub/gray_50x50.jpg": "ok", "rgba_33x20.png": "ok",
        "rgb_40x90.jpg": "ok", "/elsewhere/rgb_40x90.jpg": "ok", "same.png": "ambiguous",
        "nothere.png": "missing", "broken.jpg": "unreadable", "sub/rgba_33x20.png": "no_caption"}
    assert rows["broken.jpg"]["error"].startswith("not_an_image: ")           # the safe opener said why
    assert "2 files named 'same.png'" in rows["same.png"]["error"]

    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    paths = {k: Path(r["resolved_path"]) for k, r in ok.items()}
    assert paths["rgba_33x20.png"] == files["sub/rgba_33x20.png"].resolve()
    assert paths["/elsewhere/rgb_40x90.jpg"] == files["rgb_40x90.jpg"].resolve()
    ref = reference_scores(tiny["pt"], {k: captions[k] for k in ok}, paths)
    for k, r in ok.items():
        assert r["cosine"] == pytest.approx(ref[k], abs=2e-6), k
        assert r["clip_score"] == pytest.approx(100 * max(ref[k], 0.0), abs=2e-4)
    for k in ("same.png", "nothere.png", "broken.jpg"):
        assert rows[k]["cosine"] is None

    mean = float(np.mean([ref[k] for k in ok]))
    median = float(np.median([ref[k] for k in ok]))
    assert f"mean cosine {mean:.4f}  median {median:.4f}" in res.output
    assert "scored 5 of 9 images; not scored: ambiguous 1, missing 1, no_caption 1, unreadable 1" in res.output
    assert "truncated captions: 1 of 5" in res.output
    meta = table.schema.metadata
    assert meta[b"score.clip_model"] == TINY.encode() and meta[b"score.clip_weights"] == b"tiny.safetensors"


def test_truncation_follows_the_open_clip_tokenizer(tiny, images, tmp_path):
    root, files = images
    name = "rgb_64x48.png"
    caps = {"short": "a cat", "edge": EDGE, "long": LONG, "essay": "Write an essay. " * 40, "empty": ""}
    cfg = ScoreConfig(images=root, clip_weights=tiny["safetensors"], clip_model=TINY, device="cpu")
    judge = score_job.ClipJudge.load(cfg)
    index = ImageIndex(root)
    (rows,) = score_job.score_sources([{name: c} for c in caps.values()][0:1], index, judge)
    assert rows[0].n_tokens == 4 and rows[0].truncated is False

    tok = open_clip.get_tokenizer(TINY)
    for label, cap in caps.items():
        ids = tok([cap])[0]
        n = judge.count_tokens(cap)
        n_kept = int((ids != 0).sum())                  # 0 is the pad id
        if n <= 77:
            assert n == n_kept, label                   # every token kept
        else:
            assert n_kept == 77 and int(ids[-1]) == tok.eot_token_id, label   # cut, end token kept
    assert {k: judge.count_tokens(c) for k, c in caps.items()} == {
        "short": 4, "edge": 77, "long": 78, "essay": 2 + 40 * 4, "empty": 2}   # write|an|essay|.

    rows = score_job.score_sources([{name: c} for c in caps.values()], index, judge)
    assert [r[0].truncated for r in rows] == [False, False, True, True, False]
    assert score_job.summarize([r[0] for r in rows]).n_truncated == 2


def test_batched_equals_unbatched_and_weight_formats_agree(tiny, images):
    root, files = images
    caps = {k: f"caption number {i}" for i, k in enumerate(["rgb_64x48.png", "rgb_40x90.jpg", "gray_50x50.jpg",
                                                            "rgba_33x20.png", "broken.jpg"])}
    results = []
    for weights, bs in ((tiny["safetensors"], 1), (tiny["safetensors"], 3), (tiny["pt"], 8)):
        cfg = ScoreConfig(images=root, clip_weights=weights, clip_model=TINY, device="cpu", batch_size=bs)
        (rows,) = score_job.score_sources([caps], ImageIndex(root), score_job.ClipJudge.load(cfg), bs, workers=2)
        results.append([r.cosine for r in rows])
    assert results[0][-1] is None and [r is None for r in results[1]] == [False] * 4 + [True]
    for other in results[1:]:
        np.testing.assert_allclose(np.array(other[:4]), np.array(results[0][:4]), atol=1e-6)


def test_same_image_two_sources_is_encoded_once(tiny, images, monkeypatch):
    root, _ = images
    cfg = ScoreConfig(images=root, clip_weights=tiny["safetensors"], clip_model=TINY, device="cpu")
    judge = score_job.ClipJudge.load(cfg)
    opened = []
    real = judge.load_image
    monkeypatch.setattr(judge, "load_image", lambda p: opened.append(p) or real(p))
    a = {"rgb_64x48.png": "x", "rgb_40x90.jpg": "y"}
    b = {str(root / "rgb_64x48.png"): "z", "rgb_40x90.jpg": "y"}
    ra, rb = score_job.score_sources([a, b], ImageIndex(root), judge, batch_size=4)
    assert sorted(opened) == sorted(str((root / n).resolve()) for n in ("rgb_40x90.jpg", "rgb_64x48.png"))
    assert ra[1].cosine == rb[1].cosine                 # same image, same caption: same score


def test_run_dir_inputs(tmp_path):
    import pyarrow as pa
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    for i, rows in enumerate([[("k1", "img/1.jpg", "one", "ok"), ("k2", "img/2.jpg", None, "unreadable")],
                              [("k3", "img/3.jpg", "three", "ok")]]):
        pq.write_table(pa.table({c: [r[j] for r in rows] for j, c in enumerate(["key", "path", "caption", "status"])}),
                       run / "shards" / f"{i:05d}.parquet")
    assert read_captions(run) == {"img/1.jpg": "one", "img/3.jpg": "three"}
    (run / "captions.json").write_text(json.dumps({"img/1.jpg": "merged"}))
    assert read_captions(run) == {"img/1.jpg": "merged"}       # the merged file wins
    assert score_job.default_output(run) == run / "scores.parquet"

    with pytest.raises(ScoreError, match="neither captions.json nor shards"):
        read_captions(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ScoreError, match="expected a JSON object"):
        read_captions(tmp_path / "list.json")


def test_image_index_resolution_order(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"top")
    (root / "a" / "x.jpg").write_bytes(b"nested")
    (root / "a" / "y.jpg").write_bytes(b"y")
    idx = ImageIndex(root)
    assert idx.resolve("x.jpg") == (str((root / "x.jpg").resolve()), "ok", None)          # join wins
    assert idx.resolve("a/x.jpg")[0] == str((root / "a" / "x.jpg").resolve())
    assert idx.resolve(str(root / "a" / "y.jpg"))[0] == str((root / "a" / "y.jpg").resolve())   # absolute
    link = tmp_path / "link"
    link.symlink_to(root / "a", target_is_directory=True)
    assert idx.resolve(str(link / "y.jpg"))[0] == str((root / "a" / "y.jpg").resolve())    # symlinks resolved
    assert idx.resolve("/gone/y.jpg")[0] == str((root / "a" / "y.jpg").resolve())          # by name
    assert idx.resolve("/gone/x.jpg")[1] == "ambiguous"
    assert idx.resolve("z.jpg")[:2] == (None, "missing")


def test_weights_loading_refuses_pickled_code_and_mismatches(tiny, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    legacy, zipped = tmp_path / "evil_legacy.bin", tmp_path / "evil_zip.pt"
    legacy.write_bytes(pickle.dumps({"visual.proj": Evil()}, protocol=2))   # old torch.save format
    torch.save({"visual.proj": Evil()}, zipped)                             # current format (mmap path)
    for evil in (legacy, zipped):
        with pytest.raises(ScoreError, match="cannot load tensors"):
            score_job.load_clip_state_dict(evil)
    assert not marker.exists()

    wrapped = tmp_path / "wrapped.pt"
    sd = score_job.load_clip_state_dict(tiny["pt"])
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    assert set(score_job.load_clip_state_dict(wrapped)) == set(sd)

    cfg = ScoreConfig(images=tmp_path, clip_weights=tiny["pt"], clip_model="RN50", device="cpu")
    with pytest.raises(ScoreError, match="do not fit --clip-model RN50"):
        score_job.ClipJudge.load(cfg)
    with pytest.raises(ScoreError, match="give an open_clip architecture name"):
        score_job.ClipJudge.load(ScoreConfig(images=tmp_path, clip_weights=tiny["pt"],
                                             clip_model="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))


def test_cli_errors_are_one_line_and_config_names_the_model(tiny, images, tmp_path):
    root, _ = images
    src = tmp_path / "c.json"
    src.write_text(json.dumps({"rgb_64x48.png": "a cat"}))
    res = CliRunner().invoke(app, ["score", str(src), "--images", str(root), "--clip-weights",
                                   str(tmp_path / "nope.bin"), "--clip-model", TINY])
    assert res.exit_code == 2 and "ERROR pipeline: --clip-weights" in res.output and "no such file" in res.output
    # --clip-config alone names the architecture by its file stem
    out = tmp_path / "o.parquet"
    run_cli("score", src, "--images", root, "--clip-weights", tiny["pt"], "--clip-config", tiny["config"],
            "--device", "cpu", "-o", out, "--quiet")
    assert pq.read_table(out).column("status").to_pylist() == ["ok"]
    assert not math.isnan(pq.read_table(out).column("cosine").to_pylist()[0])


@pytest.mark.parametrize("command", ["score", "compare"])
def test_help(command):
    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0 and "--clip-weights" in res.output and "--clip-model" in res.output
