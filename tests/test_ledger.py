"""The run ledger: run.json fingerprint checks, atomic commits, markers as the commit point, locks."""

from __future__ import annotations

import json
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import fingerprint as fp
from pipeline.config import ArraySlice
from pipeline.errors import JobError
from pipeline.ledger import Layout, Ledger, ShardMarker, atomic_write_text


def _finger(**over) -> fp.Fingerprint:
    parts = dict(model_files={"config.json": "1:sha256:aa", "model.safetensors": "9:sha256:bb"}, family="bunny",
                 question="Describe this image.", template=None, preset=None,
                 decode={"max_new_tokens": 8, "temperature": 0.0}, dtype="float32",
                 limits={"max_pixels": 100, "max_aspect_ratio": 50.0},
                 code={"preprocess": 1, "encode": 1, "caption": 1, "write": 1})
    parts.update(over)
    return fp.make(**parts)


LAYOUT = Layout("sha256:m1", 10, 4)


def _open(root, finger=None, layout=LAYOUT, overwrite=False, part=ArraySlice()) -> Ledger:
    led = Ledger(root)
    led.open(finger or _finger(), layout, {"note": "test"}, overwrite, part)
    return led


def _commit(led: Ledger, shard: int, payload: bytes = b"data", attempt: int = 0) -> ShardMarker:
    """A commit with an opaque payload (the ledger never parses data files; pipeline/export.py does)."""
    m = ShardMarker(shard=shard, file=led.data_file(shard, attempt), bytes=0, rows=3, status={"ok": 2, "missing": 1},
                    fingerprint="", attempt=attempt, processed=3)
    return led.commit(m, lambda tmp: tmp.write_bytes(payload))


def test_fingerprint_covers_what_changes_captions():
    base = _finger()
    assert base.digest == _finger().digest
    for change in (dict(question="Other?"), dict(dtype="bfloat16"), dict(decode={"max_new_tokens": 9, "temperature": 0.0}),
                   dict(model_files={"config.json": "1:sha256:aa", "model.safetensors": "9:sha256:cc"}),
                   dict(template="USER: <image>\n{question} A:"),
                   dict(limits={"max_pixels": 99, "max_aspect_ratio": 50.0}),
                   dict(limits={"max_pixels": 100, "max_aspect_ratio": 4.0}),
                   dict(code={"preprocess": 1, "encode": 1, "caption": 2, "write": 1})):
        assert _finger(**change).digest != base.digest
    assert fp.explain(base.parts, _finger(question="Other?").parts) == 'question was "Describe this image.", now "Other?"'
    assert fp.explain(base.parts, _finger(decode={"max_new_tokens": 9, "temperature": 0.0}).parts) == \
        "decode.max_new_tokens was 8, now 9"
    assert "model.safetensors" in fp.explain(base.parts, _finger(model_files={"config.json": "1:sha256:aa"}).parts)
    assert fp.explain(base.parts, _finger(limits={"max_pixels": 99, "max_aspect_ratio": 50.0}).parts) == \
        "limits.max_pixels was 100, now 99"
    assert fp.explain(base.parts, _finger(code={"preprocess": 1, "encode": 1, "caption": 2, "write": 1}).parts) == \
        "it was made by another version of the caption stage (version 1, now 2), whose output can differ"


