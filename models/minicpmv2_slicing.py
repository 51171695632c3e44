"""MiniCPM-V-2 image slicing ("LLaVA-UHD" style) and pixel normalisation, exactly as the reference.

Spec: ../shared/docs/minicpmv2.md §5.1-5.4. The arithmetic is deliberately the reference's own:
Python `round` (half to even), `int` truncation, float widths passed between helpers, a log-ratio
argmin where the first minimum wins, and PIL BICUBIC resizes that always start from the ORIGINAL
image (never from the thumbnail). Changing any of these moves slice sizes by 14 px on some inputs.

Output: a source thumbnail (area ~448², sides multiples of 14) plus, for images larger than 448²,
rows x cols slices of a refined resize (each ~448², sides multiples of 14), row-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.base import PixelInputs


@dataclass(frozen=True)
class SliceConfig:
    max_slices: int = 9          # config.max_slice_nums
    scale_resolution: int = 448  # config.scale_resolution: target side of a square of equal area
    patch: int = 14              # config.patch_size: every side is a multiple of it


def ensure_divide(length: float, patch: int) -> int:
    """Nearest multiple of `patch` (Python round: half to even), at least one patch."""
    return max(round(length / patch) * patch, patch)


def find_best_resize(size: tuple[float, float], s: int, patch: int, allow_upscale: bool = False) -> tuple[int, int]:
    """(w, h) scaled to area ~s² keeping the aspect ratio (only if larger, unless allow_upscale)."""
    w, h = size
    if w * h > s * s or allow_upscale:
        r = w / h
        h = int(s / math.sqrt(r))
        w = int(h * r)
    return ensure_divide(w, patch), ensure_divide(h, patch)


def refine_size(size: tuple[int, int], grid: tuple[int, int], s: int, patch: int) -> tuple[int, int]:
    """Size of the image that is cut into grid=(cols, rows) slices of ~s² each."""
    w, h = size
    cols, rows = grid
    rw, rh = ensure_divide(w, cols), ensure_divide(h, rows)
    # The per-slice size is computed from FLOAT widths (rw / cols), as the reference does.
    bw, bh = find_best_resize((rw / cols, rh / rows), s, patch, allow_upscale=True)
    return bw * cols, bh * rows


def best_grid(size: tuple[int, int], cfg: SliceConfig) -> tuple[int, int] | None:
    """(cols, rows) for an image, or None when it fits in one ~s² crop (then it is only resized)."""
    w, h = size
    multiple = min(math.ceil(w * h / (cfg.scale_resolution ** 2)), cfg.max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(w / h)
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > cfg.max_slices:
            continue
        for cols in range(1, n + 1):          # candidate order matters: the first minimum wins
            if n % cols:
                continue
            err = abs(log_ratio - math.log(cols / (n // cols)))
            if err < best_err:
                best, best_err = (cols, n // cols), err
    return best


@dataclass(frozen=True)
class SlicePlan:
    """Sizes only (no pixels): what slice_image will produce for an input size."""

    source: tuple[int, int]                  # (w, h) of the thumbnail
    grid: tuple[int, int] | None             # (cols, rows)
    refine: tuple[int, int] | None           # (w, h) of the image that is cut
    slice: tuple[int, int] | None            # (w, h) of each slice

    @property
    def n_images(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)


def plan_slices(size: tuple[int, int], cfg: SliceConfig = SliceConfig()) -> SlicePlan:
    w, h = size
    grid = best_grid(size, cfg)
    if grid is None:
        return SlicePlan(find_best_resize(size, cfg.scale_resolution, cfg.patch, allow_upscale=True), None, None, None)
    source = find_best_resize(size, cfg.scale_resolution, cfg.patch)
    ref = refine_size(size, grid, cfg.scale_resolution, cfg.patch)
    return SlicePlan(source, grid, ref, (int(ref[0] / grid[0]), int(ref[1] / grid[1])))


def slice_image(image: Image.Image, cfg: SliceConfig = SliceConfig()) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """[source, slice(0,0), slice(0,1), ...] (row-major) and the grid (cols, rows) or None."""
    plan = plan_slices(image.size, cfg)
    images = [image.resize(plan.source, Image.Resampling.BICUBIC)]
    if plan.grid is None:
        return images, None
    refined = image.resize(plan.refine, Image.Resampling.BICUBIC)   # from the original, not the thumbnail
    cw, ch = plan.slice
    for top in range(0, plan.refine[1], ch):
        for left in range(0, plan.refine[0], cw):
            images.append(refined.crop((left, top, left + cw, top + ch)))
    return images, plan.grid


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32 = (u8/255 - 0.5)/0.5 with fp32 ops (torchvision ToTensor + Normalize)."""
    u8 = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)   # [3, H, W]
    return (u8.to(torch.float32).div(255) - 0.5) / 0.5


class MiniCPMV2Processor:
    """PIL image -> PixelInputs(crops=(source, slices...), grid=(cols, rows) or None)."""

    def __init__(self, cfg: SliceConfig = SliceConfig()):
        self.cfg = cfg

    def __call__(self, image: Image.Image) -> PixelInputs:
        img = image if image.mode == "RGB" else image.convert("RGB")
        crops, grid = slice_image(img, self.cfg)
        return PixelInputs(crops=tuple(to_pixels(c) for c in crops), grid=grid)
