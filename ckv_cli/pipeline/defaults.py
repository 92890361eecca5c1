"""The defaults of `ckv compress` (issue 18: data nobody tuned them for), in one place: the CLI applies them, the
slow tests check them on the sample checkpoints (`tests/test_sample_checkpoints.py`). The library's
`CompressOptions()` keeps the codecs' own defaults (collective, plain squared error, fp32 pools)."""
from __future__ import annotations

from ckv_cli.errors import CkvError


def default_params(model, task, codec: str | None, pool, user_dim: int, layout: str, user_dtype: str,
                   recompute_item_layers: bool) -> tuple[str, dict]:
    """(codec, its parameters) before `--param`: what `ckv compress` uses when told nothing (docs/fidelity.md).
    `codec`, `pool` (an int, 'auto' or 'balanced'), `user_dim`, `layout`, `user_dtype`: the options as given (None:
    not given).

    Next-item models: the predictive codec (collective where --user-dim, --layout or --user-dtype ask for its user
    part), fp16 pools sized to the log (`balanced`: at most as many entries as their indices' bytes allow, within
    1% of fp16 per user where a smaller pool can), fitted and routed in the model's Fisher metric where the layout
    and sizing allow (`--pool-size auto` sizes by squared error; the concat layout has its own basis). Predictive:
    the prediction is the recomputed first layer's K/V through a linear map plus a per-item table of at most as
    many rows as the pool has entries (`linear+item`, `max_rows=pool`; `item` without a recomputed first layer),
    and event times are stored at 4 bits where the model reads them through a log1p-bucket bias (HSTU). CTR models:
    collective with 4096-entry pools and the codec's own defaults."""
    from ckv_cli.pipeline.sizing import AUTO, BALANCED
    from ckv_cli.tasks import CTR

    if codec is None:
        collective_asked = user_dim > 0 or layout != "residual" or user_dtype != "int8"
        codec = "collective" if task is CTR or collective_asked else "predictive"
    size = (task.default_pool if task is CTR else BALANCED) if pool is None else pool  # next-item: sized to the log
    fisher = {"metric": "fisher"} if pool != AUTO else {}
    if codec == "collective":
        params = {"pool_size": size, "user_dim": user_dim, "layout": layout, "user_dtype": user_dtype}
        metric = fisher if layout == "residual" else {}
        return codec, params if task is CTR else {**params, "pool_dtype": "fp16", **metric}
    if codec == "predictive" and task is not CTR:
        times = {"time_bits": 4} if reads_time_buckets(model) else {}
        return codec, {"pool_size": size, "predictor": "linear+item" if recompute_item_layers else "item",
                       "dtype": "fp16", "max_rows": "pool", **fisher, **times}
    return codec, ({"pool_size": pool} if codec == "predictive" and pool is not None else {})


def reads_time_buckets(model) -> bool:
    """The model's attention reads event times through a bias over log1p buckets (HSTU's): the time codec fits it."""
    tables = getattr(model, "time_bias_tables", None)
    if tables is None or not model.cache_spec().reads_times:
        return False
    try:
        tables()
    except CkvError:  # another bucketing (an imported model's)
        return False
    return True
