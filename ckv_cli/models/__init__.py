"""Models: one architecture per file; the registry maps `--arch` names to (model class, config class)."""
from ckv_cli.models.base import KVCache, SequentialRecommender, last_hidden
from ckv_cli.models.hstu import HSTU, HSTUConfig
from ckv_cli.models.sasrec import SASRec, SASRecConfig

REGISTRY = {"sasrec": (SASRec, SASRecConfig), "hstu": (HSTU, HSTUConfig)}

__all__ = ["HSTU", "HSTUConfig", "KVCache", "REGISTRY", "SASRec", "SASRecConfig", "SequentialRecommender", "last_hidden"]
