"""HSTU's event times at a few bits (`ckv_cli.codecs.timecode`) against int32 timestamps: how many time-bucket lookups
of the held-out query change, how far the bias values they read move, and what that does to NDCG@10 / top-10 overlap.

    OMP_NUM_THREADS=1 .venv/bin/python bench/hstu_time.py sample_checkpoints/hstu-ml1m.safetensors --data ml-1m \
        --bits 0,2,3,4,5,6,8 --out docs/fidelity/hstu-time-ml1m.json

K/V are kept exact (fp32, `plain`) so only the times differ; the first layer is recomputed from item ids as in
every plan. The time intervals are fitted on calibration users and measured on the other users (`reserve` rule of
`ckv_cli.pipeline.holdout`). A lookup is one (query, cached token, layer) bias read: bucket(t_q - t_k) with t_q the
appended last event's time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ckv_cli.codecs.timecode import BucketTimeCodec, gap_bucket
from ckv_cli.data import load
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions
from ckv_cli.pipeline.holdout import heldout_compress, reserve_split, teacher_subset
from ckv_cli.tasks.next_item import Teacher


def lookups(teacher_rep: Teacher, codec: BucketTimeCodec | None, weights: np.ndarray, max_bucket: int) -> dict:
    changed = total = 0
    dbias = []
    for tb in teacher_rep.batches:
        flat = tb.flat
        ts = np.asarray(flat.ids["timestamps"], np.int64)
        dec = ts if codec is None else codec.decode(codec.encode(ts, flat.offsets), flat.offsets)
        tq = np.repeat(tb.last_ts.numpy().reshape(len(tb.users), -1)[:, 0], np.diff(flat.offsets))
        b_true, b_new = gap_bucket(tq - ts, max_bucket), gap_bucket(tq - dec, max_bucket)
        changed += int((b_true != b_new).sum())
        total += len(ts)
        dbias.append(np.abs(weights[:, b_true] - weights[:, b_new]).mean(0))
    d = np.concatenate(dbias)
    return {"lookups": total, "bucket_changed": changed / max(total, 1), "mean_abs_dbias": float(d.mean()),
            "p99_abs_dbias": float(np.quantile(d, 0.99)), "max_abs_dbias": float(d.max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--bits", default="0,2,3,4,5,6,8")
    ap.add_argument("--calib-users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = load_checkpoint(a.checkpoint)
    ds = load(a.data, item_vocab=meta["item_vocab"])
    teacher = Teacher.build(model, ds, 256)
    weights = model.time_bias_tables()
    max_bucket = weights.shape[1] - 1
    split = reserve_split(ds.n_users, a.calib_users, a.seed)
    rep = teacher_subset(teacher, split.report)
    calib = teacher.flat.select(split.calib)
    rows = []
    for bits in [int(b) for b in a.bits.split(",")]:
        t = time.perf_counter()
        codec = None
        if bits:
            codec = BucketTimeCodec(bits=bits, max_bucket=max_bucket)
            codec.fit(np.asarray(calib.ids["timestamps"], np.int64), calib.offsets, weights)
        look = lookups(rep, codec, weights, max_bucket)
        params = {"dtype": "float32", **({"time_bits": bits} if bits else {})}
        res = heldout_compress(model, teacher, CompressOptions(codec="plain", params=params, calib_users=a.calib_users,
                                                               seed=a.seed), bootstrap=1000)
        time_bytes = sum(v for k, v in res.accounting["per_user_breakdown"].items() if k.startswith("time/")
                         or k == "tokens/timestamps") / res.accounting["tokens"]
        rows.append({"bits": bits, "time_bytes_per_token": time_bytes, **look,
                     "intervals": None if codec is None else codec.bounds.tolist(),
                     "gaps": None if codec is None else codec.gaps.tolist(),
                     "ci": {k: list(v) for k, v in res.ci.items()}, "fidelity": res.fidelity,
                     "report_users": res.report_users, "seconds": round(time.perf_counter() - t, 1)})
        r = rows[-1]
        n = r["ci"]["NDCG@10"]
        print(f"bits {bits}: {time_bytes:.3f} B/token, buckets changed {look['bucket_changed']:.3%}, mean |dbias| "
              f"{look['mean_abs_dbias']:.4f}, dNDCG@10 {n[0]:+.4f} [{n[1]:+.4f}, {n[2]:+.4f}], overlap "
              f"{res.fidelity['top10_overlap']:.4f}", flush=True)
        Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "data": a.data, "rule": split.rule,
                                           "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
