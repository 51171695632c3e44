"""Where the bytes of an image come from.

Every image reference carries a *locator*: a local path, a member of a WebDataset tar shard, a
cell of a Parquet image-bytes column, a URL (fsspec: https, s3, gs, file), or a row that was
rejected while the input was listed (a hostile tar member, a missing shard). `fetch.read_bytes`
opens any of them under the same limits (byte cap, timeouts, bounded retries) and turns every
problem into a `SourceError(status, message)`, which the preprocessing stage records as a row.

Listing (which images an input holds) is in `tar.py`, `parquet_bytes.py` and `inputs.py`;
reading one image's bytes is in `fetch.py` (with `url.py`). No module here imports torch, models,
stages or jobs: the manifest index and the preprocessing workers both use them.
"""
