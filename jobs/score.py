"""CLIP-score judge: the MindIE precision scorer's semantics, batched, on our runs or any {image: caption} JSON.

Per image (shared/docs/minicpmv2.md §7.7, bunny.md §9.7): raw cosine of
`encode_image(preprocess(Image.open(path)))` and `encode_text(tokenizer([caption]))`, both
L2-normalised in fp32; the run's number is the unweighted mean over the images that could be
scored. We also report 100·max(cos, 0), the torchmetrics CLIPScore scale. The open_clip tokenizer
cuts a caption at its context length (77 for ViT-H-14) keeping the end token, so a long "essay"
caption is judged on its first ~75 BPE tokens; each row says whether that happened.

Weights are read by us, never by open_clip's `pretrained=` path: safetensors, or
`torch.load(weights_only=True)`, because open_clip falls back to a full unpickle on old torch.

Image resolution follows the examples' keys (full paths for MiniCPM-V-2 NPU, file names for the
GPU scripts): an existing absolute path, then `--images/KEY`, then the only file with that base
name anywhere under `--images`. Only files whose real path (symlinks and `..` resolved) is under
`--images` are candidates: a captions file is untrusted input, and its keys must not make the
judge open, or the HTML report embed, any other readable image. Images are opened by the
captioner's own safe opener (stages/preprocess.open_untrusted: format allowlist, no EPS, pixel,
aspect and progressive-scan caps). Failures are rows with a status, not exceptions.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipeline.atomic import write_atomic
from pipeline.config import ImageLimits
from pipeline.device import resolve_device, resolve_dtype
from stages.preprocess import ImageError, open_untrusted, pillow_guard

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-H-14"   # with laion2b_s32b_b79k weights: the examples' judge
_MAX_LOGGED = 20                  # failed rows named in the log; the rest are counted

# Row statuses. Only OK rows count towards the means.
OK = "ok"
MISSING = "missing"          # no file for this key under --images
AMBIGUOUS = "ambiguous"      # the base name matches several files; we refuse to guess
UNREADABLE = "unreadable"    # the file exists but the safe opener refused it or the transform failed
NO_CAPTION = "no_caption"    # the caption is not a string (null in the JSON, a failed row)
OUTSIDE = "outside_images"   # the key names a file, but its real path is not under --images


class ScoreError(RuntimeError):
    """The judge cannot run at all (bad input file, weights, model name); the message says why."""


@dataclass(frozen=True)
class ScoreConfig:
    images: Path
    clip_weights: Path
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_config: Path | None = None     # an open_clip model config JSON to register (custom/small CLIPs)
    device: str = "auto"
    dtype: str = "float32"              # the examples' scorer runs fp32; "auto" = device policy
    batch_size: int = 32
    workers: int = 2                    # threads opening and preprocessing images
    limits: ImageLimits = ImageLimits()  # the captioner's caps, applied by the same opener

    @property
    def model_name(self) -> str:
        # A config file registers under its file stem; let it name the model unless one was given.
        if self.clip_config is not None and self.clip_model == DEFAULT_CLIP_MODEL:
            return Path(self.clip_config).stem
        return self.clip_model


@dataclass(frozen=True)
class ScoreRow:
    key: str
    resolved_path: str | None
    caption: str | None
    status: str
    cosine: float | None
    clip_score: float | None            # 100 * max(cosine, 0)
    n_tokens: int | None                # sot + BPE + eot before truncation
    truncated: bool | None              # n_tokens > the tokenizer's context length
    error: str | None = None


SCHEMA = pa.schema([
    ("key", pa.string()), ("resolved_path", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("cosine", pa.float64()), ("clip_score", pa.float64()), ("n_tokens", pa.int32()),
    ("truncated", pa.bool_()), ("error", pa.string()),
])
assert SCHEMA.names == list(ScoreRow.__dataclass_fields__), "SCHEMA and ScoreRow drifted apart"


@dataclass(frozen=True)
class Summary:
    n_total: int
    n_scored: int
    n_truncated: int                    # among the scored rows
    mean_cosine: float
    median_cosine: float
    mean_clip_score: float
    median_clip_score: float
    statuses: dict[str, int]

    def lines(self) -> list[str]:
        failed = {k: v for k, v in sorted(self.statuses.items()) if k != OK}
        return [
            f"mean cosine {self.mean_cosine:.4f}  median {self.median_cosine:.4f}  "
            f"(CLIPScore scale: mean {self.mean_clip_score:.2f}  median {self.median_clip_score:.2f})",
            f"scored {self.n_scored} of {self.n_total} images"
            + (f"; not scored: {', '.join(f'{k} {v}' for k, v in failed.items())}" if failed else ""),
            f"truncated captions: {self.n_truncated} of {self.n_scored} (judged on their first tokens only)",
        ]


# -- inputs ----------------------------------------------------------------------------------------

def read_captions(source: str | Path) -> dict[str, str | None]:
    """{image key: caption} from a run dir (captions.json, else the shards' ok rows) or a JSON/Parquet file."""
    source = Path(source)
    if source.is_dir():
        merged = source / "captions.json"
        if merged.is_file():
            return _read_json(merged)
        shards = sorted((source / "shards").glob("*.parquet"))
        if not shards:
            raise ScoreError(f"{source}: neither captions.json nor shards/*.parquet; is this a run directory?")
        out: dict[str, str | None] = {}
        for shard in shards:
            out.update(_read_parquet(shard))
        return dict(sorted(out.items()))
    if not source.is_file():
        raise ScoreError(f"{source}: no such file or run directory")
    if source.suffix == ".parquet":
        return _read_parquet(source)
    return _read_json(source)


def _read_json(path: Path) -> dict[str, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoreError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object {{image: caption}}, got {type(data).__name__}")
    return {str(k): (v if isinstance(v, str) else None) for k, v in data.items()}


def _read_parquet(path: Path) -> dict[str, str | None]:
    """Rows with status ok; keyed by `path` (as in captions.json), else `key`."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ScoreError(f"{path}: unreadable Parquet ({e})") from e
    cols = set(table.column_names)
    key_col = "path" if "path" in cols else "key"
    if key_col not in cols or "caption" not in cols:
        raise ScoreError(f"{path}: needs a path (or key) and a caption column, has {sorted(cols)}")
    keys, caps = table.column(key_col).to_pylist(), table.column("caption").to_pylist()
    status = table.column("status").to_pylist() if "status" in cols else [OK] * len(keys)
    return {str(k): c for k, c, s in zip(keys, caps, status) if s == OK}


class ImageIndex:
    """Resolves caption keys to files under one images folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ScoreError(f"--images {root}: not a directory")
        self._real_root = os.path.realpath(self.root)
        self._by_name: dict[str, list[str]] | None = None   # built on first need: one os.walk

    def _inside(self, real: str) -> bool:
        return os.path.commonpath([self._real_root, real]) == self._real_root

    def _names(self) -> dict[str, list[str]]:
        if self._by_name is None:
            by_name: dict[str, list[str]] = defaultdict(list)
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    by_name[f].append(os.path.join(dirpath, f))
            self._by_name = dict(by_name)
        return self._by_name

    def resolve(self, key: str) -> tuple[str | None, str, str | None]:
        """(real path or None, status, error). Real paths, so that two runs keyed differently (a full
        path through a symlinked folder, a bare file name) still pair up on the same file, and so
        that containment is checked on what would really be opened."""
        outside = False
        for candidate in ((key,) if os.path.isabs(key) else (os.path.join(self.root, key),)):
            if os.path.isfile(candidate):
                real = os.path.realpath(candidate)
                if self._inside(real):
                    return real, OK, None
                outside = True
        name = os.path.basename(key)
        reals = {os.path.realpath(p) for p in self._names().get(name, [])}     # one file may have two names
        hits = sorted(r for r in reals if self._inside(r))
        outside = outside or len(hits) < len(reals)                           # a symlink out of the folder
        if len(hits) == 1:
            return hits[0], OK, None
        if hits:
            shown = ", ".join(hits[:3]) + (" ..." if len(hits) > 3 else "")
            return None, AMBIGUOUS, f"{len(hits)} files named {name!r} under {self.root}: {shown}"
        if outside:
            return None, OUTSIDE, f"resolves outside --images {self.root}; only files under it are opened"
        return None, MISSING, f"no file named {name!r} under {self.root}"


# -- the judge -------------------------------------------------------------------------------------

def load_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load(weights_only=True) which refuses arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"--clip-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            try:   # mmap avoids holding a second full copy of a 4 GB checkpoint
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):     # only the legacy (non-zip) format cannot be mmapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read weights is one clear error
        raise ScoreError(f"--clip-weights {path}: cannot load tensors ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):   # training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ScoreError(f"--clip-weights {path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in sd):    # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


class ClipJudge:
    """An open_clip model + its eval transform + tokenizer, on one device and dtype."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, dtype: torch.dtype, name: str,
                 limits: ImageLimits = ImageLimits()):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.dtype, self.name, self.limits = device, dtype, name, limits
        self.context_length = int(getattr(tokenizer, "context_length", None) or model.context_length)
        pillow_guard(limits)

    @classmethod
    def load(cls, cfg: ScoreConfig) -> "ClipJudge":
        try:
            import open_clip
        except ImportError as e:
            raise ScoreError("the judge needs open_clip: pip install 'vlm-caption-pipeline[score]'") from e
        name = cfg.model_name
        if ":" in name:   # hf-hub: / local-dir: would fetch or read weights outside --clip-weights
            raise ScoreError(f"--clip-model {name!r}: give an open_clip architecture name (e.g. ViT-H-14), "
                             "weights come only from --clip-weights")
        if cfg.clip_config is not None:
            if not Path(cfg.clip_config).is_file():
                raise ScoreError(f"--clip-config {cfg.clip_config}: no such file")
            open_clip.add_model_config(Path(cfg.clip_config))
        if name not in open_clip.list_models():
            raise ScoreError(f"--clip-model {name!r}: unknown open_clip architecture "
                             "(see open_clip.list_models(), or pass --clip-config FILE.json)")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        sd = load_clip_state_dict(cfg.clip_weights)
        # pretrained=None: open_clip must neither download nor unpickle anything itself. Its
        # "initialized randomly" warning is true only until the load below, so it is dropped.
        # No base tower weights either (HF text towers): open_clip 3 calls it pretrained_text, 2.x pretrained_hf.
        params = inspect.signature(open_clip.create_model_and_transforms).parameters
        no_base = {"pretrained_text": False} if "pretrained_text" in params else {"pretrained_hf": False}
        with _quiet_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, pretrained_image=False, **no_base)
        ls = getattr(model, "logit_scale", None)
        if ls is not None and "logit_scale" in sd and sd["logit_scale"].ndim != ls.ndim:
            sd["logit_scale"] = sd["logit_scale"].reshape(ls.shape)   # scalar vs [1] across versions
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise ScoreError(f"--clip-weights {cfg.clip_weights} do not fit --clip-model {name}: "
                             f"{str(e).splitlines()[0]} ...") from e
        model = model.to(device=device, dtype=dtype).eval()
        log.info("judge: open_clip %s from %s on %s, %s", name, Path(cfg.clip_weights).name, device, dtype)
        return cls(model, preprocess, open_clip.get_tokenizer(name), device, dtype, name, cfg.limits)

    def count_tokens(self, text: str) -> int | None:
        """Tokens before truncation (sot + BPE + eot for open_clip's SimpleTokenizer); None if unknown."""
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id") and getattr(tok, "reduction_fn", None) is None:
            return len(tok.encode(text)) + 2
        inner, clean = getattr(tok, "tokenizer", None), getattr(tok, "clean_fn", None)
        if inner is not None and clean is not None and not getattr(tok, "tokenizer_mode", ""):
            return len(inner(clean(text)).input_ids)   # open_clip's HFTokenizer, standard mode
        return None

    def load_image(self, path: str) -> torch.Tensor:
        # No EXIF transpose: the examples' scorer opens the file as is (the transform converts to RGB).
        return self.preprocess(open_untrusted(path, self.limits))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(pixels.to(self.device, self.dtype))
        return F.normalize(feats.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions)).to(self.device)
        feats = self.model.encode_text(ids)
        return F.normalize(feats.float(), dim=-1).cpu()


class _quiet_random_init_warning(logging.Filter):
    """Drop open_clip's "No pretrained weights loaded" root-logger warning while installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


# -- scoring ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Item:
    source: int
    key: str
    path: str
    caption: str


def score_sources(sources: Sequence[dict[str, str | None]], index: ImageIndex, judge: ClipJudge,
                  batch_size: int = 32, workers: int = 2) -> list[list[ScoreRow]]:
    """Score several caption sets over the same images; each image is opened and encoded once.

    Returns one list of rows per source, in that source's key order.
    """
    rows: list[dict[str, ScoreRow]] = [{} for _ in sources]
    items: dict[str, list[_Item]] = defaultdict(list)      # image path -> captions of it to score
    for s, captions in enumerate(sources):
        for key, caption in captions.items():
            path, status, error = index.resolve(key)
            if status == OK and not isinstance(caption, str):
                status, error = NO_CAPTION, "caption is not a string"
            if status != OK:
                rows[s][key] = ScoreRow(key, path, caption if isinstance(caption, str) else None, status,
                                        None, None, None, None, error)
                continue
            items[path].append(_Item(s, key, path, caption))

    paths = sorted(items)
    n_batches = math.ceil(len(paths) / batch_size) if paths else 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for b in range(n_batches):
            batch_paths = paths[b * batch_size:(b + 1) * batch_size]
            loaded = list(pool.map(_try_load, [judge] * len(batch_paths), batch_paths))
            good = [(p, t) for p, (t, _) in zip(batch_paths, loaded) if t is not None]
            for p, (t, err) in zip(batch_paths, loaded):
                if t is None:
                    for it in items[p]:
                        rows[it.source][it.key] = ScoreRow(it.key, p, it.caption, UNREADABLE,
                                                           None, None, None, None, err)
            if not good:
                continue
            img = judge.encode_images(torch.stack([t for _, t in good]))
            row_of = {p: i for i, (p, _) in enumerate(good)}
            todo = [it for p, _ in good for it in items[p]]
            for c in range(0, len(todo), batch_size):
                chunk = todo[c:c + batch_size]
                txt = judge.encode_texts([it.caption for it in chunk])
                cos = (img[[row_of[it.path] for it in chunk]] * txt).sum(-1).tolist()
                for it, cs in zip(chunk, cos):
                    n = judge.count_tokens(it.caption)
                    rows[it.source][it.key] = ScoreRow(
                        it.key, it.path, it.caption, OK, cs, 100.0 * max(cs, 0.0), n,
                        None if n is None else n > judge.context_length)
            if (b + 1) % max(1, n_batches // 10) == 0 or b + 1 == n_batches:   # ~10 progress lines a run
                log.info("scored batch %d/%d (%d images)", b + 1, n_batches, len(batch_paths))
    return [[r[k] for k in captions] for r, captions in zip(rows, sources)]


def _try_load(judge: ClipJudge, path: str) -> tuple[torch.Tensor | None, str | None]:
    try:
        return judge.load_image(path), None
    except ImageError as e:
        return None, f"{e.status}: {e}"
    except Exception as e:  # noqa: BLE001 - the transform may raise many types
        return None, f"{type(e).__name__}: {e}"


def summarize(rows: Iterable[ScoreRow]) -> Summary:
    rows = list(rows)
    ok = [r for r in rows if r.status == OK]
    statuses: dict[str, int] = defaultdict(int)
    for r in rows:
        statuses[r.status] += 1
    cos = np.array([r.cosine for r in ok], dtype=np.float64)
    cs = np.array([r.clip_score for r in ok], dtype=np.float64)
    nan = float("nan")
    return Summary(
        n_total=len(rows), n_scored=len(ok), n_truncated=sum(bool(r.truncated) for r in ok),
        mean_cosine=float(cos.mean()) if len(ok) else nan, median_cosine=float(np.median(cos)) if len(ok) else nan,
        mean_clip_score=float(cs.mean()) if len(ok) else nan,
        median_clip_score=float(np.median(cs)) if len(ok) else nan, statuses=dict(statuses))


def write_scores(rows: Sequence[ScoreRow], path: str | Path, meta: dict[str, str]) -> Path:
    """One row per key; `meta` (judge model, weights file, source) goes into the Parquet metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
    table = table.replace_schema_metadata({f"score.{k}": str(v) for k, v in meta.items()})
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))    # readers never see a half-written file
    return path


