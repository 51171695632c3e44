"""`pipeline status`: where a run stands, from run.json and the done markers alone.

It never reads the Parquet data (nor imports torch or a model), so it is instant on a run of
millions of images and safe to call while array tasks are writing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusReport:
    run_dir: str
    model: str
    fingerprint: str
    n_images: int
    n_shards: int
    shard_size: int
    done_shards: int
    done_images: int
    status: dict[str, int]
    pending_shards: tuple[int, ...]
    pending_images: int
    span_s: float                                   # first shard start -> last commit
    processed: int                                  # images captioned by the recorded attempts
    new_tokens: int
    per_process: dict[str, float] = field(default_factory=dict)   # host:pid -> images/s
    complete: bool = False
    set_aside: tuple[int, ...] = ()                 # pending because their data failed verification

    @property
    def failed(self) -> int:
        return self.done_images - self.status.get("ok", 0)

    def format(self) -> str:
        fails = {k: v for k, v in self.status.items() if k != "ok"}
        lines = [
            f"run        {self.run_dir}",
            f"model      {self.model}  (fingerprint {self.fingerprint})",
            f"images     {self.n_images} in {self.n_shards} shard(s) of {self.shard_size}",
            f"done       {self.done_images} images in {self.done_shards} shard(s): {self.status.get('ok', 0)} ok, "
            f"{self.failed} failed" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(fails.items())) + ")" if fails else ""),
            f"pending    {self.pending_images} images in {len(self.pending_shards)} shard(s)"
            + (f": {', '.join(map(str, self.pending_shards[:10]))}{' ...' if len(self.pending_shards) > 10 else ''}"
               if self.pending_shards else ""),
        ]
        if self.set_aside:
            lines.append(f"set aside  {len(self.set_aside)} shard(s) whose data no longer matched its done marker: "
                         f"{', '.join(map(str, self.set_aside[:10]))}{' ...' if len(self.set_aside) > 10 else ''} "
                         f"(the next caption run redoes them)")
        if self.span_s > 0:
            lines.append(f"throughput {self.processed / self.span_s:.2f} img/s, {self.new_tokens / self.span_s:.1f} new tok/s "
                         f"over {self.span_s:.1f} s ({len(self.per_process)} process(es))")
        lines.append(f"complete   {'yes: captions.json written' if self.complete else 'no'}")
        return "\n".join(lines)


def status(run_dir: str | Path) -> StatusReport:
    ledger = Ledger(run_dir)
    run = ledger.read_run()
    layout = ledger.layout
    markers = ledger.markers()
    hist: Counter = Counter()
    for m in markers.values():
        hist.update(m.status)
    pending = tuple(s for s in range(layout.n_shards) if s not in markers)
    size = layout.shard_size
    pending_images = sum(min(size, layout.n_images - s * size) for s in pending)
    span = (max(m.finished for m in markers.values()) - min(m.started for m in markers.values())) if markers else 0.0
    procs: dict[str, list] = {}
    for m in markers.values():
        p = procs.setdefault(f"{m.host}:{m.pid}", [0, float("inf"), 0.0])
        p[0] += m.processed
        p[1] = min(p[1], m.started)
        p[2] = max(p[2], m.finished)
    return StatusReport(
        run_dir=str(run_dir), model=str(run.config.get("model", "?")), fingerprint=ledger.fingerprint,
        n_images=layout.n_images, n_shards=layout.n_shards, shard_size=size, done_shards=len(markers),
        done_images=sum(m.rows for m in markers.values()), status=dict(sorted(hist.items())),
        pending_shards=pending, pending_images=pending_images, span_s=span,
        processed=sum(m.processed for m in markers.values()), new_tokens=sum(m.new_tokens for m in markers.values()),
        per_process={k: (n / (b - a) if b > a else 0.0) for k, (n, a, b) in procs.items()},
        complete=not pending and (Path(run_dir) / "captions.json").exists(),
        set_aside=tuple(s for s in ledger.set_aside_shards() if s in pending))
