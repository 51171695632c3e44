"""`pipeline bench`: throughput measured the way the NPU examples do, plus honest ratios.

NPU-example method: one image replicated to batch b (b = 1..10), 256 new tokens with EOS ignored,
per batch: first-token time, per-token time, response time, E2E throughput = b*256/time, and
images/s, each the median of several repeats. Timed end to end: image load + preprocess, vision,
prefill, decode. Added here:
- pure decode throughput at larger batches (prefill excluded), and prefill tokens/s,
- the machine's roofline (measured streaming bandwidth; GEMM rate of every path in the compute
  dtype, the fastest taken) and ours/floor ratios,
- the CPU (model, ISA level) and the kernels used, in the JSON,
- optionally, in the same run: the reference-style baseline (jobs/bench_baseline.py), and the same
  checkpoint on PyTorch's own CPU paths ("stock", `--stock`): ours/baseline, ours/stock.
Results: benchmarks/results/<family>-<stamp>.csv (+ .json summary).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from jobs import roofline
from models.base import LoadedModel, dtype_name
from models.random_checkpoint import write_random_checkpoint
from models.registry import load_model
from pipeline import device as dev
from pipeline.config import DecodeConfig
from pipeline.records import ImageRef
from stages.caption.engine import CaptionEngine, EngineOptions
from stages.encode import VisionEncoder
from stages.records import ImageInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    image: str
    model_dir: str | None = None
    random_weights: str | None = None          # "bunny" | "minicpmv2": write/reuse a random checkpoint
    random_dir: str = "~/.cache/vlm-caption-pipeline/random"
    batch_sizes: tuple[int, ...] = tuple(range(1, 11))
    decode_batch_sizes: tuple[int, ...] = ()   # extra, larger batches for decode-only throughput
    max_new_tokens: int = 256
    question: str = "Describe this image in detail."
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    repeats: int = 3
    baseline: bool = False
    stock: bool = False                        # also run the same model on PyTorch's own CPU paths
    stock_decode_tokens: int = 32              # tokens of the stock decode-only rows (it is slow)
    out_dir: str = "benchmarks/results"


@dataclass
class Row:
    mode: str                  # "ours" | "baseline" | "decode-only"
    batch: int
    input_len: int
    output_len: int
    first_token_ms: float
    per_token_ms: float
    response_s: float
    e2e_tokens_per_s: float
    images_per_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_gib: float


@dataclass
class Summary:
    family: str
    device: str
    dtype: str
    machine: dict
    cpu: dict = field(default_factory=dict)    # model, ISA level, torch capability (CPU runs)
    kernels: str = ""                          # the fast paths the model ran with
    threads: int = 0
    rows: list[Row] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    floors: dict = field(default_factory=dict)


def _inputs(loaded: LoadedModel, image: Image.Image, path: str, b: int, question: str) -> list[ImageInputs]:
    """b copies of the image, each preprocessed and tokenized (timed as the pipeline would)."""
    out = []
    for i in range(b):
        t0 = time.perf_counter()
        px = loaded.processor(image)
        plan = loaded.prompts.build(question, px)
        out.append(ImageInputs(ImageRef(f"{i}", path, path, 0, i), px, plan, image.size[0], image.size[1],
                               time.perf_counter() - t0))
    return out


def _vision_flops(loaded: LoadedModel, inputs: ImageInputs) -> int:
    m = loaded.model
    c = m.vision.cfg
    total = 0
    for h, w in inputs.pixels.shapes:
        n = (h // c.patch) * (w // c.patch)
        total += roofline.vit_flops(c, n)
        # connector: Bunny's 2-layer MLP on every token; MiniCPM's resampler kv projection
        # dominates its cost (the 64-query attention and output projections are small)
        conn = m.projector if hasattr(m, "projector") else None
        if conn is not None:
            total += 2 * n * sum(p.numel() for p in conn.parameters() if p.dim() == 2)
        else:
            total += 2 * n * c.width * m.llm.cfg.hidden_size
    return total


def _median_row(rows: list[Row]) -> Row:
    med = {k: statistics.median(getattr(r, k) for r in rows) for k in asdict(rows[0]) if k not in ("mode",)}
    med["batch"], med["input_len"], med["output_len"] = rows[0].batch, rows[0].input_len, rows[0].output_len
    return Row(mode=rows[0].mode, **med)


def run_once(loaded: LoadedModel, image: Image.Image, path: str, b: int, cfg: BenchConfig) -> Row:
    t0 = time.perf_counter()
    inputs = _inputs(loaded, image, path, b, cfg.question)
    feats = VisionEncoder(loaded)(inputs)
    t_vision = time.perf_counter()
    eng = CaptionEngine(loaded, DecodeConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=True),
                        EngineOptions(max_batch_size=b, max_prefill_batch=b))
    caps = list(eng.run(feats))
    dev.synchronize(loaded.device)
    total = time.perf_counter() - t0
    n_new = caps[0].n_new
    steps = max(1, eng.stats.decode_steps)
    return Row(mode="ours", batch=b, input_len=caps[0].n_prompt, output_len=n_new,
               first_token_ms=1e3 * (t_vision - t0 + eng.stats.prefill_s),
               per_token_ms=1e3 * eng.stats.decode_s / steps, response_s=total,
               e2e_tokens_per_s=b * n_new / total, images_per_s=b / total,
               prefill_tokens_per_s=eng.stats.prompt_tokens / max(eng.stats.prefill_s, 1e-9),
               decode_tokens_per_s=(eng.stats.new_tokens - b) / max(eng.stats.decode_s, 1e-9),
               peak_rss_gib=dev.peak_rss_bytes() / 2**30)


def decode_only(loaded: LoadedModel, image: Image.Image, path: str, b: int, cfg: BenchConfig) -> Row:
    """Decode throughput at batch b: one image's embeddings replicated (vision runs once)."""
    feats = VisionEncoder(loaded)(_inputs(loaded, image, path, 1, cfg.question))
    f = feats[0]
    reps = [type(f)(ref=ImageRef(str(i), path, path, 0, i), prompt_embeds=f.prompt_embeds, width=f.width,
                    height=f.height, preprocess_s=0.0, encode_s=0.0) for i in range(b)]
    eng = CaptionEngine(loaded, DecodeConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=True),
                        EngineOptions(max_batch_size=b, max_prefill_batch=4))
    t0 = time.perf_counter()
    caps = list(eng.run(reps))
    total = time.perf_counter() - t0
    steps = max(1, eng.stats.decode_steps)
    return Row(mode="decode-only", batch=b, input_len=caps[0].n_prompt, output_len=caps[0].n_new,
               first_token_ms=float("nan"), per_token_ms=1e3 * eng.stats.decode_s / steps, response_s=total,
               e2e_tokens_per_s=b * caps[0].n_new / total, images_per_s=b / total,
               prefill_tokens_per_s=eng.stats.prompt_tokens / max(eng.stats.prefill_s, 1e-9),
               decode_tokens_per_s=(eng.stats.new_tokens - b) / max(eng.stats.decode_s, 1e-9),
               peak_rss_gib=dev.peak_rss_bytes() / 2**30)


