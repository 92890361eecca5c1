"""The Fisher information of a next-item model's cached vectors, per stream, on calibration users: the metric in
which `metric=fisher` pools are fitted (`ckv_cli.codecs.metric`).

For each calibration user the model appends the last known event through its cache and scores every item, as
evaluation does (`scores_with_grad`: the window's items masked under the published protocol). `samples` items y
are drawn from the model's own next-item distribution softmax(scores / T) (seeded), and g = d log p(y) / d x is
taken for every cached vector x of the asked streams. Per group of streams (one stream, or a layer's K and V side
by side for one joint index) the result is sum over tokens and samples of g g^T: (d, d) float64, the empirical
estimate of E_y[g g^T], whose quadratic form e^T F e is, to second order, twice the KL divergence the error e on
one token causes. Only the cached vectors take gradients; the model is not changed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ckv_cli.errors import CkvError
from ckv_cli.spec import FlatCache
from ckv_cli.tasks.next_item import TeacherBatch, iter_test_caches, scores_with_grad, temperature_of

SAMPLES = 4  # items drawn per user


def fisher_grams(model, batches: Iterable, groups: dict[str, tuple[str, ...]], samples: int = SAMPLES,
                 seed: int = 0, exclude_seen: bool = True) -> dict[str, torch.Tensor]:
    """{group name: (w, w) float64 Gram of the log-likelihood gradients}, w the summed width of the group's
    streams. `batches`: `CacheBatch`es (a prefilled cache each) or `TeacherBatch`es (a flat cache each)."""
    if samples < 1:
        raise CkvError(f"Fisher samples must be at least 1, got {samples}")
    names = sorted({n for g in groups.values() for n in g})
    gen = torch.Generator().manual_seed(seed + 101)
    T = temperature_of(model)
    grams: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            teacher = isinstance(b, TeacherBatch)  # a flat cache already; else a prefilled one
            flat = b.tokens if teacher else model.flatten(b.cache)
            read = FlatCache(flat.offsets, dict(flat.streams), dict(flat.ids))
            leaves = {}
            for n in names:
                if n not in flat.streams:
                    raise CkvError(f"Fisher metric: the model caches no stream {n}")
                leaves[n] = flat.stream(n).detach().float().clone().requires_grad_(True)  # (N, d)
                read.set_stream(n, leaves[n])
            batch = b.cache_batch(model.unflatten(read)) if teacher else replace(b, cache=model.unflatten(read))
            with torch.enable_grad():
                logp = F.log_softmax(scores_with_grad(model, batch.cache, batch, exclude_seen)[:, 1:] / T, -1)  # (B, n)
                for s in range(samples):
                    y = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # (B, 1) from the model itself
                    g = torch.autograd.grad(logp.gather(1, y).sum(), [leaves[n] for n in names],
                                            retain_graph=s < samples - 1, allow_unused=True)
                    by = {n: torch.zeros_like(leaves[n]) if gi is None else gi for n, gi in zip(names, g)}
                    for key, members in groups.items():
                        gg = torch.cat([by[n] for n in members], 1).double()  # (N, w)
                        grams[key] = grams.get(key, 0) + gg.T @ gg
    finally:
        model.train(was_training)
    if not grams:
        raise CkvError("Fisher metric: no calibration user has a cached token")
    return grams


def data_grams(model, data, users: np.ndarray, groups: dict[str, tuple[str, ...]], batch_users: int = 256,
               seed: int = 0, exclude_seen: bool = True) -> dict[str, torch.Tensor]:
    """`fisher_grams` on `users` of a next-item dataset (their test histories, as calibration caches them)."""
    return fisher_grams(model, _without_grad(iter_test_caches(model, data, np.asarray(users), batch_users)), groups,
                        seed=seed, exclude_seen=exclude_seen)


def _without_grad(batches: Iterable):
    """Each batch built (prefilled) without autograd: only the cached vectors take gradients."""
    it = iter(batches)
    while True:
        with torch.no_grad():
            b = next(it, None)
        if b is None:
            return
        yield b