def default_output(source: str | Path) -> Path:
    """RUN_DIR/scores.parquet for a run dir, else NAME.scores.parquet next to the captions file."""
    source = Path(source)
    return source / "scores.parquet" if source.is_dir() else source.with_name(source.stem + ".scores.parquet")


def judge_meta(cfg: ScoreConfig, judge: ClipJudge, source: str | Path) -> dict[str, str]:
    return {"clip_model": judge.name, "clip_weights": Path(cfg.clip_weights).name, "dtype": str(judge.dtype),
            "device": str(judge.device), "context_length": str(judge.context_length), "source": str(source)}


def run_score(cfg: ScoreConfig, source: str | Path, out: str | Path | None = None) -> tuple[Summary, Path]:
    """The `pipeline score` job: read captions, score them, write the per-image Parquet."""
    captions = read_captions(source)
    if not captions:
        raise ScoreError(f"{source}: no captions to score")
    index = ImageIndex(cfg.images)
    judge = ClipJudge.load(cfg)
    (rows,) = score_sources([captions], index, judge, cfg.batch_size, cfg.workers)
    failed = [r for r in rows if r.status != OK]
    for r in failed[:_MAX_LOGGED]:
        log.warning("not scored: %s (%s: %s)", r.key, r.status, r.error)
    if len(failed) > _MAX_LOGGED:
        log.warning("... and %d more not scored; the Parquet has every row's status", len(failed) - _MAX_LOGGED)
    path = write_scores(rows, out or default_output(source), judge_meta(cfg, judge, source))
    return summarize(rows), path
