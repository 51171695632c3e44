"""What makes two runs' captions comparable: the run fingerprint.

It covers everything that can change a row: the model files' identity (names, sizes and SHA-256
of every byte — not their folder, so a checkpoint copied to another node keeps its identity;
config.json holds the model's name), the model family, the question and template, the decoding
settings (max new tokens included), the compute dtype, the image limits (pixels, aspect and the
byte cap: they decide which rows become too_large / extreme_aspect) and the code version of each stage (bumped when a stage's
output can change). Things that do not change a row (device index, threads, batching, shard
size) are not in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.digests import file_sha256


def file_identity(path: Path) -> str:
    return f"{path.stat().st_size}:sha256:{file_sha256(path)[:32]}"


def model_identity(model_dir: str | os.PathLike) -> dict[str, str]:
    """{relative file name: identity} for every regular file of the checkpoint folder."""
    root = Path(model_dir)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath, name)
            if p.is_file():
                out[p.relative_to(root).as_posix()] = file_identity(p)
    return out


@dataclass(frozen=True)
class Fingerprint:
    parts: dict[str, Any]

    @property
    def digest(self) -> str:
        blob = json.dumps(self.parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def make(model_files: dict[str, str], family: str, question: str, template: str | None,
         preset: str | None, decode: dict[str, Any], dtype: str, limits: dict[str, Any],
         code: dict[str, int]) -> Fingerprint:
    return Fingerprint({"model_files": model_files, "family": family,
                        "question": question, "template": template, "prompt_preset": preset,
                        "decode": decode, "dtype": dtype, "limits": limits, "code": code})


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."


def explain(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """One phrase naming the first difference between two fingerprints' parts, or None if equal."""
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if name == "model_files" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            return f"the model files differ ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})"
        if name == "code" and isinstance(a, dict) and isinstance(b, dict):
            stage = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            return (f"it was made by another version of the {stage} stage (version {a.get(stage)}, now "
                    f"{b.get(stage)}), whose output can differ")
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    return f"{name}.{k} was {_short(a.get(k))}, now {_short(b.get(k))}"
        return f"{name} was {_short(a)}, now {_short(b)}"
    return None


def limits_identity(cfg: RunConfig) -> dict[str, Any]:
    """The limits that decide which rows a run has (too_large, extreme_aspect): pixels, aspect and
    the byte cap of non-local images. Left out: the preprocessing time limit and the fetch timeouts
    and retries, since whether an image times out depends on the machine and network, not on what
    the run asked for."""
    return {"max_pixels": cfg.limits.max_pixels, "max_aspect_ratio": cfg.limits.max_aspect_ratio,
            "max_image_bytes": cfg.fetch.max_bytes}
