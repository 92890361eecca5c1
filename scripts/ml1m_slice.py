"""Write a seeded slice of the ML-1M log (N users drawn at random, all their events) as a CSV that
`ckv train/compress/evaluate --data FILE.csv` reads with the default column names. The log comes from ckv's
own cache (fetched on first use); the output is data, never committed.

    .venv/bin/python scripts/ml1m_slice.py --users 600 --seed 0 -o /work/fid_data/ml1m-600.csv
"""
from __future__ import annotations

import argparse
import csv

import numpy as np

from ckv_cli.data.datasets import fetch
from ckv_cli.data.readers import read_recbole_inter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    log = read_recbole_inter(fetch("ml-1m"))
    users = np.unique(log.users)
    keep = set(np.random.default_rng(a.seed).choice(users, size=a.users, replace=False).tolist())
    rows = [i for i in range(len(log)) if log.users[i] in keep]
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp", "rating"])
        for i in rows:
            w.writerow([log.users[i], log.items[i], int(log.timestamps[i]), float(log.ratings[i])])
    print(f"{a.out}: {len(keep)} users, {len(rows)} events")


if __name__ == "__main__":
    main()
