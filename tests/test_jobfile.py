"""TOML job files, flag precedence, option checks, and the array-task slice from flags or env."""

from __future__ import annotations

import pytest

from pipeline import array_task
from pipeline.config import ArraySlice
from pipeline.errors import JobError
from pipeline.jobfile import merge, read_jobfile, to_run_config


def _job(tmp_path, text: str):
    p = tmp_path / "jobs" / "job.toml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_jobfile_paths_relative_to_file_and_flags_override(tmp_path):
    p = _job(tmp_path, 'manifest = "../data/m.txt"\nmodel = "/models/bunny"\nout = "runs/x"\n'
                       'max-new-tokens = 64\nmax_batch_size = 4\nquiet = true\nprompt = "What is this?"\n')
    job = read_jobfile(p)
    assert job["manifest"] == str(tmp_path / "data" / "m.txt")
    assert job["model"] == "/models/bunny" and job["out"] == str(tmp_path / "jobs" / "runs" / "x")
    assert job["batch_size"] == 4 and job["max_new_tokens"] == 64
    opts = merge(job, {"max_new_tokens": 8, "prompt": None, "quiet": False, "shard_size": None})
    cfg = to_run_config(opts, ArraySlice(), str(p))
    assert cfg.decode.max_new_tokens == 8          # flag wins
    assert cfg.prompt == "What is this?"           # unset flag keeps the file's value
    assert cfg.quiet is False                      # an explicit --no-quiet beats the file
    assert cfg.batch.max_batch_size == 4 and cfg.shard_size == 256 and cfg.config_file == str(p)


def test_unknown_key_suggests_and_types_checked(tmp_path):
    with pytest.raises(JobError, match="unknown option 'max-new-token'.*did you mean 'max-new-tokens'"):
        read_jobfile(_job(tmp_path, "max-new-token = 5\n"))
    with pytest.raises(JobError, match="shard-size must be int, not str"):
        read_jobfile(_job(tmp_path, 'shard-size = "100"\n'))
    with pytest.raises(JobError, match="quiet must be bool"):
        read_jobfile(_job(tmp_path, "quiet = 1\n"))
    with pytest.raises(JobError, match="not valid TOML"):
        read_jobfile(_job(tmp_path, "quiet = \n"))
    with pytest.raises(JobError, match="does not exist"):
        read_jobfile(tmp_path / "missing.toml")


def test_run_config_checks():
    base = {"manifest": "m.txt", "model": "m", "out": "o"}
    with pytest.raises(JobError, match="--out is required"):
        to_run_config({"manifest": "m.txt", "model": "m"}, ArraySlice())
    with pytest.raises(JobError, match="--shard-size must be at least 1"):
        to_run_config({**base, "shard_size": 0}, ArraySlice())
    with pytest.raises(JobError, match="contradict"):
        to_run_config({**base, "overwrite": True, "retry_failed": True}, ArraySlice())
    with pytest.raises(JobError, match="--engine must be local or ray"):
        to_run_config({**base, "engine": "spark"}, ArraySlice())
    cfg = to_run_config({**base, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 3, "ignore_eos": True,
                         "repetition_penalty": 1.1, "memory_budget": 2, "engine": "ray", "ray_address": "auto"},
                        ArraySlice())
    d = cfg.decode
    assert (d.temperature, d.top_p, d.top_k, d.seed, d.ignore_eos, d.repetition_penalty) == (0.7, 0.9, 20, 3, True, 1.1)
    assert cfg.batch.memory_budget_gib == 2 and cfg.engine == "ray" and cfg.ray_address == "auto"


def test_array_slice_from_flags_and_env():
    assert array_task.resolve(None, None, {}) == ArraySlice(0, 1)
    assert array_task.resolve(3, 2, {}) == ArraySlice(2, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert array_task.resolve(None, None, slurm) == ArraySlice(1, 3)
    assert array_task.resolve(None, None, {"JOB_COMPLETION_INDEX": "1"}) == ArraySlice(0, 1)   # N unknown: whole
    assert array_task.resolve(4, None, {"JOB_COMPLETION_INDEX": "3"}) == ArraySlice(3, 4)
    assert array_task.resolve(4, 0, {"JOB_COMPLETION_INDEX": "3"}) == ArraySlice(0, 4)       # flag wins
    with pytest.raises(JobError, match="outside 0..2"):
        array_task.resolve(3, 3, {})
    with pytest.raises(JobError, match="needs --shard-index"):
        array_task.resolve(3, None, {})
    s = ArraySlice(1, 3)
    assert [k for k in range(9) if s.owns(k)] == [1, 4, 7]


def test_shipped_example_job_files_are_valid():
    from pathlib import Path

    from models.presets import PRESETS

    folder = Path(__file__).resolve().parents[1] / "jobs" / "examples"
    files = sorted(folder.glob("*.toml"))
    assert {f.name for f in files} >= {"samples.toml", "coco100-bunny.toml", "coco100-minicpmv2.toml",
                                       "mindie-precision-bunny.toml", "mindie-precision-minicpmv2.toml"}
    for f in files:
        cfg = to_run_config(read_jobfile(f), ArraySlice(), str(f))
        assert cfg.prompt_preset is None or cfg.prompt_preset in PRESETS
    samples = to_run_config(read_jobfile(folder / "samples.toml"), ArraySlice())
    assert Path(samples.manifest).is_file() and (Path(samples.model) / "config.json").is_file()


# -- the declarations are the one table: any valid option set lands on its field, from a file or flags --

def _value(d):
    from hypothesis import strategies as st

    o = d.option
    if o.choices:
        return st.sampled_from(o.choices)
    if d.type is bool:
        return st.booleans()
    if d.type is int:
        return st.integers(int(o.min if o.min is not None else -10), int(o.max if o.max is not None else 10**6))
    if d.type is float:
        low = o.min if o.min is not None else (o.above + 1e-3 if o.above is not None else -1e3)
        return st.floats(low, o.max if o.max is not None else 1e6, allow_nan=False)
    return st.text("abc xyz/<>", min_size=1, max_size=8).filter(str.strip)


def _options_strategy():
    from hypothesis import strategies as st

    from pipeline.jobfile import OPTIONS
    # not the slice (resolved with the environment), the contradicting pair, or paths (resolved against the file)
    names = [n for n, d in OPTIONS.items()
             if d.target[0] != "array" and n not in ("overwrite", "retry_failed") and not d.option.path]
    return st.lists(st.sampled_from(names), unique=True, max_size=12).flatmap(
        lambda chosen: st.fixed_dictionaries({n: _value(OPTIONS[n]) for n in chosen}))


def _field(cfg, target):
    for name in target:
        cfg = getattr(cfg, name)
    return cfg


def test_any_valid_options_land_on_their_fields_from_a_job_file_or_flags(tmp_path):
    import json as _json

    from hypothesis import given, settings

    from pipeline.jobfile import OPTIONS

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(_options_strategy())
    def each(opts):
        flags = {"manifest": "/m.txt", "model": "/ckpt", "out": "/run", **opts}
        cfg = to_run_config(flags, ArraySlice())
        for name, value in opts.items():
            assert _field(cfg, OPTIONS[name].target) == value, name
        toml = "".join(f"{k.replace('_', '-')} = {_json.dumps(v)}\n" for k, v in flags.items())
        job = _job(tmp_path, toml)
        from_file = read_jobfile(job)
        assert from_file == flags
        assert to_run_config(from_file, ArraySlice()) == cfg

    each()
