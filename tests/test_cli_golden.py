"""The reference's greedy captions through the real command line, for both model families.

`pipeline caption --dtype float32 --max-new-tokens 24 --prompt "Describe this image in detail."`
on the golden images must write exactly the reference's decoded texts into captions.json (and the
same ids' counts into the Parquet rows).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from caption_helpers import ROOT, cli

GOLDEN = ROOT / "tests" / "golden"


def _expected(family: str) -> dict[str, tuple[str, int]]:
    """{image file name: (reference text, prompt length)}."""
    g = json.loads((GOLDEN / family / "expected.json").read_text())
    if family == "bunny-tiny":
        return {v["file"].split("/")[-1]: (v["generated_text"], v["prefill_len"]) for v in g["images"].values()}
    return {c["image_file"].split("/")[-1]: (c["answer"], len(c["input_ids"])) for c in g["cases"]}


@pytest.mark.parametrize("family", ["bunny-tiny", "minicpmv2-tiny"])
def test_cli_reproduces_reference_captions(family, tmp_path):
    expected = _expected(family)
    manifest = tmp_path / "golden.txt"
    manifest.write_text("".join(f"{GOLDEN / family / 'images' / name}\n" for name in sorted(expected)))
    out = tmp_path / "run"
    r = cli("caption", "--manifest", str(manifest), "--model", str(GOLDEN / family / "checkpoint"), "--out", str(out),
            "--dtype", "float32", "--max-new-tokens", "24", "--prompt", "Describe this image in detail.", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    captions = json.loads((out / "captions.json").read_text())
    assert {k.split("/")[-1]: v for k, v in captions.items()} == {k: t for k, (t, _) in expected.items()}
    rows = pq.read_table(sorted((out / "shards").glob("*.parquet"))).to_pylist()
    assert len(rows) == len(expected)
    for row in rows:
        name = row["path"].split("/")[-1]
        assert row["status"] == "ok" and row["n_new_tokens"] == 24 and row["finish_reason"] == "length"
        assert row["n_prompt_tokens"] == expected[name][1]
