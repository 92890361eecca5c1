"""KV extraction: build the teacher's per-user caches and move them between the model's padded layout and the
flat token layout codecs and artifacts use."""
from ckv_cli.kv.extract import CacheBatch, FlatCache, flatten, iter_test_caches, last_event_batch, unflatten

__all__ = ["CacheBatch", "FlatCache", "flatten", "iter_test_caches", "last_event_batch", "unflatten"]
