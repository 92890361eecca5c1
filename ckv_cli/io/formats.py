"""The names ckv writes into the `format` metadata of its files (what a reader checks first)."""

CHECKPOINT = "ckv-checkpoint"  # a model (ckv train, ckv import)
ARTIFACT = "ckv-artifact"  # compressed caches, one file
SHARD = "ckv-artifact-shard"  # the per-user tensors of some users of a sharded artifact
SHARED = "ckv-artifact-shared"  # the shared tensors (pools) of a sharded artifact
INDEX = "ckv-artifact-index"  # the JSON index of a sharded artifact
FORMAT_VERSION = "1"
