"""`pipeline score` and `pipeline compare`: the CLIP judge of the NPU examples' precision test.

Parsing and printing only; the work is in jobs/score.py and jobs/compare.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.guard import guarded
from pipeline.progress import setup_logging

_SOURCE = "a run directory, a captions JSON ({image: caption}, keys are file names or paths) or a Parquet file"


def _config(images: Path, clip_weights: Path, clip_model: str, clip_config: Optional[Path], device: str,
            dtype: str, batch_size: int, workers: int):
    from jobs.score import ScoreConfig
    return ScoreConfig(images=images, clip_weights=clip_weights, clip_model=clip_model, clip_config=clip_config,
                       device=device, dtype=dtype, batch_size=batch_size, workers=workers)


def _label(source: Path) -> str:
    return source.name if source.is_dir() else source.stem


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""

    @app.command("score")
    @guarded
    def score(
        source: Path = typer.Argument(..., metavar="RUN_DIR|CAPTIONS_JSON", help=f"Captions to judge: {_SOURCE}."),
        images: Path = typer.Option(..., "--images", help="Folder the captioned images are under (keys resolve against it)."),
        clip_weights: Path = typer.Option(..., "--clip-weights", help="open_clip weights file (.safetensors, or a "
                                          "torch state dict such as open_clip_pytorch_model.bin, loaded weights_only)."),
        clip_model: str = typer.Option("ViT-H-14", "--clip-model", help="open_clip architecture of the weights."),
        clip_config: Optional[Path] = typer.Option(None, "--clip-config", help="open_clip model config JSON for "
                                                   "an architecture open_clip does not ship (named by its file stem)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Per-image Parquet "
                                           "[default: RUN_DIR/scores.parquet or NAME.scores.parquet]."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i] | npu[:i]"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 (as the examples' scorer) | bfloat16 | float16 | auto"),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images (and captions) encoded per call."),
        workers: int = typer.Option(2, "--workers", min=1, help="Threads opening and preprocessing images."),
        quiet: bool = typer.Option(False, "--quiet", help="Warnings only on stderr."),
    ) -> None:
        """Judge captions with CLIP: per-image cosine (and 100·max(cos,0)); prints mean, median, count."""
        from jobs.score import run_score

        setup_logging(quiet)
        summary, path = run_score(_config(images, clip_weights, clip_model, clip_config, device, dtype,
                                          batch_size, workers), source, out)
        for line in summary.lines():
            typer.echo(line)
        typer.echo(f"per-image scores: {path}")

    @app.command("compare")
    @guarded
    def compare(
        a: Path = typer.Argument(..., metavar="A", help=f"Baseline captions: {_SOURCE}."),
        b: Path = typer.Argument(..., metavar="B", help="Captions compared against A (same forms)."),
        images: Path = typer.Option(..., "--images", help="Folder the captioned images are under."),
        clip_weights: Path = typer.Option(..., "--clip-weights", help="open_clip weights file."),
        clip_model: str = typer.Option("ViT-H-14", "--clip-model", help="open_clip architecture of the weights."),
        clip_config: Optional[Path] = typer.Option(None, "--clip-config", help="open_clip model config JSON."),
        html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
        top_k: int = typer.Option(20, "--top-k", min=1, help="Most different images listed in the report."),
        n_boot: int = typer.Option(10_000, "--bootstrap", min=100, help="Bootstrap resamples for the 95% CI."),
        seed: int = typer.Option(0, "--seed", help="Bootstrap seed (same seed, same interval)."),
        tie_tol: float = typer.Option(1e-3, "--tie-tol", min=0.0, help="|Δ cosine| below this is a tie."),
        label_a: Optional[str] = typer.Option(None, "--label-a", help="Name of A in the output [default: its file/dir name]."),
        label_b: Optional[str] = typer.Option(None, "--label-b", help="Name of B in the output."),
        save_scores: bool = typer.Option(False, "--save-scores", help="Also write each side's per-image Parquet "
                                         "(as `pipeline score` would)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i] | npu[:i]"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 | auto"),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images (and captions) encoded per call."),
        workers: int = typer.Option(2, "--workers", min=1, help="Threads opening and preprocessing images."),
        quiet: bool = typer.Option(False, "--quiet", help="Warnings only on stderr."),
    ) -> None:
        """Paired comparison of two runs on their common images: mean Δ cosine with a bootstrap 95% CI."""
        from jobs.compare import most_different, run_compare

        setup_logging(quiet)
        labels = (label_a or _label(a), label_b or _label(b))
        if labels[0] == labels[1]:
            labels = (labels[0] + " (A)", labels[1] + " (B)")
        result = run_compare(_config(images, clip_weights, clip_model, clip_config, device, dtype, batch_size,
                                     workers), a, b, html=html, top_k=top_k, n_boot=n_boot, seed=seed,
                             tie_tol=tie_tol, save_scores=save_scores, labels=labels)
        s = result.stats
        typer.echo(f"{labels[0]}: mean cosine {s.mean_a:.4f}   {labels[1]}: mean cosine {s.mean_b:.4f}   "
                   f"(common images {s.n}; only in {labels[0]} {result.only_a}, only in {labels[1]} {result.only_b})")
        for p in most_different(result.pairs, min(5, top_k)):
            typer.echo(f"  Δ {p.diff:+.4f}  {p.path}")
        if html is not None:
            typer.echo(f"report: {html}")
        typer.echo(s.verdict(*labels))
