#!/usr/bin/env python
"""Appending to an artifact in memory: `CacheStore.append_many` of one new event for each of B users.

The users are drawn (seeded) among those whose window has room for the event, so no window slides (a slid window
re-prefills and re-encodes the user whatever the codec). Each of --repeats rounds opens the store afresh (not
timed) and times one `append_many` call; the median is reported, with the rows the predictive codecs routed
(`PredictiveCodec._nearest`) in the last round: the new tokens alone where a codec codes them apart from the
window (`codes_tail`), every token of the touched users where it re-encodes them. New events: a seeded random item
each, one minute after the user's newest cached event (models that keep no event times ignore it).

    python bench/append.py --artifact A.safetensors --checkpoint sample_checkpoints/sasrec-ml1m.safetensors
Runs from the repository root without installing ckv (it puts the root on sys.path). To time older code, copy
this file into that tree's bench/ and run it there on the same artifact.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._machine import machine  # noqa: E402
from ckv_cli.codecs.predictive import PredictiveCodec  # noqa: E402
from ckv_cli.errors import CkvError  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint  # noqa: E402
from ckv_cli.serve.next_item import CacheStore  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--users", type=int, nargs="+", default=[1, 64], help="B, the users of one append_many call")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    return p.parse_args(argv)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)
    with CacheStore.open(args.artifact, model, checkpoint=args.checkpoint) as store:
        lengths = np.diff(store.artifact.offsets)
        room = np.flatnonzero(lengths + 1 <= model.config.max_len - 1)  # the event fits: no window slides
        n_items, user_ids, reads_times = store.plan.n_items, list(store.user_ids), store.plan.timestamps
    if len(room) == 0:
        raise CkvError("no user has room in its window for one more event")
    rng = np.random.default_rng(args.seed)
    routed: list[int] = []
    nearest = PredictiveCodec._nearest

    def counting(self, res):
        routed.append(len(res))
        return nearest(self, res)

    PredictiveCodec._nearest = counting
    rows = []
    try:
        for B in args.users:
            users = np.sort(rng.choice(room, size=min(B, len(room)), replace=False))
            uids = [user_ids[u] for u in users]
            items = [[int(i)] for i in rng.integers(1, n_items + 1, size=len(users))]
            ts = None
            if reads_times:  # a minute after each user's newest cached event
                with CacheStore.open(args.artifact, model) as store:
                    cached = store.fetch(uids)
                last = cached.timestamps.gather(1, (cached.lengths - 1).clamp(min=0)[:, None])[:, 0]
                ts = [[int(t) + 60] for t in last]
            times = []
            for _ in range(args.repeats):
                with CacheStore.open(args.artifact, model) as store:
                    routed.clear()
                    t = time.perf_counter()
                    store.append_many(uids, items, ts)
                    times.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(times)
            rows.append({"users": len(users), "tokens_before": int(lengths[users].sum()), "ms": ms, "all_ms": times,
                         "users_per_s": len(users) / ms * 1e3, "routed_rows": int(sum(routed))})
            print(f"B={len(users)}: {ms:.1f} ms ({len(users) / ms * 1e3:.0f} users/s), routed {sum(routed)} rows "
                  f"({int(lengths[users].sum())} cached tokens)", flush=True)
    finally:
        PredictiveCodec._nearest = nearest
    return {"machine": machine(), "artifact": str(args.artifact), "checkpoint": str(args.checkpoint),
            "repeats": args.repeats, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except CkvError as e:
        print(f"bench/append.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
