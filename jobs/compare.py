"""Paired comparison of two caption runs under the same CLIP judge.

Both runs are scored on the images they have in common (matched by resolved file, so a run keyed
by full paths pairs with one keyed by file names, as the MindIE NPU and GPU outputs are). Per image
Δ = cos_B − cos_A. We report the mean Δ with a percentile bootstrap 95 % CI (resampling images
with replacement, numpy Generator seeded, so the interval is reproducible), win/tie/loss counts
where |Δ| < tie_tol counts as a tie (default 1e-3 cosine: below the fp16-vs-fp32 noise of one
judge run, far below the usual spread between captions), and the images where the runs differ most.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from jobs.score import OK, ClipJudge, ImageIndex, ScoreConfig, ScoreRow, default_output, judge_meta, \
    read_captions, score_sources, summarize, write_scores
from pipeline.config import ImageLimits
from stages.preprocess import open_untrusted

if TYPE_CHECKING:
    from jobs.report_html import ReportData

log = logging.getLogger(__name__)

TIE_TOL = 1e-3
N_BOOT = 10_000


@dataclass(frozen=True)
class PairedStats:
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float            # mean of (b - a)
    ci_low: float
    ci_high: float
    wins: int                   # B better by at least tie_tol
    ties: int
    losses: int                 # A better by at least tie_tol
    n_boot: int
    seed: int
    tie_tol: float

    @property
    def significant(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def verdict(self, a: str = "A", b: str = "B") -> str:
        """One line; the difference is stated as better − worse, so it is positive when significant."""
        if self.n == 0:
            return "no common images: nothing to compare"
        counts = f"n={self.n}, {b} wins/ties/losses {self.wins}/{self.ties}/{self.losses} (tie: |Δ| < {self.tie_tol:g})"
        if not self.significant:
            return (f"no significant difference: {b} − {a} = {self.mean_diff:+.4f} cos "
                    f"[95% CI {self.ci_low:+.4f}, {self.ci_high:+.4f}], {counts}")
        if self.mean_diff > 0:
            better, worse, d, lo, hi = b, a, self.mean_diff, self.ci_low, self.ci_high
        else:
            better, worse, d, lo, hi = a, b, -self.mean_diff, -self.ci_high, -self.ci_low
        return f"{better} better than {worse}: {d:+.4f} cos [95% CI {lo:+.4f}, {hi:+.4f}], {counts}"


def bootstrap_mean_ci(diff: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95, chunk: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean. Chunked so n_boot x n indices never sit in memory at once."""
    diff = np.asarray(diff, dtype=np.float64)
    n = len(diff)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        means[start:start + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_stats(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 tie_tol: float = TIE_TOL) -> PairedStats:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need equal 1-D shapes, got {a.shape} and {b.shape}")
    d = b - a
    lo, hi = bootstrap_mean_ci(d, n_boot, seed)
    nan = math.nan
    return PairedStats(
        n=len(d), mean_a=float(a.mean()) if len(a) else nan, mean_b=float(b.mean()) if len(b) else nan,
        mean_diff=float(d.mean()) if len(d) else nan, ci_low=lo, ci_high=hi,
        wins=int((d >= tie_tol).sum()), ties=int((np.abs(d) < tie_tol).sum()), losses=int((d <= -tie_tol).sum()),
        n_boot=n_boot, seed=seed, tie_tol=tie_tol)


@dataclass(frozen=True)
class Pair:
    """One common image: both runs' rows (status ok on both sides)."""
    path: str
    a: ScoreRow
    b: ScoreRow

    @property
    def diff(self) -> float:
        return self.b.cosine - self.a.cosine


def _by_path(rows: Sequence[ScoreRow], label: str) -> dict[str, ScoreRow]:
    """Scored rows by file; when two keys name the same file (a path and a bare name), the first counts."""
    out: dict[str, ScoreRow] = {}
    for r in rows:
        if r.status != OK:
            continue
        if r.resolved_path in out:
            log.warning("%s: keys %r and %r are the same image; comparing %r", label, out[r.resolved_path].key,
                        r.key, out[r.resolved_path].key)
            continue
        out[r.resolved_path] = r
    return out


def pair_rows(rows_a: Sequence[ScoreRow], rows_b: Sequence[ScoreRow]) -> list[Pair]:
    """Join on the resolved file, scored on both sides; sorted by path for a stable order."""
    a, b = _by_path(rows_a, "A"), _by_path(rows_b, "B")
    return [Pair(p, a[p], b[p]) for p in sorted(a.keys() & b.keys())]


def most_different(pairs: Sequence[Pair], k: int) -> list[Pair]:
    """The k pairs with the largest |Δ|; ties broken by path so the report is stable."""
    return sorted(pairs, key=lambda p: (-abs(p.diff), p.path))[:k]


@dataclass(frozen=True)
class CompareResult:
    stats: PairedStats
    pairs: list[Pair]
    only_a: int                 # scored in A only (missing or failed in B)
    only_b: int
    rows_a: list[ScoreRow]
    rows_b: list[ScoreRow]


THUMB_PX = 256


def thumbnail_data_uri(path: str, limits: ImageLimits, px: int = THUMB_PX) -> str | None:
    """A JPEG thumbnail as a data: URI, or None when the image cannot be shown. Opened by the
    safe opener, as the judge opened it (no EXIF rotation, like the examples' scorer)."""
    try:
        im = open_untrusted(path, limits).convert("RGB")
        im.thumbnail((px, px), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken thumbnail must not lose the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def report_data(result: CompareResult, *, labels: tuple[str, str], sources: tuple[str, str], judge: str,
                top_k: int, context_length: int, limits: ImageLimits) -> "ReportData":
    """What the HTML report shows. Only scored pairs get there, and a scored row's path was
    resolved under --images (jobs/score.ImageIndex), so a thumbnail never shows another file."""
    from jobs.report_html import ReportData, ReportPair

    summaries = summarize(result.rows_a), summarize(result.rows_b)
    top = tuple(ReportPair(p.path, p.diff, p.a, p.b, thumbnail_data_uri(p.path, limits))
                for p in most_different(result.pairs, top_k))
    return ReportData(labels=labels, sources=sources, judge=judge, context_length=context_length,
                      stats=result.stats, verdict=result.stats.verdict(*labels), only=(result.only_a, result.only_b),
                      statuses=(summaries[0].statuses, summaries[1].statuses),
                      truncated=(summaries[0].n_truncated, summaries[1].n_truncated), top=top)


def run_compare(cfg: ScoreConfig, source_a: str | Path, source_b: str | Path, *, html: str | Path | None = None,
                top_k: int = 20, n_boot: int = N_BOOT, seed: int = 0, tie_tol: float = TIE_TOL,
                save_scores: bool = False, labels: tuple[str, str] = ("A", "B")) -> CompareResult:
    """The `pipeline compare` job: one judge, both caption sets, shared images encoded once."""
    caps_a, caps_b = read_captions(source_a), read_captions(source_b)
    index = ImageIndex(cfg.images)
    judge = ClipJudge.load(cfg)
    rows_a, rows_b = score_sources([caps_a, caps_b], index, judge, cfg.batch_size, cfg.workers)
    if save_scores:
        for rows, src in ((rows_a, source_a), (rows_b, source_b)):
            write_scores(rows, default_output(src), judge_meta(cfg, judge, src))
    pairs = pair_rows(rows_a, rows_b)
    stats = paired_stats([p.a.cosine for p in pairs], [p.b.cosine for p in pairs], n_boot, seed, tie_tol)
    ok_a = {r.resolved_path for r in rows_a if r.status == OK}
    ok_b = {r.resolved_path for r in rows_b if r.status == OK}
    result = CompareResult(stats, pairs, len(ok_a - ok_b), len(ok_b - ok_a), rows_a, rows_b)
    if html is not None:
        from jobs.report_html import write_report
        write_report(html, report_data(result, labels=labels, sources=(str(source_a), str(source_b)),
                                       judge=f"open_clip {judge.name} ({Path(cfg.clip_weights).name})",
                                       top_k=top_k, context_length=judge.context_length, limits=cfg.limits))
    for name, rows in zip(labels, (rows_a, rows_b)):
        log.info("%s: %s", name, summarize(rows).lines()[0])
    return result
