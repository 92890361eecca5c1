"""Data: interaction-log readers, named datasets, sequences and splits."""
from ckv_cli.data.datasets import DATASETS, cache_dir, fetch
from ckv_cli.data.readers import Log, read_log
from ckv_cli.data.sequences import SequenceData, build, load

__all__ = ["DATASETS", "Log", "SequenceData", "build", "cache_dir", "fetch", "load", "read_log"]
