"""`pipeline manifest | status | export`: building a manifest and reading a run dir (no model,
no torch: these run in a second on a login node)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from cli.guard import guarded

log = logging.getLogger("pipeline")


def manifest(
    folder: Path = typer.Argument(..., help="Folder to scan (recursively) for images"),
    output: Path = typer.Option(..., "-o", "--output", help="Manifest file to write (.txt)"),
    sample: Optional[int] = typer.Option(None, help="Take a random sample of N images"),
    seed: int = typer.Option(0, help="Seed of the sample"),
) -> None:
    """Build a txt manifest from a folder (paths relative to the manifest's folder)."""
    from pipeline.manifest import sample as take, scan_images, write_txt_manifest

    found = scan_images(folder)
    chosen = take(found, sample, seed)
    how = f"--sample {sample} --seed {seed}" if sample is not None else "all images"
    n = write_txt_manifest(output, folder, chosen, f"pipeline manifest {folder} {how}: {len(chosen)} of {len(found)} images")
    log.info("wrote %s: %d of %d images under %s", output, n, len(found), folder)


def status(run_dir: Path = typer.Argument(..., help="Run directory")) -> None:
    """Done / pending / failed counts and throughput, from the done markers alone."""
    from pipeline.status import status as read_status

    typer.echo(read_status(run_dir).format())


def export(
    run_dir: Path = typer.Argument(..., help="Run directory"),
    fmt: str = typer.Option("json", "--format", help="json ({path: caption}) | jsonl | csv | parquet (all columns)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file [default: RUN_DIR/captions.<format>, "
                                          "or RUN_DIR/captions.partial.<format> with --partial]"),
    partial: bool = typer.Option(False, "--partial", help="Export the committed shards of an unfinished run"),
) -> None:
    """Merge the committed shards into one file."""
    from pipeline.export import export_run

    typer.echo(str(export_run(run_dir, fmt, output, partial)))


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("manifest")(guarded(manifest))
    app.command("status")(guarded(status))
    app.command("export")(guarded(export))
