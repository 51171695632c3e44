"""The one module that plans a caption run, for every distributor (the local loop, Ray).

    prepare()    every check that can refuse the run, cheapest first; the input's index (built once
                 per run dir, pipeline/run_input.py); only then run.json
    plan_work()  the pending shards of this slice (+ committed ones with failed rows, --retry-failed),
                 as shard numbers and counts: refs are made when a shard is claimed
    report_end() the summary lines and the exit code
(captions.json, once every shard is committed, is pipeline/export.finish: torch-free.)

A run-wide mistake (a setting no image can succeed with, a checkpoint that cannot load) must
fail here in seconds, in one line, with exit 2 and nothing written: not as a per-shard
"infrastructure" failure that a re-run repeats forever, nor as one failed row per image with
exit 0. So prepare() checks, before anything is written: the settings (pipeline/jobfile.py did
the value checks), the input (it exists and is of a supported kind), the checkpoint's config and tensor headers
(models.registry.check_checkpoint), the prompt and preset, and one probe image through the
family's processor and prompt builder (a question the template cannot hold, a prompt + max new
tokens the model's positions cannot hold), the device and dtype. Then the input is indexed (or
its index checked): an input that cannot be parsed, or that differs from the run dir's, is
refused there, still before run.json.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from PIL import Image

from models.base import dtype_name
from pipeline import fingerprint as fp
from pipeline.config import DEFAULT_PROMPT, RunConfig
from pipeline.device import DeviceError, resolve_device, resolve_dtype
from pipeline.errors import EXIT_INFRA, JobError
from pipeline.index import ManifestIndex
from pipeline.ledger import Ledger
from pipeline.run_input import input_spec, layout_of, open_index
from pipeline.runner import RunSummary, ShardWork
from stages.preprocess import Preprocessor

log = logging.getLogger(__name__)

PROBE_SIZE = (64, 64)          # the probe image: a small one gets the shortest prompt of every family


@dataclass(frozen=True)
class Prompt:
    question: str
    template: str | None        # None: the family's default
    preset: str | None


@dataclass(frozen=True)
class RunPlan:
    """A validated run whose run.json is written: what every distributor starts from."""

    cfg: RunConfig
    index: ManifestIndex        # the input's index in the run dir (its footer; shards are read when claimed)
    ledger: Ledger
    prompt: Prompt
    family: str
    device: Any                 # torch.device, or the Ray actors' device as the driver records it
    dtype: torch.dtype


def code_versions() -> dict[str, int]:
    """Each stage's code version (bumped when its output can change): part of the fingerprint."""
    from stages import caption, encode, preprocess, write

    return {"preprocess": preprocess.VERSION, "encode": encode.VERSION, "caption": caption.VERSION,
            "write": write.VERSION}


def model_family(model_dir: str) -> str:
    """'bunny' | 'minicpmv2' ...: the family module's name, the vocabulary presets use."""
    from models.loading import CheckpointError
    from models.registry import FAMILIES, family_of

    try:
        return FAMILIES[family_of(model_dir)].rsplit(".", 1)[-1]
    except (CheckpointError, OSError) as e:
        raise JobError(f"--model {model_dir}: {e}") from None


def check_model(model_dir: str) -> int:
    """The checkpoint's config and tensor headers (no weight read); its context length."""
    from models.loading import CheckpointError
    from models.registry import check_checkpoint, context_length

    try:
        check_checkpoint(model_dir)
        return context_length(model_dir)
    except (CheckpointError, OSError) as e:
        raise JobError(f"--model {model_dir}: {e}") from None


def resolve_prompt(cfg: RunConfig, family: str) -> Prompt:
    preset = None
    if cfg.prompt_preset:
        from models.presets import get_preset

        try:
            preset = get_preset(cfg.prompt_preset, family)
        except ValueError as e:
            raise JobError(str(e)) from None
    question = cfg.prompt if cfg.prompt is not None else (preset.question if preset else DEFAULT_PROMPT)
    return Prompt(question, preset.template if preset else None, preset.name if preset else None)


def probe(cfg: RunConfig, prompt: Prompt, context: int) -> Preprocessor:
    """The family's processor and prompt builder, set up in this process and run once on a small
    image: what fails here would fail for every image. Returns the set-up frontend."""
    from models.loading import CheckpointError

    def no_prompt(e: Exception) -> JobError:
        return JobError(f"the prompt cannot be built for any image ({type(e).__name__}: {e}); "
                        f"check --prompt / --prompt-preset and the checkpoint's config.json")

    front = Preprocessor(cfg.model, prompt.question, prompt.template, cfg.limits, cfg.fetch)
    try:
        front.setup()
    except (CheckpointError, OSError) as e:
        raise JobError(f"--model {cfg.model}: {e}") from None
    except ValueError as e:      # the template or the question (longest_prompt): no image could pass
        raise no_prompt(e) from None
    try:
        pixels = front.processor(Image.new("RGB", PROBE_SIZE, (127, 127, 127)))
        n_prompt = len(front.prompts.build(prompt.question, pixels).ids)
    except Exception as e:  # noqa: BLE001 - whatever the family raises, no image can pass it
        raise no_prompt(e) from None
    if n_prompt + cfg.decode.max_new_tokens > context:
        raise JobError(f"--max-new-tokens {cfg.decode.max_new_tokens} does not fit: the prompt alone is {n_prompt} "
                       f"tokens and the model takes {context} positions in all")
    return front


