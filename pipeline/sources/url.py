"""URLs through fsspec (https, http, s3, gs, file, ...): timeouts, bounded retries, a byte cap.

fsspec and the protocol's own package (aiohttp for http(s), s3fs, gcsfs) are the `remote` extra;
without them a URL row fails with `download_error` saying what to install. Storage options (an
S3-compatible endpoint, credentials) come from FetchOptions.storage_options[protocol] or from
fsspec's own environment variables (e.g. FSSPEC_S3_ENDPOINT_URL).

Retried (with exponential backoff, at most `retries` more times): timeouts, connection errors,
HTTP 5xx / 408 / 429. Not retried: not found, permission denied, other 4xx, the byte cap.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.sources.locator import SourceError

log = logging.getLogger(__name__)

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _fs_kwargs(protocol: str, opts) -> dict[str, Any]:
    """Per-protocol timeouts (our retry loop is the only one), then the user's storage options."""
    kw: dict[str, Any] = {}
    t = opts.timeout_s
    if protocol in ("http", "https"):
        import aiohttp

        kw["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=t, sock_connect=t, sock_read=t)}
    elif protocol in ("s3", "s3a"):
        kw["config_kwargs"] = {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}}
    kw.update(opts.storage_options.get(protocol, {}))
    return kw


def _status_of(e: BaseException) -> int | None:
    return getattr(e, "status", None) if isinstance(getattr(e, "status", None), int) else None


def _transient(e: BaseException) -> bool:
    if isinstance(e, (SourceError, *_PERMANENT)):
        return False
    status = _status_of(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return True        # timeouts, resets, DNS: worth one more try


def _one_line(e: BaseException) -> str:
    if type(e).__name__ == "TooManyRedirects":
        return "too many redirects"
    status = _status_of(e)
    if status is not None and isinstance(getattr(e, "message", None), str):    # aiohttp's response errors
        return f"HTTP {status} {e.message}"
    return (" ".join(str(e).split()) or type(e).__name__)[:300]


def _read_capped(f, cap: int) -> bytes:
    size = getattr(f, "size", None)
    if isinstance(size, int) and size > cap:
        raise SourceError("too_large", f"{size} bytes, over the cap of {cap}")
    buf = bytearray()
    while True:
        chunk = f.read(min(1 << 20, cap + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            raise SourceError("too_large", f"more than the cap of {cap} bytes")


def read_url(url: str, opts) -> bytes:
    """The bytes at `url`, or SourceError('download_error' | 'too_large', one line)."""
    try:
        import fsspec
    except ImportError:
        raise SourceError("download_error", "URLs need fsspec: pip install 'vlm-caption-pipeline[remote]'") from None
    protocol = _protocol(url)
    for attempt in range(opts.retries + 1):
        try:
            fs, path = fsspec.core.url_to_fs(url, **_fs_kwargs(protocol, opts))
            # http(s): block_size=0 streams one GET (no ranges a server may ignore); a size given
            # skips fsspec's size probe (a HEAD, else another GET), which the stream does not use
            extra = {"block_size": 0, "size": 1} if protocol in ("http", "https") else {}
            with fs.open(path, "rb", **extra) as f:
                return _read_capped(f, opts.max_bytes)
        except SourceError:
            raise
        except ImportError as e:
            raise SourceError("download_error", f"{protocol}:// URLs need another package ({e}); "
                                                "pip install 'vlm-caption-pipeline[remote]'") from None
        except Exception as e:  # noqa: BLE001 - network stacks raise anything; a failure is a row
            cause = e
            if isinstance(e, FileNotFoundError) and e.__cause__ is not None:
                cause = e.__cause__        # fsspec's http maps every error status to FileNotFoundError
            if attempt < opts.retries and _transient(cause) and not isinstance(cause, FileNotFoundError):
                delay = opts.backoff_s * 2 ** attempt
                log.debug("%s: %s; retrying in %.1f s", url, _one_line(cause), delay)
                time.sleep(delay)
                continue
            tries = f" (after {attempt + 1} tries)" if attempt else ""
            what = "not found" if isinstance(cause, FileNotFoundError) else type(cause).__name__
            raise SourceError("download_error", f"{what}: {_one_line(cause)}{tries}: {url}") from None
    raise AssertionError("unreachable")
