#!/bin/bash
# CTR compression study (compress_ctr.py): one `ckv compress` per (checkpoint, setting), one thread, JSON + log per run.
# usage: scripts/ctr_compress_study.sh OUTDIR CHECKPOINT "SETTING ARGS" ["SETTING ARGS" ...]
#   e.g. scripts/ctr_compress_study.sh runs/ctr-compress runs/ctr/sim-ml1m-ctr.safetensors "--pool-size 4096" "--codec eventid"
# DATA=ml-100k-ctr (or a CSV log) compresses against another log; default ml-1m-ctr.
set -e
out=$1; ckpt=$2; shift 2
mkdir -p "$out"
arch=$(basename "$ckpt" .safetensors)
for setting in "$@"; do
  tag=$(echo "$setting" | tr -s ' =' '__' | tr -d '-')
  OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/ckv compress "$ckpt" --data "${DATA:-ml-1m-ctr}" -o "$out/$arch.$tag.safetensors" \
    $setting --force --json "$out/$arch.$tag.json" > "$out/$arch.$tag.log" 2>&1
done
