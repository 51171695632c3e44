"""`pipeline plan`: what `pipeline caption` with the same options would do, without loading a model
(no torch): the run dir's state, the input, shards done / pending / with failed rows, and the slice
of this array task. Seconds at 10M images: the input's index is built once (here, if the run dir
has none yet, so the array tasks that follow find it ready) or checked by its footer and stats,
and the done markers are read once.

What it cannot see without the model: the checkpoint, the prompt and the run's fingerprint;
`caption` checks those before it starts, and may still refuse there.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import JobError
from pipeline.index import build_index
from pipeline.ledger import RUN_JSON, Layout, Ledger, different_run, layout_mismatch
from pipeline.run_input import describe, input_spec, layout_of, open_index


@dataclass(frozen=True)
class Slice:
    """What one process (an array task, or the whole run) would do."""

    index: int
    total: int
    shards: tuple[int, ...]            # pending shards it owns
    images: int
    retry_shards: int = 0              # --retry-failed: its committed shards with failed rows...
    retry_images: int = 0              # ...and those rows


@dataclass(frozen=True)
class PlanReport:
    run_dir: str
    state: str                         # one phrase: new, joins, starts over
    input: str                         # as given
    input_kind: str                    # 'a txt manifest', '12 tar shards', ...
    layout: Layout
    done_shards: int
    done_images: int
    failed_shards: int                 # committed shards with at least one failed row
    failed_images: int
    set_aside: int
    task: Slice
    seconds: float = 0.0
    retry: bool = False

    @property
    def pending_shards(self) -> int:
        return self.layout.n_shards - self.done_shards

    @property
    def pending_images(self) -> int:
        return self.layout.n_images - self.done_images

    def format(self) -> str:
        lay, t = self.layout, self.task
        shown = ", ".join(map(str, t.shards[:8])) + (" ..." if len(t.shards) > 8 else "")
        who = f"task {t.index} of {t.total}" if t.total > 1 else "this run"
        lines = [
            f"run        {self.run_dir}: {self.state}",
            f"input      {self.input}: {self.input_kind}, {lay.n_images:,} images in {lay.n_shards:,} shard(s) of "
            f"{lay.shard_size}",
            f"shards     {self.done_shards:,} done ({self.failed_shards:,} with failed rows: {self.failed_images:,} "
            f"images), {self.pending_shards:,} pending ({self.pending_images:,} images)"
            + (f", {self.set_aside:,} set aside to redo" if self.set_aside else ""),
            f"{who:<10} {len(t.shards):,} shard(s) to caption, {t.images:,} images" + (f": {shown}" if t.shards else "")
            + (f"; --retry-failed: {t.retry_shards:,} shard(s), {t.retry_images:,} failed rows" if self.retry else ""),
            f"planned in {self.seconds:.1f} s; model not loaded: caption checks the checkpoint, the prompt and the "
            f"run's fingerprint before it starts",
        ]
        return "\n".join(lines)


def preview(cfg: RunConfig) -> PlanReport:
    """The plan of `caption` with these options. Raises the JobError caption would raise for the input
    or the run dir (another input, another shard size, a damaged run.json)."""
    t0 = time.perf_counter()
    spec = input_spec(cfg)
    ledger = Ledger(cfg.out)
    try:
        layout = layout_of(open_index(ledger, spec, cfg.shard_size, overwrite=False))
    except JobError:
        if not cfg.overwrite or ledger.peek_run() is None:
            raise
        # caption --overwrite would replace the run's index; plan changes nothing in the run dir,
        # so the new input is indexed in a temporary folder, for its counts
        with tempfile.TemporaryDirectory(prefix="pipeline-plan-") as tmp:
            info = build_index(spec, Path(tmp) / "index.parquet", cfg.shard_size)
        layout = Layout(info.identity, info.n_rows, cfg.shard_size)
    run = None
    if (ledger.root / RUN_JSON).exists():
        try:
            run = ledger.read_run()
        except JobError:                  # damaged: caption refuses it, or starts over with --overwrite
            if not cfg.overwrite:
                raise
    why = layout_mismatch(run.layout, layout) if run is not None else None
    if why and not cfg.overwrite:
        raise different_run(ledger.root, why)
    starts_over = run is not None and cfg.overwrite
    state = ("new: caption creates run.json" if run is None else
             "caption joins the run in its run.json" if not starts_over else
             "--overwrite: caption starts over" + (f" ({why})" if why else "")
             + (" for this task's slice" if cfg.array.total > 1 and not why else ""))
    markers = ledger.markers() if run is not None and not why else {}
    if starts_over:                       # an array task's --overwrite clears its own slice only
        markers = {s: m for s, m in markers.items() if cfg.array.total > 1 and not cfg.array.owns(s)}
    failed = {s: m.failed for s, m in markers.items() if m.failed}
    mine = tuple(s for s in cfg.array.shards(layout.n_shards) if s not in markers)
    mine_failed = {s: n for s, n in failed.items() if cfg.array.owns(s)}
    task = Slice(cfg.array.index, cfg.array.total, mine, sum(len(layout.indices(s)) for s in mine),
                 len(mine_failed), sum(mine_failed.values()))
    set_aside = len([s for s in ledger.set_aside_shards() if s not in markers]) if run is not None and not why else 0
    return PlanReport(run_dir=str(ledger.root), state=state, input=spec.given,
                      input_kind=describe(spec.kind, spec.format, len(spec.files)), layout=layout,
                      done_shards=len(markers), done_images=sum(m.rows for m in markers.values()),
                      failed_shards=len(failed), failed_images=sum(failed.values()), set_aside=set_aside, task=task,
                      seconds=time.perf_counter() - t0, retry=cfg.retry_failed)
