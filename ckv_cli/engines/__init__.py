"""Where `ckv compress --shard-size` encodes its shards: in this process (`local`) or on Ray (`ray`,
`ckv_cli.engines.ray_engine`, an optional extra: `pip install 'ckv-cli[ray]'`). The core never imports Ray."""
from __future__ import annotations

ENGINES = ("local", "ray")