def test_model_identity_ignores_location(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
        (tmp_path / d / "w.bin").write_bytes(os.urandom(16) if d == "a" else (tmp_path / "a" / "w.bin").read_bytes())
    assert fp.model_identity(tmp_path / "a") == fp.model_identity(tmp_path / "b")
    (tmp_path / "b" / "w.bin").write_bytes(b"changed")
    assert fp.model_identity(tmp_path / "a") != fp.model_identity(tmp_path / "b")


def test_open_creates_then_joins_and_refuses_mismatch(tmp_path):
    led = _open(tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["fingerprint"] == _finger().digest and run["layout"]["shard_size"] == 4
    assert led.layout.n_shards == 3
    _open(tmp_path / "run")                               # same settings: joins
    with pytest.raises(JobError) as e:
        _open(tmp_path / "run", _finger(question="What?"))
    assert str(e.value).count("\n") == 0
    assert 'question was "Describe this image.", now "What?"' in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(JobError, match="shard size was 4, now 5"):
        _open(tmp_path / "run", layout=Layout("sha256:m1", 10, 5))
    with pytest.raises(JobError, match="made from another input"):
        _open(tmp_path / "run", layout=Layout("sha256:m2", 10, 4))


def test_overwrite_clears_shards_and_replaces_run(tmp_path):
    led = _open(tmp_path / "run")
    _commit(led, 0)
    led2 = _open(tmp_path / "run", _finger(question="What?"), overwrite=True)
    assert led2.fingerprint == _finger(question="What?").digest
    assert list((tmp_path / "run" / "shards").iterdir()) == []


def test_concurrent_creation_one_winner(tmp_path):
    errors, ledgers = [], []

    def go():
        try:
            ledgers.append(_open(tmp_path / "run"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({led.run.created for led in ledgers}) == 1


def test_commit_marker_is_the_commit_point(tmp_path):
    led = _open(tmp_path / "run")
    assert led.pending(ArraySlice()) == [0, 1, 2]
    m = _commit(led, 1)
    assert m.bytes == 4 and m.fingerprint == led.fingerprint and m.failed == 1
    assert led.pending(ArraySlice()) == [0, 2]
    assert led.marker(1) == m
    # no temp files left behind
    assert sorted(p.name for p in led.shards.iterdir()) == ["00001.done.json", "00001.parquet"]
    # a data file without a marker (killed between the two renames) does not count
    (led.shards / "00002.parquet").write_bytes(b"orphan")
    assert led.pending(ArraySlice()) == [0, 2]
    # a data file changed after commit invalidates the marker
    (led.shards / "00001.parquet").write_bytes(b"tampered")
    assert led.marker(1) is None and led.pending(ArraySlice()) == [0, 1, 2]
    # a marker of another run is ignored
    _commit(led, 0)
    doc = json.loads(led.marker_path(0).read_text())
    doc["fingerprint"] = "sha256:other"
    led.marker_path(0).write_text(json.dumps(doc))
    assert led.marker(0) is None


def test_retry_attempt_replaces_data_file(tmp_path):
    led = _open(tmp_path / "run")
    _commit(led, 0, b"first")
    m = _commit(led, 0, b"second!", attempt=1)
    assert m.file == "00000.retry1.parquet" and m.attempt == 1
    assert sorted(p.name for p in led.shards.iterdir()) == ["00000.done.json", "00000.retry1.parquet"]
    assert led.marker(0).bytes == 7


def test_slices_see_only_their_shards(tmp_path):
    led = _open(tmp_path / "run", part=ArraySlice(1, 2))
    assert led.pending(ArraySlice(1, 2)) == [1]
    assert led.pending(ArraySlice(0, 2)) == [0, 2]


def test_failed_write_leaves_nothing_and_one_line_error(tmp_path):
    led = _open(tmp_path / "run")

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(JobError) as e:
        led.commit(ShardMarker(0, "00000.parquet", 0, 1, {"ok": 1}, ""), boom)
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert list(led.shards.iterdir()) == []


def test_vanished_dir_is_not_recreated(tmp_path):
    import shutil

    led = _open(tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(JobError, match="vanished"):
        _commit(led, 0)
    assert not (tmp_path / "run").exists()
    with pytest.raises(JobError, match="vanished"):
        atomic_write_text(tmp_path / "run" / "captions.json", "{}")


def test_locks_are_exclusive_until_released(tmp_path):
    led = _open(tmp_path / "run")
    a = led.try_lock(0)
    assert a is not None
    assert led.try_lock(0) is None          # a second open file description cannot take it
    assert led.try_lock(1) is not None
    a.release()
    assert led.try_lock(0) is not None


DAMAGED = {"empty list": b"[]", "null": b"null", "binary": bytes(range(256)), "truncated": b'{"format": 2, "finger',
           "no layout": b'{"format": 2, "fingerprint": "x"}', "zero shard size": None, "old format": None}


def _damaged_text(kind: str, good: str) -> bytes:
    doc = json.loads(good)
    if kind == "zero shard size":
        doc["layout"]["shard_size"] = 0
        return json.dumps(doc).encode()
    if kind == "old format":
        doc["format"] = 1
        return json.dumps(doc).encode()
    return DAMAGED[kind]


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_run_json_is_one_line_and_overwrite_repairs_it(tmp_path, kind):
    from pipeline.export import export_run
    from pipeline.status import status

    root = tmp_path / "run"
    _commit(_open(root), 0)
    good = (root / "run.json").read_text()
    (root / "run.json").write_bytes(_damaged_text(kind, good))
    for read in (lambda: Ledger(root).read_run(), lambda: status(root), lambda: export_run(root, "json")):
        with pytest.raises(JobError) as e:
            read()
        assert "\n" not in str(e.value) and "run.json" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(JobError) as e:
        _open(root)
    assert "\n" not in str(e.value) and "damaged" in str(e.value) and "--overwrite" in str(e.value)
    led = _open(root, overwrite=True)                        # --overwrite starts over instead of repeating itself
    assert json.loads((root / "run.json").read_text())["fingerprint"] == led.fingerprint
    assert led.pending(ArraySlice()) == [0, 1, 2] and list(led.shards.iterdir()) == []


def test_a_marker_must_describe_its_own_shard_and_file(tmp_path):
    led = _open(tmp_path / "run")
    _commit(led, 0, b"zero")
    _commit(led, 1, b"one!")
    good = json.loads(led.marker_path(0).read_text())
    cases = {
        "file is null": {**good, "file": None},
        "file of another shard": {**good, "file": "00001.parquet"},       # same size, a copy of shard 1's data
        "marker of another shard": json.loads(led.marker_path(1).read_text()),
        "no checksum": {k: v for k, v in good.items() if k != "sha256"},
        "status not counts": {**good, "status": {"ok": "2"}},
        "unknown field": {**good, "note": 1},
        "not an object": [good],
    }
    for why, doc in cases.items():
        led.marker_path(0).write_text(json.dumps(doc))
        assert led.marker(0) is None, why
        assert led.pending(ArraySlice()) == [0, 2], why
    led.marker_path(0).write_text(json.dumps(good))
    assert led.marker(0) is not None and len(led.marker(0).sha256) == 64


def test_set_aside_makes_a_shard_pending_under_its_lock(tmp_path):
    led = _open(tmp_path / "run")
    m = _commit(led, 0)
    held = led.try_lock(0)
    assert led.set_aside(m, "test") is False and led.marker(0) == m      # another process has the shard
    held.release()
    assert led.set_aside(m, "test") is True
    assert led.marker(0) is None and led.pending(ArraySlice()) == [0, 1, 2]
    assert (led.shards / "00000.done.json.bad").exists()
    assert led.set_aside(m, "test") is False                              # only the marker that was checked


def test_remove_temps_takes_only_that_shards_temps(tmp_path):
    led = _open(tmp_path / "run")
    for name in (".00000.parquet.1-aa.tmp", ".00000.done.json.1-bb.tmp", ".00001.parquet.2-cc.tmp", ".run.json.3-dd.tmp"):
        (led.shards / name).write_bytes(b"x")
    assert led.remove_temps(0) == 2
    assert sorted(p.name for p in led.shards.iterdir()) == [".00001.parquet.2-cc.tmp", ".run.json.3-dd.tmp"]


# -- generated damage: whatever run.json or a marker holds, the answer is a valid record or a refusal --

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


def _mutations(doc: dict):
    """A document with one field (or one layout field) replaced, dropped, or added."""
    paths = [(k,) for k in doc] + [("layout", k) for k in doc.get("layout", {})]
    return st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "drop"]), JSON).map(
        lambda t: _mutate(doc, *t)) | st.tuples(st.text(max_size=6), JSON).map(lambda t: {**doc, t[0]: t[1]})


def _mutate(doc: dict, path: tuple, how: str, value) -> dict:
    out = json.loads(json.dumps(doc))
    where = out if len(path) == 1 else out[path[0]]
    if how == "drop":
        where.pop(path[-1])
    else:
        where[path[-1]] = value
    return out


def _documents(valid: dict):
    return (st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
            | _mutations(valid).map(lambda d: json.dumps(d).encode()))


def _check_run_json(root, valid: dict, data: bytes) -> None:
    (root / "run.json").write_bytes(data)
    try:
        run = Ledger(root).read_run()
    except JobError as e:
        assert "\n" not in str(e) and "run.json" in str(e)
        return
    assert json.loads(data) == {**valid, **json.loads(data)}      # accepted: only a valid document
    assert run.layout.n_shards >= 1


def _check_marker(led: Ledger, valid: dict, data: bytes) -> None:
    led.marker_path(0).write_bytes(data)
    m = led.marker(0)                                              # never raises
    assert m is None or (m.shard == 0 and m.file == valid["file"] and m.sha256 == valid["sha256"]
                         and m.bytes == valid["bytes"] and m.fingerprint == valid["fingerprint"])
    assert led.pending(ArraySlice()) in ([0, 1, 2], [1, 2])


def _property(check, examples: int):
    def run(tmp_path):
        led = _open(tmp_path / "run")
        _commit(led, 0)
        if check is _check_run_json:
            target, path = tmp_path / "run", tmp_path / "run" / "run.json"
        else:
            target, path = led, led.marker_path(0)
        valid = json.loads(path.read_text())

        @settings(max_examples=examples, deadline=None, derandomize=True)
        @given(doc=_documents(valid))
        def each(doc):                  # only the one file changes between examples
            check(target, valid, doc)

        each()
    return run


test_any_run_json_is_read_or_refused_in_one_line = _property(_check_run_json, 200)
test_any_marker_is_valid_for_its_shard_or_ignored = _property(_check_marker, 200)
test_any_run_json_more_examples = pytest.mark.slow(_property(_check_run_json, 5000))
test_any_marker_more_examples = pytest.mark.slow(_property(_check_marker, 5000))
