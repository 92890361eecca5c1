"""tests/test_sample_checkpoints.py::test_compress_defaults with --pool-size auto in place of 8192, for one checkpoint:

    OMP_NUM_THREADS=1 .venv/bin/python bench/auto_default.py sample_checkpoints/hstu-ml1m.safetensors > out.json
"""
import json, sys, time
import torch
torch.set_num_threads(1)
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress
from ckv_cli.data import load

path = sys.argv[1]
model, meta = load_checkpoint(path)
ml1m = load("ml-1m")
t = time.time()
opts = CompressOptions(params={"pool_size": "auto", "user_dim": 0, "layout": "residual"})
result = compress(model, ml1m, opts, keep_fields=False)
acct, m = result.accounting, result.metrics
out = {"checkpoint": path, "seconds": round(time.time() - t, 1), "timing": result.timing,
       "pool_sizing": result.calibration.get("pool_sizing"),
       "per_user_ratio_fp16": acct["per_user_ratio_fp16"], "total_ratio_fp16": acct["total_ratio_fp16"],
       "shared_bytes": acct["shared_bytes"], "relative_delta": m["relative_delta"], "fidelity": m["fidelity"],
       "uncompressed_NDCG@10": m["uncompressed"]["NDCG@10"], "recorded_NDCG@10": meta["metrics"]["test"]["NDCG@10"],
       "calibration": {k: v for k, v in m["calibration"].items() if k != "held_out"},
       "held_out_recon": m["calibration"].get("held_out", {}).get("reconstruction_rel_mse")}
checks = {"per_user<=0.02": acct["per_user_ratio_fp16"] <= 0.02,
          "NDCG rel >= -1%": m["relative_delta"]["NDCG@10"] >= -0.01,
          "overlap>=0.83": m["fidelity"]["top10_overlap"] >= 0.83,
          "uncompressed matches": abs(m["uncompressed"]["NDCG@10"] - meta["metrics"]["test"]["NDCG@10"]) <= 5e-4}
out["checks"] = checks
print(json.dumps(out, indent=1))
