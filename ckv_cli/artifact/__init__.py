"""Artifacts: the format (`format`), the streaming writer (`writer`), the reader of one file (`reader`) and of a
sharded set (`sharded`)."""
from ckv_cli.artifact.format import FORMAT, FORMAT_VERSION, SHARD_FORMAT
from ckv_cli.artifact.reader import Artifact
from ckv_cli.artifact.sharded import ShardedArtifact, open_artifact, verify_path
from ckv_cli.artifact.writer import ArtifactWriter, write_artifact

__all__ = ["FORMAT", "FORMAT_VERSION", "SHARD_FORMAT", "Artifact", "ArtifactWriter", "ShardedArtifact", "open_artifact",
           "verify_path", "write_artifact"]
