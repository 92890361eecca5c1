#!/usr/bin/env bash
# Retrain the two sample checkpoints (SASRec, HSTU on ML-1M) with the published recipe: per-position sampled
# softmax (128 negatives, temperature 0.05), lr 1e-3, batch 128, early stopping on validation NDCG@10.
#   [LR=1e-3] [LOGDIR=OUT_DIR] scripts/train_samples.sh OUT_DIR [DEVICE] [MAX_MINUTES]
# On a GPU both models train side by side; on CPU one after the other (hours on 2 cores).
set -euo pipefail
out=${1:?usage: scripts/train_samples.sh OUT_DIR [DEVICE] [MAX_MINUTES]}
device=${2:-cpu}
minutes=${3:-0}
ckv=${CKV:-ckv}
lr=${LR:-1e-3}
logs=${LOGDIR:-$out}
mkdir -p "$out" "$logs"
train() {  # arch
  $ckv train --arch "$1" --data ml-1m --out "$out/$1-ml1m.safetensors" --device "$device" --lr "$lr" \
    --epochs 400 --patience 25 --max-minutes "$minutes" --force --json "$out/$1-ml1m.train.json" \
    > "$logs/$1.log" 2>&1
}
if [[ $device == cuda* ]]; then
  train sasrec & train hstu & wait
else
  train sasrec; train hstu
fi
tail -n 8 "$logs"/*.log
