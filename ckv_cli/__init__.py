"""ckv: compress the per-user KV caches of sequential recommenders (CollectiveKV, arXiv 2601.19178)."""

__version__ = "0.1.0"

_STORE = ("CacheStore", "CompressedCache", "Ranking")  # ckv_cli.store, imported on first use (it needs torch)
_STORE_CTR = ("CTRStore", "CTRArtifact")  # ckv_cli.store_ctr: CTR artifacts (SIM, ETA, SDIM, TWIN)
__all__ = ["__version__", *_STORE, *_STORE_CTR]


def __getattr__(name: str):
    if name in _STORE:
        from ckv_cli import store

        return getattr(store, name)
    if name in _STORE_CTR:
        from ckv_cli import store_ctr

        return getattr(store_ctr, name)
    raise AttributeError(f"module 'ckv_cli' has no attribute {name!r}")
