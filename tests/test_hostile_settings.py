"""Run-wide mistakes fail up front: exit 2, one line on stderr, nothing written, no model loaded.

Each of these once became something worse (the adversarial pass of issue 13): a per-shard
"infrastructure" failure that every re-run repeats (exit 1 forever), or one failed row per image
and "run complete: 0 captions" with exit 0, or a silent fallback (`--prompt ""` captioned with
the default prompt). One test runs every case, in parallel subprocesses as cron would start them.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from caption_helpers import CKPT, ROOT, SAMPLES, cli

MINICPM = ROOT / "tests" / "golden" / "minicpmv2-tiny" / "checkpoint"


def _edited(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**doc, **config}))
    return dst


def test_hostile_settings_fail_up_front_in_one_line_and_write_nothing(tmp_path):
    short = _edited(CKPT, tmp_path / "short-context", tokenizer_model_max_length=10)
    no_scale = _edited(MINICPM, tmp_path / "no-scale", scale_resolution=0)
    cases = {   # name: (extra args, what the one line must say)
        "nan temperature": (["--temperature", "nan"], "--temperature must be a finite number (got nan)"),
        "infinite temperature": (["--temperature", "inf"], "--temperature must be a finite number"),
        "negative top-k": (["--top-k", "-5"], "--top-k must be at least 0 (got -5)"),
        "zero top-p": (["--top-p", "0"], "--top-p must be more than 0"),
        "zero repetition penalty": (["--repetition-penalty", "0"], "--repetition-penalty must be more than 0"),
        "more new tokens than positions": (["--max-new-tokens", "100000"],
                                           "--max-new-tokens 100000 does not fit: the prompt alone is 769 tokens "
                                           "and the model takes 32768 positions"),
        "aspect ratio below 1": (["--max-aspect-ratio", "0.5"], "--max-aspect-ratio must be at least 1 (got 0.5)"),
        "bunny prompt with <image>": (["--prompt", "What is in <image>?"],
                                      "the Bunny template must contain exactly one <image>"),
        "empty prompt": (["--prompt", ""], "--prompt is empty"),
        "blank prompt": (["--prompt", "  "], "--prompt is empty"),
        "empty preset": (["--prompt-preset", ""], "--prompt-preset is empty"),
        "zero batch size": (["--batch-size", "0"], "--batch-size must be at least 1"),
        "negative workers": (["--workers", "-1"], "--workers must be at least 0"),
        "tokenizer max length 10": (["--model", str(short)], "tokenizer_model_max_length must be"),
        "scale_resolution 0": (["--model", str(no_scale)], "scale_resolution"),
    }

    def run(name: str):
        args = ["--model", str(CKPT), *cases[name][0]]      # a later --model wins
        return cli("caption", "--manifest", str(SAMPLES), "--out", str(tmp_path / "runs" / name), "--quiet", *args,
                   timeout=240)

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    for name, r in results.items():
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert (r.returncode, len(lines)) == (2, 1), f"{name}: exit {r.returncode}\n{r.stderr}"
        assert " ERROR " in lines[0] and cases[name][1] in lines[0], f"{name}: {lines[0]}"
        assert "Traceback" not in r.stderr and "loaded" not in r.stderr, name
    assert not (tmp_path / "runs").exists()                      # no run dir, no run.json, no log file
