"""ckv: compress the per-user KV caches of sequential recommenders (CollectiveKV, arXiv 2601.19178)."""

__version__ = "0.1.0"

_STORE = ("CacheStore", "CompressedCache", "Ranking")  # ckv_cli.store, imported on first use (it needs torch)
__all__ = ["__version__", *_STORE]


def __getattr__(name: str):
    if name in _STORE:
        from ckv_cli import store

        return getattr(store, name)
    raise AttributeError(f"module 'ckv_cli' has no attribute {name!r}")
