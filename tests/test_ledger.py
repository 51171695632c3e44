"""The run ledger: run.json fingerprint checks, atomic commits, markers as the commit point, locks."""

from __future__ import annotations

import json
import os
import threading

import pytest

from pipeline import fingerprint as fp
from pipeline.config import ArraySlice
from pipeline.errors import JobError
from pipeline.ledger import Layout, Ledger, ShardMarker, atomic_write_text


def _finger(**over) -> fp.Fingerprint:
    parts = dict(model_files={"config.json": "1:sha256:aa", "model.safetensors": "9:sha256:bb"}, family="bunny",
                 question="Describe this image.", template=None, preset=None,
                 decode={"max_new_tokens": 8, "temperature": 0.0}, dtype="float32")
    parts.update(over)
    return fp.make(**parts)


LAYOUT = Layout("sha256:m1", 10, 4)


def _open(root, finger=None, layout=LAYOUT, overwrite=False, part=ArraySlice()) -> Ledger:
    led = Ledger(root)
    led.open(finger or _finger(), layout, {"note": "test"}, overwrite, part)
    return led


def _commit(led: Ledger, shard: int, payload: bytes = b"data", attempt: int = 0) -> ShardMarker:
    m = ShardMarker(shard=shard, file=led.data_file(shard, attempt), bytes=0, rows=3, status={"ok": 2, "missing": 1},
                    fingerprint="", attempt=attempt, processed=3)
    return led.commit(m, lambda tmp: tmp.write_bytes(payload))


def test_fingerprint_covers_what_changes_captions():
    base = _finger()
    assert base.digest == _finger().digest
    for change in (dict(question="Other?"), dict(dtype="bfloat16"), dict(decode={"max_new_tokens": 9, "temperature": 0.0}),
                   dict(model_files={"config.json": "1:sha256:aa", "model.safetensors": "9:sha256:cc"}),
                   dict(template="USER: <image>\n{question} A:")):
        assert _finger(**change).digest != base.digest
    assert fp.explain(base.parts, _finger(question="Other?").parts) == 'question was "Describe this image.", now "Other?"'
    assert fp.explain(base.parts, _finger(decode={"max_new_tokens": 9, "temperature": 0.0}).parts) == \
        "decode.max_new_tokens was 8, now 9"
    assert "model.safetensors" in fp.explain(base.parts, _finger(model_files={"config.json": "1:sha256:aa"}).parts)


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
    with pytest.raises(JobError, match="different manifest"):
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
    assert not errors and len({led.run["created"] for led in ledgers}) == 1


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
