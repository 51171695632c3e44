"""`pipeline bench`: throughput the NPU examples' way, with baseline and roofline ratios."""

from __future__ import annotations

import logging
from typing import Optional

import typer

from cli.guard import guarded

log = logging.getLogger("pipeline")


def parse_sizes(text: str) -> tuple[int, ...]:
    """'1-10' or '1,2,4,8' or '' -> a tuple of positive ints."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise typer.BadParameter(f"bad size list {text!r}: use e.g. 1-10 or 1,2,4") from None
        if a < 1 or b < a:
            raise typer.BadParameter(f"bad range {part!r}")
        out.extend(range(a, b + 1))
    return tuple(out)


def _check_image(path: str) -> None:
    """Before minutes of model loading: the image opens (through the captioner's safe opener)."""
    from pipeline.config import ImageLimits
    from pipeline.errors import JobError
    from stages.preprocess import ImageError, open_image

    try:
        open_image(path, ImageLimits())
    except ImageError as e:
        raise JobError(f"--image {path}: {e} ({e.status})") from None


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def bench(
        image: str = typer.Option(..., "--image", help="the image replicated to every batch slot"),
        model: Optional[str] = typer.Option(None, "--model", help="checkpoint folder (original HF format)"),
        random_weights: Optional[str] = typer.Option(
            None, "--random-weights", help="bunny|minicpmv2: write (once) and use a random full-size checkpoint"),
        random_dir: str = typer.Option("~/.cache/vlm-caption-pipeline/random", help="where random checkpoints go"),
        batch_sizes: str = typer.Option("1-10", help="batch sizes of the end-to-end runs"),
        decode_batch_sizes: str = typer.Option("", help="extra batch sizes for decode-only throughput, e.g. 16,32"),
        max_new_tokens: int = typer.Option(256, min=1),
        prompt: str = typer.Option("Describe this image in detail.", "--prompt"),
        dtype: str = typer.Option("auto"),
        device: str = typer.Option("auto"),
        threads: Optional[int] = typer.Option(None, min=1),
        repeats: int = typer.Option(3, min=1, help="median of this many runs per batch size"),
        baseline: bool = typer.Option(False, help="also run the reference-style baseline and report ours/baseline"),
        stock: bool = typer.Option(False, help="also run the model on PyTorch's own CPU paths (no kernels of ours) "
                                                "and report ours/stock"),
        stock_decode_tokens: int = typer.Option(32, min=2, help="new tokens of the stock decode-only row"),
        out: str = typer.Option("benchmarks/results", "--out", help="folder for the CSV and JSON results"),
    ) -> None:
        """Measure captioning throughput: one image replicated, batch 1..10, 256 tokens, EOS ignored."""
        from jobs.bench import BenchConfig, run

        if bool(model) == bool(random_weights):
            raise typer.BadParameter("give exactly one of --model DIR or --random-weights bunny|minicpmv2")
        if random_weights and random_weights not in ("bunny", "minicpmv2"):
            raise typer.BadParameter("--random-weights takes bunny or minicpmv2")
        _check_image(image)
        cfg = BenchConfig(image=image, model_dir=model, random_weights=random_weights, random_dir=random_dir,
                          batch_sizes=parse_sizes(batch_sizes), decode_batch_sizes=parse_sizes(decode_batch_sizes),
                          max_new_tokens=max_new_tokens, question=prompt, dtype=dtype, device=device,
                          threads=threads, repeats=repeats, baseline=baseline, stock=stock,
                          stock_decode_tokens=stock_decode_tokens, out_dir=out)
        s = run(cfg)
        typer.echo(f"{s.family} on {s.device}, {s.dtype}; {s.kernels}; machine: {s.machine['bandwidth_gbs']:.1f} GB/s, "
                   f"{s.machine['matmul_gflops']:.0f} GFLOP/s {s.dtype} GEMM (best of "
                   f"{', '.join(s.machine.get('matmul_paths') or {}) or 'n/a'})")
        typer.echo(f"{'mode':<18}{'batch':>6}{'in':>6}{'out':>5}{'first ms':>10}{'tok ms':>9}{'resp s':>9}"
                   f"{'tok/s':>9}{'img/s':>8}{'dec tok/s':>10}{'RSS GiB':>9}")
        for r in s.rows:
            typer.echo(f"{r.mode:<18}{r.batch:>6}{r.input_len:>6}{r.output_len:>5}{r.first_token_ms:>10.0f}"
                       f"{r.per_token_ms:>9.1f}{r.response_s:>9.2f}{r.e2e_tokens_per_s:>9.1f}{r.images_per_s:>8.3f}"
                       f"{r.decode_tokens_per_s:>10.1f}{r.peak_rss_gib:>9.2f}")
        for k, v in {**s.floors, **s.ratios}.items():
            typer.echo(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
