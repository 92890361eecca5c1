"""Run `ckv compress` over a small grid of settings on one checkpoint and print a Markdown table of the results.

    python scripts/compress_study.py sample_checkpoints/sasrec-ml1m.safetensors --data ml-1m --out runs/study

Each row is one `ckv compress` command (printed with the table), so every number can be reproduced alone.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

GRID = {
    "pool 4096 (default)": [],
    "pool 1024": ["--pool-size", "1024"],
    "pool 4096, r=1 int8, residual": ["--user-dim", "1"],
    "pool 4096, r=1 int8, concat": ["--user-dim", "1", "--layout", "concat"],
    "pool 4096, r=4 int8, residual": ["--user-dim", "4"],
    "pool 4096, distilled 300 steps": ["--distill-steps", "300"],
    "pool 4096, K only pooled (V fp16)": ["--share", "k"],
    "pool 4096, V only pooled (K fp16)": ["--share", "v"],
    "pool 4096, first layer pooled too": ["--no-recompute-item-layers"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="ml-1m")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.checkpoint).stem
    rows = []
    for i, (name, extra) in enumerate(GRID.items()):
        if args.only and name not in args.only:
            continue
        art, js = out / f"{stem}-{i}.safetensors", out / f"{stem}-{i}.json"
        cmd = ["ckv", "compress", args.checkpoint, "--data", args.data, "-o", str(art), "--json", str(js), "--force", *extra]
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", "ckv_cli.cli", *cmd[1:]], capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed: {proc.stderr.strip()}", file=sys.stderr)
            continue
        r = json.loads(js.read_text())
        a, m = r["accounting"], r["metrics"]
        rows.append([name, f"{a['bytes_per_token']:.2f}", f"{a['per_user_ratio_fp16']:.2%}", f"{a['total_ratio_fp16']:.2%}",
                     f"{m['uncompressed']['NDCG@10']:.4f}", f"{m['compressed']['NDCG@10']:.4f}",
                     f"{m['relative_delta']['NDCG@10']:+.2%}", f"{m['delta']['HR@10']:+.4f}",
                     f"{m['fidelity']['top10_overlap']:.3f}", str(m['fidelity']['hit10_flips']),
                     f"{time.time() - t:.0f}", shlex.join(cmd)])
        print(" | ".join(rows[-1][:-1]), flush=True)
    head = ["setting", "bytes/token", "per-user vs fp16", "total vs fp16", "NDCG@10 full", "NDCG@10 ckv",
            "rel. dNDCG@10", "dHR@10", "top-10 overlap", "hit flips", "seconds"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r[:-1]) + " |")
    print("\nCommands:")
    for r in rows:
        print(f"- {r[0]}: `{r[-1]}`")


if __name__ == "__main__":
    main()
