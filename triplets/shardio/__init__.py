"""The shard-I/O layer: every name a build writes, the one shard resolver, the one tar writer and streaming reader,
and the exactly-once commit protocol on local disk and object stores.

==================  ==================================================================================
module              owns
==================  ==================================================================================
``names``           shard / marker / errors / plan names; which files the project wrote; member key split
``resolve``         shard specs (folders, globs, brace patterns, URLs, ``pipe:``) → shard URLs
``tario``           the reproducible ``TarWriter``; :class:`TarStream`, the one streaming tar → sample reader
``output``          :class:`BuildOutput`: staging, commit (tar → errors → marker), recovery, locks, probes
``records``         the typed records of a build: shard stats and marker, error rows, the manifest's wids header
==================  ==================================================================================

Locations (local paths and fsspec URLs) come from :mod:`cnc.base.location`.
"""

from triplets.shardio.names import split_member
from triplets.shardio.output import BuildOutput, OutputNotSharedError, check_probe, file_sha256
from triplets.shardio.records import (
    ErrorRecord,
    FailureTotals,
    ManifestHeader,
    ShardMarker,
    ShardStats,
    load_marker,
    read_manifest,
    write_manifest,
)
from triplets.shardio.resolve import ShardSpecError, resolve_shards
from triplets.shardio.tario import (
    FIXED_MTIME,
    ShardReadError,
    TarStream,
    encode_tar,
    iter_raw_samples,
    iter_samples,
    open_stream,
    open_tar_writer,
    tar_keys,
    write_shard,
)

__all__ = [
    "FIXED_MTIME", "BuildOutput", "ErrorRecord", "FailureTotals", "ManifestHeader", "OutputNotSharedError",
    "ShardMarker", "ShardReadError", "ShardSpecError", "ShardStats", "TarStream", "check_probe", "encode_tar",
    "file_sha256", "iter_raw_samples", "iter_samples", "load_marker", "open_stream", "open_tar_writer",
    "read_manifest", "resolve_shards", "split_member", "tar_keys", "write_manifest", "write_shard",
]
