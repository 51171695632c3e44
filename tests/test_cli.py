"""The command line as a contract: exit codes and options documented once and true, one-line
errors for every command (bench included), and a checkpoint refused before run.json is written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from caption_helpers import CKPT, ROOT, SAMPLES, caption, cli, error_lines
from cli.app import app
from pipeline.config import declared
from pipeline.errors import EXIT_CODES

DOC = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")


def test_exit_codes_in_the_docs_are_the_codes_in_the_code():
    section = DOC.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, flags=re.M)}
    assert documented == set(EXIT_CODES)


def test_every_caption_option_is_documented_and_in_help():
    help_text = CliRunner().invoke(app, ["caption", "--help"], terminal_width=200).output
    for d in declared():
        assert f"`{d.flag}" in DOC, f"{d.flag} is not in docs/CLI.md"
        assert d.flag in help_text, f"{d.flag} is not in --help"
    assert "--config" in help_text and "--max-batch-size" in help_text and "--no-overwrite" in help_text


def test_every_command_has_help():
    for command in ("caption", "manifest", "status", "export", "score", "compare", "bench"):
        r = CliRunner().invoke(app, [command, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, command


def _without_tensor(tmp_path: Path) -> tuple[Path, str]:
    """The tiny checkpoint with one tensor dropped (as a truncated download or a bad conversion)."""
    broken = tmp_path / "broken"
    shutil.copytree(CKPT, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = sorted(n for n in tensors if "mm_projector" in n)[0]
    del tensors[name]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return broken, name


def test_a_broken_checkpoint_is_refused_before_run_json_and_the_fixed_one_then_runs(tmp_path):
    broken, name = _without_tensor(tmp_path)
    out = tmp_path / "run"
    r = cli("caption", "--manifest", str(SAMPLES), "--model", str(broken), "--out", str(out), "--workers", "0",
            "--max-new-tokens", "2", "--quiet")
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr
    assert f"checkpoint lacks tensor {name}" in error_lines(r.stderr)[0] and "loaded" not in r.stderr
    assert not out.exists()                        # nothing written: the fixed checkpoint is not refused
    shutil.copyfile(CKPT / "model.safetensors", broken / "model.safetensors")
    assert caption(manifest=SAMPLES, model=broken, out=out, max_new_tokens=2) == 0


def test_bench_errors_are_one_line(tmp_path):
    broken, _ = _without_tensor(tmp_path)
    cases = {"no config": (["--model", str(tmp_path), "--image", str(SAMPLES.parent / "samples" / "chelsea.png")],
                           "no config.json"),
             "missing image": (["--model", str(CKPT), "--image", str(tmp_path / "nope.png")], "--image"),
             "missing tensor": (["--model", str(broken), "--image", str(SAMPLES.parent / "samples" / "chelsea.png")],
                                "checkpoint lacks tensor")}
    for name, (args, says) in cases.items():
        r = cli("bench", *args, "--batch-sizes", "1", "--repeats", "1", "--max-new-tokens", "2", "--dtype", "float32",
                "--out", str(tmp_path / "results"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, f"{name}: {r.stderr}"
        assert len(error_lines(r.stderr)) == 1 and says in error_lines(r.stderr)[0], f"{name}: {r.stderr}"
    assert not (tmp_path / "results").exists()


def test_changed_image_limits_or_stage_code_refuse_to_join(tmp_path, monkeypatch):
    """Limits decide which rows become too_large; a new stage version may change every row."""
    import stages.caption

    shutil.copy(SAMPLES.parent / "samples" / "chelsea.png", tmp_path / "a.png")
    (tmp_path / "m.txt").write_text("a.png\n")
    out = tmp_path / "run"
    assert caption(manifest=tmp_path / "m.txt", out=out, max_new_tokens=2) == 0
    r = cli("caption", "--manifest", str(tmp_path / "m.txt"), "--model", str(CKPT), "--out", str(out),
            "--max-new-tokens", "2", "--max-image-pixels", "1000")
    assert r.returncode == 2 and "limits.max_pixels was 100000000, now 1000" in error_lines(r.stderr)[0]
    monkeypatch.setattr(stages.caption, "VERSION", stages.caption.VERSION + 1)
    from pipeline.errors import JobError
    try:
        caption(manifest=tmp_path / "m.txt", out=out, max_new_tokens=2)
        raise AssertionError("joined a run made by another caption stage")
    except JobError as e:
        assert "another version of the caption stage" in str(e) and "--overwrite" in str(e)
    assert json.loads((out / "run.json").read_text())["fingerprint_parts"]["code"]["caption"] == stages.caption.VERSION - 1
