"""Markdown tables for docs/fidelity.md from the JSON files the benches wrote (docs/fidelity/*.json).

    .venv/bin/python scripts/fidelity_report.py [docs/fidelity]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(c) -> str:
    return f"{c[0]:+.4f} [{c[1]:+.4f}, {c[2]:+.4f}]"


def codecs_table(path: Path) -> str:
    d = json.loads(path.read_text())
    r0 = d["rows"][0]
    ref = r0["reference"]
    out = [f"`{path.name}`: {d['checkpoint']} on {d['data']}, {d['users']:,} users, {d['tokens']:,} cached tokens; "
           f"{r0['rule']}; uncompressed NDCG@10 {ref['NDCG@10']:.4f}, HR@10 {ref['HR@10']:.4f} on the reported users.",
           "", "| spec | B/token | per-user / fp16 | shared | total / fp16 | dNDCG@10 [95% CI] | dHR@10 [95% CI] | "
           "top-10 overlap | KL | hit@10 flips | recon K / V (reported users) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        rec = [v for k, v in sorted(r["recon"].items()) if not k.startswith("L0")]
        out.append(f"| `{r['spec']}` | {r['bytes_per_token']:.2f} | {r['per_user_ratio_fp16']:.2%} | "
                   f"{r['shared_bytes'] / 2**20:.2f} MB | {r['total_ratio_fp16']:.2%} | {ci(r['ci']['NDCG@10'])} | "
                   f"{ci(r['ci']['HR@10'])} | {r['fidelity']['top10_overlap']:.3f} | {r['fidelity']['kl_mean']:.4f} | "
                   f"{r['fidelity']['hit10_flips']} | {' / '.join(f'{v:.3f}' for v in rec)} |")
    return "\n".join(out)


def time_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [f"`{path.name}`: {d['checkpoint']} on {d['data']}; {d['rule']}; K/V exact (fp32), only the times differ.", "",
           "| time storage | B/token | lookups whose bucket changes | mean abs bias change | p99 | dNDCG@10 [95% CI] | "
           "dHR@10 [95% CI] | top-10 overlap |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        name = "int32 timestamps (today)" if not r["bits"] else f"{r['bits']} bits + int32 anchor per user"
        out.append(f"| {name} | {r['time_bytes_per_token']:.3f} | {r['bucket_changed']:.1%} | {r['mean_abs_dbias']:.4f} | "
                   f"{r['p99_abs_dbias']:.3f} | {ci(r['ci']['NDCG@10'])} | {ci(r['ci']['HR@10'])} | "
                   f"{r['fidelity']['top10_overlap']:.4f} |")
    return "\n".join(out)


def sizing_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [f"`{path.name}`: {d['checkpoint']} on {d['data']}, codec {d['codec']} {d['params'] or ''}"
           f"{', time bits ' + str(d['time_bits']) if d['time_bits'] else ''}; {d['rule']}; sizing "
           f"{d['sizing_seconds']:.0f} s.", "",
           "| target (held-out rel. error) | pool per stream (met?) | per-user / fp16 | shared | total / fp16 | "
           "dNDCG@10 [95% CI] | dHR@10 [95% CI] | top-10 overlap | recon (reported users) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        a = r["accounting"]
        sizes = ", ".join(f"{k} {c['pool_size']}{'' if c['met'] else ' (no)'}" for k, c in r["choices"].items())
        rec = " / ".join(f"{v:.3f}" for k, v in sorted(r["recon"].items()) if not k.startswith("L0"))
        out.append(f"| {(str(r['max_bits']) + ' index bits') if r.get('max_bits') else format(r['target'], 'g')} | {sizes} | {a['per_user_ratio_fp16']:.2%} | {a['shared_bytes'] / 2**20:.2f} MB | "
                   f"{a['total_ratio_fp16']:.2%} | {ci(r['ci']['NDCG@10'])} | {ci(r['ci']['HR@10'])} | "
                   f"{r['fidelity']['top10_overlap']:.3f} | {rec} |")
    trials = d["rows"][0]["choices"]
    out += ["", "Sizes tried (held-out error on the calibration users' validation fifth):", ""]
    for k, c in trials.items():
        out.append(f"- {k}: " + ", ".join(f"{t['pool_size']}: {t['error']:.4f}" for t in c["trials"]))
    return "\n".join(out)


def target_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [f"`{path.name}`: {d['checkpoint']} on {d['data']}, target {d['target']}; fitted on {d['fit_users']} "
           f"calibration users, measured on {d['val_users']} others; search {d['search_seconds']:.0f} s.", "",
           "| setting | per-user / fp16 | total / fp16 | measured | met |", "|---|---|---|---|---|"]
    for t in d["tried"]:
        if t["status"] == "ok":
            out.append(f"| `{t['setting']}` | {t['per_user_ratio_fp16']:.2%} | {t['total_ratio_fp16']:.2%} | "
                       f"{t['measured']:.4f} | {'yes' if t['met'] else 'no'} |")
        else:
            out.append(f"| `{t['setting']}` | | | {t['status']} | |")
    c = d.get("check")
    if c:
        a = c["accounting"]
        out += ["", f"Chosen `{d['chosen']}`; on the {c['report_users']:,} users that calibrated nothing: per-user "
                f"{a['per_user_ratio_fp16']:.2%}, total {a['total_ratio_fp16']:.2%}, top-10 overlap "
                f"{c['fidelity']['top10_overlap']:.3f}, dNDCG@10 {ci(c['ci']['NDCG@10'])}, dHR@10 {ci(c['ci']['HR@10'])}."]
    else:
        out += ["", "No setting met the target."]
    return "\n".join(out)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/fidelity")
    for p in sorted(root.glob("*.json")):
        if "time" in p.name:
            print(time_table(p))
        elif p.name.startswith("sizing"):
            print(sizing_table(p))
        elif p.name.startswith("target"):
            print(target_table(p))
        else:
            print(codecs_table(p))
        print()


if __name__ == "__main__":
    main()
