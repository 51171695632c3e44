"""Phase-1 stand-in for the caption flow's wiring to the index: the part of
pipeline.manifest.Manifest that jobs/caption.py uses, served from a ManifestIndex, so tests can
run the real `caption` job over tar shards, Parquet image bytes and URLs before phase 2 wires
the index in (jobs/caption.py is left untouched; tests patch its read_manifest)."""

from __future__ import annotations

from pathlib import Path

from pipeline.index import InputOptions, ManifestIndex, build_index, check_index, resolve_input
from pipeline.records import ImageRef


class IndexAsManifest:
    def __init__(self, index: ManifestIndex):
        self.idx = index
        self.digest = index.identity
        self.extra_types = index.extra_types

    def __len__(self) -> int:
        return len(self.idx)

    def refs(self, shard: int, shard_size: int) -> list[ImageRef]:
        assert shard_size == self.idx.shard_size
        return [ImageRef(**vars(r)) for r in self.idx.refs(shard)]

    def ref(self, i: int, shard: int) -> ImageRef:
        return self.refs(shard, self.idx.shard_size)[i - shard * self.idx.shard_size]


def indexed_reader(index_dir: Path, shard_size: int, options: InputOptions = InputOptions(), builds: list | None = None):
    """A read_manifest replacement: build the index once, reuse it while check_index says it is current."""

    def read(given: str) -> IndexAsManifest:
        spec = resolve_input(given, options)
        path = index_dir / "index.parquet"
        if not path.exists() or check_index(path, spec, shard_size) is not None:
            build_index(spec, path, shard_size)
            if builds is not None:
                builds.append(given)
        return IndexAsManifest(ManifestIndex(path))

    return read
