"""Static, self-contained HTML report of a paired comparison: one file, no server, no script.

The renderer takes data (ReportData: the numbers, the most different pairs with their thumbnails
already made) and opens nothing itself: jobs/compare.py decides what goes in, and makes the
thumbnails through the captioner's safe opener, from files under --images only. Thumbnails are
embedded as base64 JPEG data URIs so the report can be mailed or archived alone. Every caption,
path and label is HTML-escaped: captions are model output and may contain markup.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.atomic import write_text_atomic

if TYPE_CHECKING:
    from jobs.compare import PairedStats
    from jobs.score import ScoreRow


@dataclass(frozen=True)
class ReportPair:
    """One of the most different images: both runs' rows and the thumbnail to show."""

    path: str
    diff: float                      # cos_B - cos_A
    a: "ScoreRow"
    b: "ScoreRow"
    thumbnail: str | None            # a data: URI, or None when the image could not be shown


@dataclass(frozen=True)
class ReportData:
    labels: tuple[str, str]
    sources: tuple[str, str]
    judge: str
    context_length: int              # the judge's text context: truncated captions say so
    stats: "PairedStats"
    verdict: str
    only: tuple[int, int]            # images scored in A only, in B only
    statuses: tuple[dict[str, int], dict[str, int]]   # every row's status counts, per run
    truncated: tuple[int, int]       # truncated captions among the scored rows, per run
    top: tuple[ReportPair, ...]


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.4em;vertical-align:top}
.summary td:first-child{font-weight:600} .verdict{font-size:1.1em;font-weight:600;margin:1em 0}
.pair img{max-width:256px;max-height:256px} .cap{white-space:pre-wrap;max-width:32em;font-size:.9em}
.score{font-family:monospace} .better{background:#e8f6e8} .trunc{color:#a60;font-size:.8em}
.path{font-family:monospace;font-size:.8em;word-break:break-all;max-width:16em}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _caption_cell(row: "ScoreRow", context_note: str, better: bool) -> str:
    trunc = (f'<div class="trunc">truncated: {row.n_tokens} tokens, judged on the first {context_note}</div>'
             if row.truncated else "")
    cls = ' class="better"' if better else ""
    return (f'<td{cls}><div class="score">cos {row.cosine:.4f} · CLIPScore {row.clip_score:.2f}</div>'
            f'<div class="cap">{_e(row.caption)}</div>{trunc}</td>')


def _pair_row(p: ReportPair, context_note: str) -> str:
    name = os.path.basename(p.path)
    img = (f'<img src="{p.thumbnail}" alt="{_e(name)}">' if p.thumbnail is not None
           else '<span class="trunc">(thumbnail unavailable)</span>')
    return (f'<tr class="pair" data-path="{_e(p.path)}"><td>{img}<div class="path">{_e(p.path)}</div></td>'
            f'<td class="score">{p.diff:+.4f}</td>'
            f'{_caption_cell(p.a, context_note, p.diff < 0)}{_caption_cell(p.b, context_note, p.diff > 0)}</tr>')


def render_report(d: ReportData) -> str:
    s = d.stats
    a, b = d.labels

    def statuses(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

    summary_rows = (
        ("judge", d.judge),
        (f"{a}", d.sources[0]), (f"{b}", d.sources[1]),
        ("common images", f"{s.n} (only in {a}: {d.only[0]}, only in {b}: {d.only[1]})"),
        (f"mean cosine {a} / {b}", f"{s.mean_a:.4f} / {s.mean_b:.4f}"),
        (f"mean Δ ({b} − {a})", f"{s.mean_diff:+.4f}  [95% CI {s.ci_low:+.4f}, {s.ci_high:+.4f}], "
                                 f"{s.n_boot} bootstrap resamples, seed {s.seed}"),
        (f"{b} wins / ties / losses", f"{s.wins} / {s.ties} / {s.losses}  (tie: |Δ| < {s.tie_tol:g})"),
        (f"all rows {a}", f"{statuses(d.statuses[0])}; truncated captions {d.truncated[0]}"),
        (f"all rows {b}", f"{statuses(d.statuses[1])}; truncated captions {d.truncated[1]}"),
    )
    note = f"{d.context_length} tokens"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(a)} vs {_e(b)}: CLIP judge</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(a)} vs {_e(b)}</h1>",
        f'<div class="verdict">{_e(d.verdict)}</div>',
        '<table class="summary">',
        *(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary_rows),
        "</table>",
        f"<h2>{len(d.top)} images where they differ most</h2>",
        f'<table class="pairs"><tr><th>image</th><th>Δ cos</th><th>{_e(a)}</th><th>{_e(b)}</th></tr>',
        *(_pair_row(p, note) for p in d.top),
        "</table></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, data: ReportData) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_report(data))
    return path
