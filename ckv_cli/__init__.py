"""ckv: compress the per-user KV caches of sequential recommenders (CollectiveKV, arXiv 2601.19178)."""

__version__ = "0.1.0"