def local_device(cfg: RunConfig) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype resolved in this process (the local loop runs the models here)."""
    device = resolve_device(cfg.device)
    return device, resolve_dtype(cfg.dtype, device)


def _config_record(cfg: RunConfig, prompt: Prompt, device: Any, dtype: str) -> dict:
    d = asdict(cfg)
    d["resolved"] = {"question": prompt.question, "template": prompt.template, "device": str(device), "dtype": dtype}
    return d


def prepare(cfg: RunConfig, where: Callable[[RunConfig], tuple[Any, torch.dtype]] = local_device) -> RunPlan:
    """Validate the run, then create or join its run dir (run.json): nothing is written before
    every check has passed. `where` resolves --device/--dtype where the models will run (this
    process, or a Ray worker: the distributor knows)."""
    spec = input_spec(cfg)
    family = model_family(cfg.model)
    context = check_model(cfg.model)
    prompt = resolve_prompt(cfg, family)
    front = probe(cfg, prompt, context)
    try:
        device, dtype = where(cfg)
    except DeviceError as e:
        raise JobError(str(e)) from None
    finger = fp.make(fp.model_identity(cfg.model), family, prompt.question, getattr(front.prompts, "template", None),
                     prompt.preset, asdict(cfg.decode), dtype_name(dtype), fp.limits_identity(cfg), code_versions())
    ledger = Ledger(cfg.out)
    index = open_index(ledger, spec, cfg.shard_size, cfg.overwrite)
    ledger.open(finger, layout_of(index), _config_record(cfg, prompt, device, dtype_name(dtype)), cfg.overwrite,
                cfg.array)
    return RunPlan(cfg, index, ledger, prompt, family, device, dtype)


def plan_work(plan: RunPlan) -> list[ShardWork]:
    """Pending shards of this slice, plus (with --retry-failed) its committed shards that have
    failed rows. Only this slice's markers are read; no shard data and no refs (made at claim)."""
    cfg, ledger = plan.cfg, plan.ledger
    layout = ledger.layout
    work = [ShardWork(s, len(layout.indices(s))) for s in ledger.pending(cfg.array)]
    if cfg.retry_failed:
        work += [ShardWork(s, m.failed, attempt=m.attempt + 1, retry=True)
                 for s, m in ledger.markers(cfg.array).items() if m.failed]
    return sorted(work, key=lambda w: w.shard)


def log_summary(s: RunSummary) -> None:
    failed = {k: v for k, v in s.status.items() if k != "ok"}
    wall = max(s.wall_s, 1e-9)
    share = {k: v / wall for k, v in s.stages.items()}
    log.info("captioned %d images (%d ok, %d failed%s) in %.1f s: %.2f img/s, %.1f new tok/s",
             s.images, s.status.get("ok", 0), sum(failed.values()),
             (": " + ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))) if failed else "",
             s.wall_s, s.images / wall, s.new_tokens / wall)
    log.info("model busy %.0f%% of wall time (encode %.0f%%, caption %.0f%%); waiting for preprocessing %.0f%%, "
             "writing %.0f%%", 100 * s.model_busy_share, 100 * share.get("encode", 0), 100 * share.get("caption", 0),
             100 * share.get("preprocess_wait", 0), 100 * share.get("write", 0))


def report_end(summary: RunSummary | None, complete: bool, set_aside: list[int]) -> int:
    """Log the summary and choose the exit code: 1 if a shard could not be committed or is still
    set aside (a re-run retries it), else 0 (complete, or the rest is in other processes' hands)."""
    if summary is not None:
        log_summary(summary)
    shards = [s for s, _ in summary.failed] + list(summary.not_started) if summary else []
    if shards or set_aside:
        shards = sorted(set(shards) | set(set_aside))
        log.error("%d shard(s) not committed (%s); re-run the same command to retry them",
                  len(shards), ", ".join(map(str, shards[:10])) + (" ..." if len(shards) > 10 else ""))
        return EXIT_INFRA
    if not complete and summary is not None and summary.busy:
        log.info("%d shard(s) are being captioned by other processes", len(summary.busy))
    return 0
