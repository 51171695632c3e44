"""The manifest index: every input listed once, in one streamed pass, as shard-aligned Parquet.

    spec = resolve_input("data/list.txt" | "shards/{000000..000999}.tar" | "images.parquet", InputOptions())
    info = build_index(spec, RUN_DIR / "index.parquet", shard_size)      # once per run
    reason = check_index(RUN_DIR / "index.parquet", spec, shard_size)    # every later task: None = current
    idx = ManifestIndex(RUN_DIR / "index.parquet")
    refs = idx.refs(shard)                                               # only when a shard is claimed

Modules: inputs (what was given), parse (streamed readers per manifest format), build (the pass,
the hashed duplicate check, the shard-aligned writer), read (ManifestIndex, check_index), identity
(raw-bytes digests), formats (shared with pipeline/manifest.py). Nothing here imports torch.
"""

from pipeline.index.build import IndexInfo, build_index
from pipeline.index.inputs import InputOptions, InputSpec, resolve_input
from pipeline.index.read import ManifestIndex, check_index, current_parts

__all__ = ["IndexInfo", "build_index", "InputOptions", "InputSpec", "resolve_input", "ManifestIndex", "check_index",
           "current_parts"]
