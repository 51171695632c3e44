"""`pipeline caption | manifest | status | export` (see pipeline/cli.py and docs/CLI.md).

Each command only parses flags, builds a config and calls jobs.*; a JobError becomes one log
line and the exit code it carries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import EXIT_USAGE, JobError

log = logging.getLogger("pipeline")

# options of `caption`; every one can also come from the --config job file (see pipeline/jobfile.py)
_P = "Prompt"
_D = "Decoding"
_R = "Run"
_E = "Engine and device"


def _fail(e: Exception, code: int = EXIT_USAGE) -> typer.Exit:
    log.error("%s", e)
    return typer.Exit(getattr(e, "exit_code", code))


def caption(
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Images to caption: .txt/.csv/.tsv/.jsonl/.parquet"),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint folder (config.json + safetensors)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (created; re-running resumes it)"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML job file with any of these options; flags override it"),
    prompt: Optional[str] = typer.Option(None, help="Question asked for every image [default: a captioning prompt]", rich_help_panel=_P),
    prompt_preset: Optional[str] = typer.Option(None, help="Exact prompt + template of the NPU examples (mindie-bunny, ...)", rich_help_panel=_P),
    max_new_tokens: Optional[int] = typer.Option(None, help="Stop after N new tokens [default: 256]", rich_help_panel=_D),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature; greedy when unset or 0", rich_help_panel=_D),
    top_p: Optional[float] = typer.Option(None, rich_help_panel=_D),
    top_k: Optional[int] = typer.Option(None, rich_help_panel=_D),
    repetition_penalty: Optional[float] = typer.Option(None, rich_help_panel=_D),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (per image: seed + key)", rich_help_panel=_D),
    ignore_eos: Optional[bool] = typer.Option(None, "--ignore-eos/--no-ignore-eos", help="Always emit max-new-tokens (benchmarks)", rich_help_panel=_D),
    dtype: Optional[str] = typer.Option(None, help="auto|float32|bfloat16|float16 [default: auto]", rich_help_panel=_E),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda[:i]|npu[:i] [default: auto]", rich_help_panel=_E),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--max-batch-size", help="Most sequences decoded at once [default: from memory budget]", rich_help_panel=_E),
    memory_budget: Optional[float] = typer.Option(None, help="GiB for KV cache and activations [default: machine-derived]", rich_help_panel=_E),
    engine: Optional[str] = typer.Option(None, help="local|ray [default: local]", rich_help_panel=_E),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (host:port or auto) [default: start a local Ray]", rich_help_panel=_E),
    ray_actors: Optional[int] = typer.Option(None, help="Model actors with --engine ray, one model each [default: as many as the cluster holds]", rich_help_panel=_E),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the model [default: all cores]", rich_help_panel=_E),
    workers: Optional[int] = typer.Option(None, help="Preprocessing processes; 0 = in the main process [default: half the cores, <= 8]", rich_help_panel=_E),
    shard_size: Optional[int] = typer.Option(None, help="Images per committed shard [default: 256]", rich_help_panel=_R),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Start over in an existing run dir", rich_help_panel=_R),
    retry_failed: Optional[bool] = typer.Option(None, "--retry-failed/--no-retry-failed", help="Re-caption only rows whose status is an error", rich_help_panel=_R),
    num_shards_total: Optional[int] = typer.Option(None, help="Array job: number of tasks (also SLURM_ARRAY_TASK_COUNT)", rich_help_panel=_R),
    shard_index: Optional[int] = typer.Option(None, help="Array job: this task (also SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX)", rich_help_panel=_R),
    max_image_pixels: Optional[int] = typer.Option(None, help="Larger images get status too_large [default: 10^8]", rich_help_panel=_R),
    max_aspect_ratio: Optional[float] = typer.Option(None, help="Longer/shorter side above this: extreme_aspect [default: 50]", rich_help_panel=_R),
    max_image_seconds: Optional[float] = typer.Option(None, help="Preprocessing one image longer than this: timeout [default: 60]", rich_help_panel=_R),
    quiet: Optional[bool] = typer.Option(None, "--quiet/--no-quiet", help="No progress bar (cron); logs still go to stderr", rich_help_panel=_R),
) -> None:
    """Caption every image of a manifest into a run directory (resumable: re-run the same command)."""
    cli = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "config"}
    from jobs.caption import run_caption
    from models.loading import CheckpointError
    from pipeline import array_task, jobfile
    from pipeline.progress import setup_logging

    setup_logging()
    try:
        opts = jobfile.merge(jobfile.read_jobfile(config) if config else {}, cli)
        part = array_task.resolve(opts.get("num_shards_total"), opts.get("shard_index"))
        cfg = jobfile.to_run_config(opts, part, str(config) if config else None)
        code = run_caption(cfg)
    except (JobError, CheckpointError) as e:
        raise _fail(e) from None
    raise typer.Exit(code)


def manifest(
    folder: Path = typer.Argument(..., help="Folder to scan (recursively) for images"),
    output: Path = typer.Option(..., "-o", "--output", help="Manifest file to write (.txt)"),
    sample: Optional[int] = typer.Option(None, help="Take a random sample of N images"),
    seed: int = typer.Option(0, help="Seed of the sample"),
) -> None:
    """Build a txt manifest from a folder (paths relative to the manifest's folder)."""
    from pipeline.manifest import sample as take, scan_images, write_txt_manifest
    from pipeline.progress import setup_logging

    setup_logging()
    try:
        found = scan_images(folder)
        chosen = take(found, sample, seed)
        how = f"--sample {sample} --seed {seed}" if sample is not None else "all images"
        n = write_txt_manifest(output, folder, chosen, f"pipeline manifest {folder} {how}: {len(chosen)} of {len(found)} images")
    except JobError as e:
        raise _fail(e) from None
    log.info("wrote %s: %d of %d images under %s", output, n, len(found), folder)


def status(run_dir: Path = typer.Argument(..., help="Run directory")) -> None:
    """Done / pending / failed counts and throughput, from the done markers alone."""
    from jobs.manage import status as read_status
    from pipeline.progress import setup_logging

    setup_logging()
    try:
        report = read_status(run_dir)
    except JobError as e:
        raise _fail(e) from None
    typer.echo(report.format())


def export(
    run_dir: Path = typer.Argument(..., help="Run directory"),
    fmt: str = typer.Option("json", "--format", help="json ({path: caption}) | jsonl | csv | parquet (all columns)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file [default: RUN_DIR/captions.<format>]"),
    partial: bool = typer.Option(False, "--partial", help="Export the committed shards of an unfinished run"),
) -> None:
    """Merge the committed shards into one file."""
    from jobs.manage import export_run
    from pipeline.progress import setup_logging

    setup_logging()
    try:
        path = export_run(run_dir, fmt, output, partial)
    except JobError as e:
        raise _fail(e) from None
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("caption")(caption)
    app.command("manifest")(manifest)
    app.command("status")(status)
    app.command("export")(export)
