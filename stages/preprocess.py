"""Preprocess stage: ImageRef -> ImageInputs (pixels + prompt plan) or a Failed record.

Images are untrusted. Before any pixel is decoded the file must be a regular file in an allowed
format (no EPS: Pillow would run Ghostscript on it) whose header size is within the pixel cap and
aspect-ratio cap; then it is decoded (first frame only), EXIF-rotated, converted to 8-bit RGB,
and handed to the model family's own processor and prompt builder. Every failure becomes a
Failed record with a short status:

    missing        no such file
    unreadable     the file exists but cannot be read (permissions, I/O error)
    not_a_file     a folder, FIFO, device...
    not_an_image   empty, or not an allowed image format
    truncated      the image data ends early
    corrupt        the decoder rejected the data
    too_large      over the pixel cap (decompression bombs included), or a JPEG of more
                   progressive scans than any encoder writes; checked before decoding
    extreme_aspect longer side over max_aspect_ratio x the shorter (e.g. 1x20000 strips)
    timeout        opening + preprocessing took longer than max_seconds (stages/time_limit.py)
    preprocess_error  the model's processor or prompt builder failed

open_untrusted() is the safety part alone (the CLIP judge opens its images through it too);
open_image() adds the captioner's EXIF rotation and RGB conversion.
Images that are not local files (a WebDataset tar member, a Parquet image cell, a URL) arrive as
pipeline.sources locators; their bytes are read under FetchOptions (byte cap, timeouts, bounded
retries), which adds `download_error` (URLs) and `unsafe_member` (tar) to the statuses above.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import time
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import FetchOptions, ImageLimits
from pipeline.records import Failed, ImageRef
from pipeline.sources.fetch import read_bytes
from pipeline.sources.local import file_error, open_error
from pipeline.sources.locator import SourceError, is_local
from stages.jpeg_scans import MAX_SCANS, count_scans
from stages.records import ImageInputs
from stages.time_limit import TimeLimitExceeded, time_limit

log = logging.getLogger(__name__)

# Bumped whenever this stage's output can change for the same input: it is part of the run
# fingerprint, so a run dir never mixes rows from before and after such a change.
VERSION = 1

# Formats cameras, phones and the web produce (JPEG includes camera MPO files). Deliberately no
# EPS/PS (Pillow would execute Ghostscript), nor exotic formats whose decoders see little hardening.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def _formats() -> list[str]:
    Image.init()
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]    # AVIF is absent from some Pillow builds
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = (255, 255, 255)   # transparent pixels are shown on white, as on a web page


class ImageError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit data is scaled (Pillow's convert would clip it to white); transparency
    is composited on white (convert('RGB') would expose whatever colours hide under alpha 0)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img)
        if img.mode == "F":
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        elif img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a8 = (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        else:
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def pillow_guard(limits: ImageLimits) -> None:
    """Set Pillow's own decompression-bomb guard (process-wide) to the user's cap. Pillow refuses
    images over twice its limit inside Image.open, before our exact check sees the size, so a
    limit below the cap (Pillow's default is 89.5 Mpx) would refuse images the user allowed."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels


def _bomb_message(e: Exception, limits: ImageLimits) -> str:
    """Pillow's refusal quotes its own limit (twice MAX_IMAGE_PIXELS); say the user's cap."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{m.group(1)} pixels" if m else "the image's size"
    return f"{size}, over the cap of {limits.max_pixels} (--max-image-pixels)"


def open_untrusted(path: str, limits: ImageLimits, fetch: FetchOptions = FetchOptions()) -> Image.Image:
    """Decode an untrusted image as stored (first frame, mode and orientation untouched) within the
    limits, or raise ImageError. The one opener of the captioner and the judge. `path` is a local
    file or any pipeline.sources locator (tar member, Parquet cell, URL): its bytes are read under
    the fetch limits."""
    if not is_local(path):
        try:
            data = read_bytes(path, fetch)
        except SourceError as e:
            raise ImageError(e.status, str(e)) from None
        return decode_image(io.BytesIO(data), path, limits)
    try:
        # O_NONBLOCK: opening a FIFO must not block; the type is then checked on the open file
        # itself (fstat), so a path swapped after a check cannot slip a FIFO or device through
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:   # ValueError: NUL in the path
        err = open_error(e, path)
        raise ImageError(err.status, str(err)) from None
    err = file_error(os.fstat(fd))
    if err is not None:
        os.close(fd)
        raise ImageError(err.status, str(err))
    return decode_image(os.fdopen(fd, "rb"), path, limits)


def decode_image(f: BinaryIO, path: str, limits: ImageLimits) -> Image.Image:
    """Decode an open untrusted image (closed afterwards) as stored, within the limits, or raise ImageError."""
    with f, warnings.catch_warnings():
        # Our size check below is exact; Pillow's warning between its limit and twice it is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f, formats=_formats())
        except UnidentifiedImageError:
            raise ImageError("not_an_image", "not a supported image (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF)") from None
        except Image.DecompressionBombError as e:
            raise ImageError("too_large", _bomb_message(e, limits)) from None
        except OSError as e:
            raise ImageError("unreadable" if isinstance(e, PermissionError) else "corrupt", f"{e}") from None
        except Exception as e:  # noqa: BLE001 - a hostile header may raise anything
            raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageError("corrupt", f"image size {w}x{h}")
        if w * h > limits.max_pixels:
            raise ImageError("too_large", f"{w}x{h} = {w * h} pixels, over the cap of {limits.max_pixels} "
                                          "(--max-image-pixels)")
        if max(w, h) > limits.max_aspect_ratio * min(w, h):
            raise ImageError("extreme_aspect", f"{w}x{h}: aspect ratio over {limits.max_aspect_ratio:g}")
        if img.format in ("JPEG", "MPO"):
            scans = count_scans(f)
            if scans > MAX_SCANS:
                raise ImageError("too_large", f"a JPEG of over {MAX_SCANS} scans (decoding passes over the image); "
                                              "real photos have about 10")
        try:
            img.seek(0)                  # animations: the first frame
            img.load()
        except (Image.DecompressionBombError, MemoryError) as e:
            raise ImageError("too_large", f"{type(e).__name__}: {e}") from None
        except OSError as e:
            status = "truncated" if "truncat" in str(e).lower() else "corrupt"
            raise ImageError(status, str(e)) from None
        except Exception as e:  # noqa: BLE001 - decoder errors on hostile data take many shapes
            raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None
    return img


def open_image(path: str, limits: ImageLimits, fetch: FetchOptions = FetchOptions()) -> Image.Image:
    """The captioner's view of an untrusted image: open_untrusted, EXIF-rotated, 8-bit RGB."""
    img = open_untrusted(path, limits, fetch)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block should not lose a good image
        log.debug("%s: EXIF orientation ignored (%s)", path, e)
    try:
        return _to_rgb(img)
    except Exception as e:  # noqa: BLE001
        raise ImageError("corrupt", f"cannot convert {img.mode} to RGB: {e}") from None


def bound_side(img: Image.Image, limits: ImageLimits) -> Image.Image:
    """Shrink (keeping the aspect ratio) so the longer side is at most sqrt(max_pixels).

    Processors may pad to a square before resizing (Bunny does, like its reference), which
    allocates longer_side^2 pixels: a 50:1 panorama under the pixel cap would still need a
    canvas of gigabytes. Models see 384-448 px crops, so only images over ~10k px per side are
    touched, and for them the result differs from the reference's only by resampling detail.
    """
    side = math.isqrt(limits.max_pixels)
    w, h = img.size
    if max(w, h) <= side:
        return img
    return ImageOps.contain(img, (side, side), Image.Resampling.BICUBIC)


class Preprocessor:
    """Cheap to build and picklable (paths and numbers only); setup() loads the tokenizer and
    the processor, so each worker process builds its own."""

    def __init__(self, model_dir: str, question: str, template: str | None, limits: ImageLimits,
                 fetch: FetchOptions = FetchOptions()):
        self.model_dir = str(model_dir)
        self.question = question
        self.template = template
        self.limits = limits
        self.fetch = fetch            # limits for non-local images (tar, Parquet, URL)
        self.processor = None
        self.prompts = None

    def setup(self) -> "Preprocessor":
        """Load the frontend (checking the checkpoint) and make sure the question fits the
        family's longest prompt: a question that cannot fit would fail every image, so it is a
        ValueError here, before a run starts, not a per-image error row."""
        from models.registry import load_frontend

        pillow_guard(self.limits)                          # in every worker process
        self.processor, self.prompts = load_frontend(self.model_dir, self.template)
        self.prompts.longest_prompt(self.question)
        return self

    def __call__(self, ref: ImageRef) -> ImageInputs | Failed:
        if self.processor is None:
            self.setup()
        t0 = time.perf_counter()
        try:
            with time_limit(self.limits.max_seconds):
                return self._process(ref, t0)
        except TimeLimitExceeded:
            return Failed(ref, "preprocess", "timeout", f"preprocessing took over {self.limits.max_seconds:g} s "
                                                        "(--max-image-seconds)")

    def _process(self, ref: ImageRef, t0: float) -> ImageInputs | Failed:
        try:
            img = open_image(ref.resolved, self.limits, self.fetch)
        except ImageError as e:
            return Failed(ref, "preprocess", e.status, str(e))
        try:
            pixels = self.processor(bound_side(img, self.limits))
            plan = self.prompts.build(self.question, pixels)
        except Exception as e:  # noqa: BLE001 - a per-image failure is a row
            return Failed(ref, "preprocess", "preprocess_error", f"{type(e).__name__}: {e}")
        return ImageInputs(ref=ref, pixels=pixels, plan=plan, width=img.size[0], height=img.size[1],
                           seconds=time.perf_counter() - t0)