def run_baseline(loaded: LoadedModel, image: Image.Image, path: str, cfg: BenchConfig) -> Row:
    from jobs.bench_baseline import Baseline

    base = Baseline(loaded)
    runs = []
    for _ in range(max(1, min(cfg.repeats, 2))):   # it is slow: at most two repeats
        t0 = time.perf_counter()
        px = loaded.processor(image)
        r = base.caption(px, cfg.question, cfg.max_new_tokens)
        total = time.perf_counter() - t0
        n_prompt = len(loaded.prompts.build(cfg.question, px).ids)
        runs.append(Row(mode="baseline", batch=1, input_len=n_prompt, output_len=r.new_tokens,
                        first_token_ms=1e3 * r.first_token_s,
                        per_token_ms=1e3 * (r.seconds - r.first_token_s) / max(1, r.new_tokens - 1),
                        response_s=total, e2e_tokens_per_s=r.new_tokens / total, images_per_s=1 / total,
                        prefill_tokens_per_s=float("nan"),
                        decode_tokens_per_s=(r.new_tokens - 1) / max(r.seconds - r.first_token_s, 1e-9),
                        peak_rss_gib=dev.peak_rss_bytes() / 2**30))
    del base
    return _median_row(runs)


def _model_dir(cfg: BenchConfig) -> str:
    if cfg.random_weights:
        return str(write_random_checkpoint(cfg.random_weights, Path(cfg.random_dir).expanduser() / cfg.random_weights))
    if not cfg.model_dir:
        raise ValueError("give --model DIR or --random-weights bunny|minicpmv2")
    return cfg.model_dir


