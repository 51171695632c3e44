"""Static, self-contained HTML report of a paired comparison: one file, no server, no script.

Thumbnails are embedded as base64 JPEG data URIs so the report can be mailed or archived alone.
Every caption, path and label is HTML-escaped: captions are model output and may contain markup.
The thumbnail shows the file as the judge opened it (no EXIF rotation, like the examples' scorer).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image

from pipeline.atomic import write_text_atomic

if TYPE_CHECKING:
    from jobs.compare import CompareResult, Pair

THUMB_PX = 256

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.4em;vertical-align:top}
.summary td:first-child{font-weight:600} .verdict{font-size:1.1em;font-weight:600;margin:1em 0}
.pair img{max-width:256px;max-height:256px} .cap{white-space:pre-wrap;max-width:32em;font-size:.9em}
.score{font-family:monospace} .better{background:#e8f6e8} .trunc{color:#a60;font-size:.8em}
.path{font-family:monospace;font-size:.8em;word-break:break-all;max-width:16em}
"""


def thumbnail_data_uri(path: str, px: int = THUMB_PX) -> str | None:
    """A JPEG thumbnail as a data: URI, or None when the image cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((px, px), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken thumbnail must not lose the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _caption_cell(row, context_note: str, better: bool) -> str:
    trunc = (f'<div class="trunc">truncated: {row.n_tokens} tokens, judged on the first {context_note}</div>'
             if row.truncated else "")
    cls = ' class="better"' if better else ""
    return (f'<td{cls}><div class="score">cos {row.cosine:.4f} · CLIPScore {row.clip_score:.2f}</div>'
            f'<div class="cap">{_e(row.caption)}</div>{trunc}</td>')


def _pair_row(p: "Pair", context_note: str) -> str:
    uri = thumbnail_data_uri(p.path)
    name = os.path.basename(p.path)
    img = (f'<img src="{uri}" alt="{_e(name)}">' if uri is not None
           else '<span class="trunc">(thumbnail unavailable)</span>')
    return (f'<tr class="pair" data-path="{_e(p.path)}"><td>{img}<div class="path">{_e(p.path)}</div></td>'
            f'<td class="score">{p.diff:+.4f}</td>'
            f'{_caption_cell(p.a, context_note, p.diff < 0)}{_caption_cell(p.b, context_note, p.diff > 0)}</tr>')


def render_report(result: "CompareResult", *, labels: tuple[str, str] = ("A", "B"),
                  sources: tuple[str, str] = ("", ""), judge: str = "", top_k: int = 20,
                  context_length: int = 77) -> str:
    from jobs.compare import most_different
    from jobs.score import summarize

    s = result.stats
    a, b = labels
    sum_a, sum_b = summarize(result.rows_a), summarize(result.rows_b)

    def statuses(rows) -> str:
        c = Counter(r.status for r in rows)
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))

    summary_rows: Sequence[tuple[str, str]] = (
        ("judge", judge),
        (f"{a}", sources[0]), (f"{b}", sources[1]),
        ("common images", f"{s.n} (only in {a}: {result.only_a}, only in {b}: {result.only_b})"),
        (f"mean cosine {a} / {b}", f"{s.mean_a:.4f} / {s.mean_b:.4f}"),
        (f"mean Δ ({b} − {a})", f"{s.mean_diff:+.4f}  [95% CI {s.ci_low:+.4f}, {s.ci_high:+.4f}], "
                                 f"{s.n_boot} bootstrap resamples, seed {s.seed}"),
        (f"{b} wins / ties / losses", f"{s.wins} / {s.ties} / {s.losses}  (tie: |Δ| < {s.tie_tol:g})"),
        (f"all rows {a}", f"{statuses(result.rows_a)}; truncated captions {sum_a.n_truncated}"),
        (f"all rows {b}", f"{statuses(result.rows_b)}; truncated captions {sum_b.n_truncated}"),
    )
    top = most_different(result.pairs, top_k)
    note = f"{context_length} tokens"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(a)} vs {_e(b)}: CLIP judge</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(a)} vs {_e(b)}</h1>",
        f'<div class="verdict">{_e(s.verdict(a, b))}</div>',
        '<table class="summary">',
        *(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary_rows),
        "</table>",
        f"<h2>{len(top)} images where they differ most</h2>",
        f'<table class="pairs"><tr><th>image</th><th>Δ cos</th><th>{_e(a)}</th><th>{_e(b)}</th></tr>',
        *(_pair_row(p, note) for p in top),
        "</table></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, result: "CompareResult", **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_report(result, **kwargs))
    return path
