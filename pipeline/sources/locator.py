"""Locators: where one image's bytes are, as a typed record and as one string.

The string form travels in `ImageRef.resolved` (a str), so the run records, the worker pool and
the ledger need no change: a local file is its absolute path (exactly what `resolved` held
before), a URL is the URL, and the other kinds are `KIND:` followed by URL-encoded fields.
An absolute POSIX path starts with '/', a URL with 'scheme://', so the forms cannot be confused.

    /data/img/0001.jpg                                          FileLocator
    https://example.org/a.jpg   s3://bucket/a.jpg               UrlLocator
    tar:file=%2Fdata%2F000001.tar&member=000001042.jpg&offset=1536&size=48211     TarLocator
    parquet:file=%2Fdata%2Fpart-0.parquet&column=jpg&row_group=0&row=41           ParquetLocator
    rejected:status=unsafe_member&message=...                                     RejectedLocator
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SourceError(Exception):
    """An image's bytes cannot be had; `status` is the row's short machine-readable cause."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FileLocator:
    path: str                      # absolute


@dataclass(frozen=True)
class UrlLocator:
    url: str                       # scheme://...


@dataclass(frozen=True)
class TarLocator:
    file: str                      # absolute path of the .tar shard
    member: str                    # member name (for messages)
    offset: int                    # byte offset of the member's data in the shard
    size: int                      # its size in bytes, from the header


@dataclass(frozen=True)
class ParquetLocator:
    file: str                      # absolute path of the Parquet file
    column: str                    # the image-bytes column
    row_group: int
    row: int                       # row within the row group


@dataclass(frozen=True)
class RejectedLocator:
    """A row the input listing refused (hostile tar member, unreadable shard): opening it fails."""

    status: str
    message: str


Locator = FileLocator | UrlLocator | TarLocator | ParquetLocator | RejectedLocator

_TAGGED = {"tar": TarLocator, "parquet": ParquetLocator, "rejected": RejectedLocator}
_INTS = {"offset", "size", "row_group", "row"}


def is_url(text: str) -> bool:
    return URL_RE.match(text) is not None


def encode(loc: Locator) -> str:
    if isinstance(loc, FileLocator):
        return loc.path
    if isinstance(loc, UrlLocator):
        return loc.url
    tag = next(t for t, cls in _TAGGED.items() if isinstance(loc, cls))
    return f"{tag}:{urlencode(vars(loc))}"


def parse(text: str) -> Locator:
    """The locator a string names; ValueError for a string that is none of the forms."""
    if text.startswith("/"):
        return FileLocator(text)
    if is_url(text):
        return UrlLocator(text)
    tag, sep, query = text.partition(":")
    cls = _TAGGED.get(tag)
    if not sep or cls is None:
        raise ValueError(f"not a locator (an absolute path, a URL or tar:/parquet:/rejected:): {text[:80]!r}")
    fields = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True, strict_parsing=True).items()}
    try:
        return cls(**{k: int(v) if k in _INTS else v for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed {tag} locator {text[:80]!r}: {e}") from None


def is_local(text: str) -> bool:
    """True for a plain path (what `resolved` held before locators): the preprocessing stage opens
    those itself (fd, fstat). Anything that is not a URL or a tagged locator counts as a path."""
    return not (is_url(text) or text.partition(":")[0] in _TAGGED)
