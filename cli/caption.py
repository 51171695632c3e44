"""`pipeline caption`: its flags are generated from the option declarations in pipeline/config.py
(the same ones the TOML job file is checked against), so a new option is declared once."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from cli.guard import guarded
from pipeline.config import Declared, declared


def _parameter(d: Declared) -> inspect.Parameter:
    names = [d.name, *d.option.aliases]
    if d.type is bool:
        decls = [f"--{n.replace('_', '-')}/--no-{n.replace('_', '-')}" for n in names[:1]]
    else:
        decls = ["--" + n.replace("_", "-") for n in names]
    # default None: a flag left out must not override the job file (pipeline/jobfile.merge)
    default = typer.Option(None, *decls, help=d.help_text(), rich_help_panel=d.option.panel,
                           show_default=False)
    return inspect.Parameter(d.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Optional[d.type])


def _run_config(config: Optional[Path], flags: dict[str, Any], optional: tuple[str, ...] = ()):
    from pipeline import jobfile

    opts = jobfile.merge(jobfile.read_jobfile(config) if config else {}, flags)
    return jobfile.run_config(opts, str(config) if config else None, optional=optional)


def caption(config: Optional[Path] = None, **flags: Any) -> None:
    """Caption every image of the input into a run directory (resumable: re-run the same command).

    The input (--manifest or --input): a manifest of local paths and/or URLs, WebDataset tar shards
    ('shards/{000000..000999}.tar', a .tar, or a list of .tar files), or Parquet files with image
    bytes (img2dataset). `pipeline plan` with the same options shows what would run.

    Exit 1: a shard failed for an infrastructure reason (out of memory, device error, hung step).

    A device step that does not return in PIPELINE_STEP_TIMEOUT seconds (default 900) ends the run."""
    cfg = _run_config(config, flags)     # settings refused before torch loads
    from jobs.caption import run_caption

    raise typer.Exit(run_caption(cfg))


def plan(config: Optional[Path] = None, **flags: Any) -> None:
    """What `caption` with the same options would do: shards done / pending / with failed rows,
    images, and this array task's slice. No model is loaded (--model may be left out); the input's
    index is built into the run dir if it has none, so array tasks started next find it ready."""
    from pipeline.preview import preview

    typer.echo(preview(_run_config(config, flags, optional=("model",))).format())


_CONFIG = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
    None, "--config", help="TOML job file with any of these options; flags override it", show_default=False))
for _command in (caption, plan):
    _command.__signature__ = inspect.Signature([_CONFIG, *(_parameter(d) for d in declared())])
    _command.__annotations__ = {p.name: p.annotation for p in _command.__signature__.parameters.values()}


def register(app: typer.Typer) -> None:
    app.command("caption")(guarded(caption))
    app.command("plan")(guarded(plan))
