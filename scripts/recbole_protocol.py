"""Evaluate a ckv checkpoint imported from RecBole under RecBole's own protocol (RecBole's event order, every
item ranked: `ckv_cli.importers.recbole.recbole_protocol_data`) and print the metrics as JSON.
Usage: python scripts/recbole_protocol.py CHECKPOINT DATA [OUT.json]"""
import json
import sys

import torch

from ckv_cli.importers.recbole import recbole_protocol_data
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.tasks.next_item import evaluate_model

torch.set_num_threads(1)
model, meta = load_checkpoint(sys.argv[1])
ds = recbole_protocol_data(sys.argv[2], meta["item_vocab"], meta["train"].get("recbole_time_key", "raw"))
out = {"protocol": "RecBole 1.2.1 full sort: events ordered by float32(timestamp), every item ranked (padding only masked)",
       "users": ds.n_users, "metrics": evaluate_model(model, ds, "test", exclude_seen=False)}
text = json.dumps(out, indent=1)
print(text)
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(text + "\n")