def run(cfg: BenchConfig) -> Summary:
    device = dev.resolve_device(cfg.device)
    dev.set_threads(cfg.threads)
    dtype = dev.resolve_dtype(cfg.dtype, device)
    model_dir = _model_dir(cfg)
    t0 = time.perf_counter()
    loaded = load_model(model_dir, dtype, device, kernels=dev.cpu_kernels(device, dtype))
    log.info("model loaded in %.1f s on %s (%s); %s", time.perf_counter() - t0, dev.describe(device), dtype,
             loaded.kernels)
    image = Image.open(cfg.image).convert("RGB")
    if device.type == "cpu":
        from models.kernels import build
        machine = roofline.measure_machine(dtype, ops=build.load(dev.cpu_info().isa))
    else:
        machine = roofline.Machine(float("nan"), float("nan"))
    s = Summary(family=loaded.family, device=dev.describe(device), dtype=dtype_name(dtype),
                machine=asdict(machine), kernels=loaded.kernels, threads=torch.get_num_threads())
    if device.type == "cpu":
        s.cpu = {**asdict(dev.cpu_info()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    log.info("machine: %.1f GB/s streaming; GEMM %s GFLOP/s", machine.bandwidth_gbs,
             ", ".join(f"{k} {v:.0f}" for k, v in machine.matmul_paths.items()) or "n/a")
    run_once(loaded, image, cfg.image, 1, BenchConfig(**{**asdict(cfg), "max_new_tokens": 4}))   # warm-up
    for b in cfg.batch_sizes:
        rows = [run_once(loaded, image, cfg.image, b, cfg) for _ in range(cfg.repeats)]
        s.rows.append(_median_row(rows))
        log.info("batch %d: %.3f images/s, %.1f ms/token", b, s.rows[-1].images_per_s, s.rows[-1].per_token_ms)
    for b in cfg.decode_batch_sizes:
        s.rows.append(decode_only(loaded, image, cfg.image, b, cfg))
        log.info("decode-only batch %d: %.1f tokens/s, %.1f ms/step", b, s.rows[-1].decode_tokens_per_s,
                 s.rows[-1].per_token_ms)
    _floors(s, loaded, image, cfg, dtype, machine)
    if cfg.baseline:
        s.rows.append(run_baseline(loaded, image, cfg.image, cfg))
        base = s.rows[-1]
        best = max((r for r in s.rows if r.mode == "ours"), key=lambda r: r.images_per_s)
        s.ratios["images_per_s_ours_vs_baseline"] = best.images_per_s / base.images_per_s
        one = next((r for r in s.rows if r.mode == "ours" and r.batch == 1), None)
        if one:
            s.ratios["batch1_per_token_baseline_vs_ours"] = base.per_token_ms / one.per_token_ms
    if cfg.stock and device.type == "cpu":
        del loaded
        _stock(s, model_dir, image, cfg, dtype, device)
    _write(s, cfg)
    return s


def _stock(s: Summary, model_dir: str, image: Image.Image, cfg: BenchConfig, dtype, device) -> None:
    """The same checkpoint on PyTorch's own CPU paths (F.linear, SDPA), measured in this run:
    batch 1 and the best batch end to end, and decode-only at the largest decode batch."""
    import gc

    gc.collect()
    stock = load_model(model_dir, dtype, device)
    ours = [r for r in s.rows if r.mode == "ours"]
    best = max(ours, key=lambda r: r.images_per_s) if ours else None
    for b in sorted({1, best.batch} if best else {1}):
        r = run_once(stock, image, cfg.image, b, cfg)
        r.mode = "stock"
        s.rows.append(r)
        log.info("stock batch %d: %.3f images/s, %.1f ms/token", b, r.images_per_s, r.per_token_ms)
    for b in cfg.decode_batch_sizes[-1:]:
        r = decode_only(stock, image, cfg.image, b, BenchConfig(**{**asdict(cfg), "max_new_tokens": cfg.stock_decode_tokens}))
        r.mode = "stock-decode-only"
        s.rows.append(r)
        log.info("stock decode-only batch %d: %.1f ms/step", b, r.per_token_ms)
    find = {(r.mode, r.batch): r for r in s.rows}
    if best and ("stock", best.batch) in find:
        s.ratios["e2e_images_per_s_vs_stock"] = best.images_per_s / find[("stock", best.batch)].images_per_s
    if ("ours", 1) in find and ("stock", 1) in find:
        o, t = find[("ours", 1)], find[("stock", 1)]
        s.ratios["batch1_per_token_stock_vs_ours"] = t.per_token_ms / o.per_token_ms
        s.ratios["prefill_tokens_per_s_vs_stock"] = o.prefill_tokens_per_s / t.prefill_tokens_per_s
    for b in cfg.decode_batch_sizes[-1:]:
        if ("decode-only", b) in find and ("stock-decode-only", b) in find:
            s.ratios[f"batch{b}_per_token_stock_vs_ours"] = (find[("stock-decode-only", b)].per_token_ms
                                                             / find[("decode-only", b)].per_token_ms)
    del stock


def _floors(s: Summary, loaded: LoadedModel, image: Image.Image, cfg: BenchConfig, dtype, machine) -> None:
    """The machine's floors for this model and the ratios of our rows to them."""
    llm = loaded.model.llm.cfg
    inp = _inputs(loaded, image, cfg.image, 1, cfg.question)[0]
    n_prompt = len(inp.plan.ids)
    flops = (_vision_flops(loaded, inp) + roofline.prefill_flops(llm, n_prompt)
             + roofline.decode_flops(llm, n_prompt, cfg.max_new_tokens))
    rate = machine.matmul_gflops * 1e9
    wbytes = roofline.weight_bytes_per_step(loaded.model.llm)
    mid = n_prompt + cfg.max_new_tokens // 2                       # the average context of a decode step

    def step_floor_ms(b: int) -> float:
        return 1e3 * roofline.decode_step_floor_s(llm, wbytes, dtype, b, mid, machine)

    s.floors = {"flops_per_image": flops, "compute_floor_s_per_image": flops / rate,
                "prefill_floor_tokens_per_s": n_prompt / (roofline.prefill_flops(llm, n_prompt) / rate),
                "decode_weight_bytes_per_step": wbytes, "decode_step_floor_ms_batch1": step_floor_ms(1)}
    ours = [r for r in s.rows if r.mode == "ours"]
    if ours:
        best = max(ours, key=lambda r: r.images_per_s)
        s.ratios["best_batch"] = best.batch
        s.ratios["s_per_image_vs_compute_floor"] = (1 / best.images_per_s) / s.floors["compute_floor_s_per_image"]
        one = next((r for r in ours if r.batch == 1), None)
        if one:
            s.ratios["batch1_step_vs_bandwidth_floor"] = one.per_token_ms / step_floor_ms(1)
            s.ratios["prefill_tokens_per_s_batch1"] = one.prefill_tokens_per_s
            s.ratios["prefill_floor_vs_ours"] = s.floors["prefill_floor_tokens_per_s"] / one.prefill_tokens_per_s
    for r in s.rows:
        if r.mode == "decode-only":
            s.floors[f"decode_step_floor_ms_batch{r.batch}"] = step_floor_ms(r.batch)
            s.ratios[f"batch{r.batch}_step_vs_floor"] = r.per_token_ms / step_floor_ms(r.batch)
    dec = [r for r in s.rows if r.batch >= 2]
    if dec:
        s.ratios["best_decode_tokens_per_s"] = max(r.decode_tokens_per_s for r in dec)


def _write(s: Summary, cfg: BenchConfig) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{s.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(s.rows[0])))
        w.writeheader()
        for r in s.rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()})
    stem.with_suffix(".json").write_text(json.dumps(asdict(s), indent=2, default=str))
    log.info("results: %s.{csv,json}", stem)
