"""Manifest text that Python strings can hold but files cannot: lone surrogates and huge integers
in jsonl, and `pipeline manifest` over file names that are not UTF-8, hold a line break, or would
read back as something else; plus the extension list against what the preprocessor opens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from pipeline.errors import JobError
from pipeline.manifest import IMAGE_EXTENSIONS, read_manifest, scan_images, txt_line_ok, write_txt_manifest

ROOT = Path(__file__).resolve().parents[1]


def _manifest_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "manifest", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("line", [
    '{"path": "a\\ud800.jpg"}',                          # in the path
    '{"path": "a.jpg", "note": "x\\udc00y"}',            # in a passthrough value
    '{"path": "a.jpg", "tags": ["ok", "\\uDFFF"]}',      # nested, upper-case escape
    '{"path": "a.jpg", "\\ud83d": 1}',                   # in a column name
])
def test_jsonl_lone_surrogate_is_a_one_line_error(tmp_path, line):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "ok.jpg"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(JobError) as e:
        read_manifest(m)
    assert "line 2:" in str(e.value) and "lone surrogate" in str(e.value) and "\n" not in str(e.value)


def test_jsonl_surrogate_pairs_are_fine(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "cat\\ud83d\\ude00.jpg", "note": "\\u00e9"}\n', encoding="utf-8")
    man = read_manifest(m)
    assert man.paths == ("cat\U0001F600.jpg",) and man.extra["note"] == ["é"]


def test_jsonl_integer_beyond_int64_is_kept_as_text(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.jpg", "n": 1}\n{"path": "b.jpg", "n": 1180591620717411303424}\n'
                 '{"path": "c.jpg", "n": -9223372036854775809, "id2": {"deep": 99999999999999999999}}\n')
    man = read_manifest(m)
    assert man.extra_types["n"] == pa.string() and man.extra["n"] == ["1", "1180591620717411303424",
                                                                      "-9223372036854775809"]
    assert man.extra["id2"] == [None, None, '{"deep": 99999999999999999999}']
    schema_ok = pa.table({k: pa.array(v, type=man.extra_types[k]) for k, v in man.extra.items()})
    assert schema_ok.num_rows == 3                       # what the shard writer does with them


def test_image_extensions_cover_every_format_the_preprocessor_opens():
    from stages.preprocess import ALLOWED_FORMATS

    Image.init()
    registered = {ext for ext, fmt in Image.registered_extensions().items() if fmt in (*ALLOWED_FORMATS, "MPO")}
    assert ".avif" in registered and registered <= IMAGE_EXTENSIONS


def test_non_utf8_name_is_left_out_with_a_warning_and_no_temp_file(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (4, 4)).save(imgs / "good.jpg")
    raw = os.fsencode(imgs) + b"/caf\xe9.jpg"                        # Latin-1 bytes, not UTF-8
    with open(raw, "wb") as f:
        f.write((imgs / "good.jpg").read_bytes())
    (imgs / "x.avif").write_bytes(b"listed by extension; opened (or refused) when captioned")
    out = tmp_path / "m.txt"
    r = _manifest_cli(str(imgs), "-o", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "left out 1 image(s), their names are not UTF-8 (a manifest is UTF-8 text): 'caf\\udce9.jpg'" in r.stderr
    assert read_manifest(out).paths == ("imgs/good.jpg", "imgs/x.avif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "m.txt"]       # no temp file left


def test_output_that_is_a_folder_is_a_one_line_error(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (4, 4)).save(imgs / "a.png")
    r = _manifest_cli(str(imgs), "-o", str(tmp_path))
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert r.returncode == 2 and len(errors) == 1 and "is a folder" in errors[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


# Names a file system accepts (no '/', no NUL), with what makes a txt line lie: line breaks,
# edge whitespace, a leading '#'; plus plain and non-ASCII text.
NAMES = st.text(alphabet=st.sampled_from(list("ab #\n\r\t.é猫_") + ["\x0b", "\u2028"]), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(names=st.lists(NAMES, min_size=1, max_size=6, unique=True), nested=st.booleans())
def test_written_manifest_reads_back_exactly_the_files_it_lists(tmp_path_factory, names, nested):
    _round_trip(tmp_path_factory, names, nested)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None)
@given(names=st.lists(NAMES, min_size=1, max_size=12, unique=True), nested=st.booleans())
def test_written_manifest_reads_back_exactly_the_files_it_lists_many(tmp_path_factory, names, nested):
    _round_trip(tmp_path_factory, names, nested)


def _round_trip(tmp_path_factory, names, nested):
    """Round trip: every line of a written manifest resolves to one of the scanned files, each
    listed file once, and a file is missing from it only if its name cannot be a txt line."""
    tmp = tmp_path_factory.mktemp("scan")
    imgs = tmp / "imgs"
    (imgs / "sub").mkdir(parents=True)
    files = []
    for i, n in enumerate(names):
        p = (imgs / "sub" if nested and i % 2 else imgs) / (n + ".jpg")
        p.write_bytes(b"x")
        files.append(p)
    out = imgs / "list.txt"                       # in the folder itself: './#a.jpg' is not how relpath spells it
    found = scan_images(imgs)
    n = write_txt_manifest(out, imgs, found, "test")
    listed = [os.path.normpath(imgs / p) for p in read_manifest(out).paths] if n else []
    assert len(listed) == n == len(set(listed))
    assert set(listed) <= {str(f) for f in files}
    left = {str(f) for f in files} - set(listed)
    assert all(not txt_line_ok(os.path.relpath(f, imgs)) for f in left)
