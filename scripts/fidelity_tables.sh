#!/usr/bin/env bash
# Reproduce docs/fidelity.md (issue 18). One thread per process; hours on the shared 2-core machine.
#   scripts/fidelity_tables.sh [OUT_DIR=docs/fidelity] [DATA_DIR=/work/fid_data] [MODELS=/work/fid_models]
set -euo pipefail
out=${1:-docs/fidelity}; data=${2:-/work/fid_data}; models=${3:-/work/fid_models}
export OMP_NUM_THREADS=1
py=.venv/bin/python
mkdir -p "$out" "$data" "$models"

# ML-1M samples: codecs at equal bytes, calibration held out (1,000 calibration users, metrics on the other 5,040)
$py bench/fidelity.py sample_checkpoints/sasrec-ml1m.safetensors --data ml-1m --out "$out/sasrec-ml1m-codecs.json" \
  --specs 'collective:pool_size=8192;predictive:pool_size=1024;predictive:pool_size=8192;collective:pool_size=8192,pool_dtype=fp16;predictive:pool_size=8192,predictor=linear+item;predictive:pool_size=8192,predictor=item+pos;predictive:pool_size=4096'
$py bench/hstu_time.py sample_checkpoints/hstu-ml1m.safetensors --data ml-1m --bits 0,2,3,4,5,6,8 --out "$out/hstu-time-ml1m.json"
$py bench/fidelity.py sample_checkpoints/hstu-ml1m.safetensors --data ml-1m --out "$out/hstu-ml1m-codecs.json" \
  --specs 'collective:pool_size=8192;predictive:pool_size=4096,time_bits=4;predictive:pool_size=4096,predictor=linear+item,time_bits=4;predictive:pool_size=2048,predictor=linear+item,time_bits=4;collective:pool_size=8192,pool_dtype=fp16,time_bits=4;predictive:pool_size=4096,predictor=item+pos,time_bits=4'

# small logs: a seeded 600-user slice of ML-1M, and ML-100K; small models trained on them (8 minutes, then continued
# with early stopping for up to 40 more)
$py scripts/ml1m_slice.py --users 600 --seed 0 -o "$data/ml1m-600.csv"
for arch in sasrec hstu; do
  for d in "ml-100k ml100k" "$data/ml1m-600.csv ml1m600"; do
    set -- $d
    .venv/bin/ckv train --arch $arch --data $1 -o "$models/$arch-$2.safetensors" --threads 1 --max-minutes 8 --force
    .venv/bin/ckv train --arch $arch --data $1 -o "$models/$arch-$2.long.safetensors" --init "$models/$arch-$2.safetensors" \
      --threads 1 --max-minutes 40 --force
  done
done
for spec in "sasrec ml-100k ml100k 0" "hstu ml-100k ml100k 4" "sasrec $data/ml1m-600.csv ml1m600 0" "hstu $data/ml1m-600.csv ml1m600 4"; do
  set -- $spec
  ck=$models/$1-$3.long.safetensors
  tb=""; [ "$4" != 0 ] && tb=",time_bits=$4"
  $py bench/fidelity.py $ck --data $2 --rule insample --specs "collective:pool_size=8192" --out "$out/$1-$3-insample.json"
  $py bench/fidelity.py $ck --data $2 --rule reserve --out "$out/$1-$3-codecs.json" \
    --specs "collective:pool_size=8192;collective:pool_size=1024,pool_dtype=fp16$tb;predictive:pool_size=1024$tb;collective:pool_size=256,pool_dtype=fp16$tb;predictive:pool_size=256$tb;predictive:pool_size=1024,predictor=linear+item$tb"
  $py bench/pool_sizing.py $ck --data $2 --codec predictive --time-bits $4 --targets 0.2,0.15,0.12,0.1,0.08 --out "$out/sizing-$1-$3.json"
done
