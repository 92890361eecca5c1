"""ckv: compress the per-user KV caches of sequential recommenders (CollectiveKV, arXiv 2601.19178).

The library API: `CacheStore` (next-item models) and `CTRStore` (CTR models) serve users from an artifact;
`ckv_cli.pipeline.compress` compresses, `ckv_cli.evaluate.compare` compares. Importing `ckv_cli` loads neither the
CLI nor its dependencies (typer, rich)."""

__version__ = "0.1.0"

_EXPORTS = {"CacheStore": "ckv_cli.serve.next_item", "CompressedCache": "ckv_cli.serve.next_item",
            "Ranking": "ckv_cli.serve.next_item", "CTRStore": "ckv_cli.serve.ctr",
            "Artifact": "ckv_cli.artifact.reader", "CTRArtifact": "ckv_cli.artifact.reader"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:  # imported on first use (they need torch)
        import importlib

        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, "Artifact" if name == "CTRArtifact" else name)
    raise AttributeError(f"module 'ckv_cli' has no attribute {name!r}")
