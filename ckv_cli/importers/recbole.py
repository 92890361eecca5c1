"""RecBole 1.2.x SASRec -> ckv SASRec (post-LN blocks, embedding LayerNorm, raw dot-product scores).

The file is `torch.save({'config': Config, 'epoch', 'cur_step', 'best_valid_score', 'state_dict', 'other_parameter',
'optimizer'})` (RecBole's `Trainer._save_checkpoint`); it is read with `ckv_cli.importers.safe_pickle` (nothing in
it is imported or called) and the architecture comes from `config.final_config_dict`.

RecBole's SASRec (recbole/model/sequential_recommender/sasrec.py, layers.py) in ckv's terms: x = LN(item + pos)
(no sqrt(d) scaling), blocks y = LN(x + O(attn(x))), out = LN(y + FFN(y)) with FFN d -> inner_size -> d and
`hidden_act`, LayerNorm eps `layer_norm_eps`, scores = h . item_embedding (every item; RecBole masks only padding).

The item vocabulary is not in the file: RecBole numbers items by `pandas.factorize` of the `item_id` column of
the filtered `.inter` file, in file order, 0 = padding (`Dataset._remap`). `rebuild_vocab` replays its filters
(missing ids, `val_interval`, `user_inter_num_interval` / `item_inter_num_interval` as RecBole's loop applies
them) and refuses settings whose effect it cannot replay exactly (named in the error); `--item-vocab` takes
RecBole's `dataset.field2id_token['item_id']` instead. Either must match the embedding table's size.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ckv_cli.data.readers import read_log
from ckv_cli.data.sequences import build, resolve
from ckv_cli.errors import CkvError
from ckv_cli.importers.common import Imported, check_state, load_mapped, preflight, sha256_file
from ckv_cli.importers.safe_pickle import Inert, global_name, load_torch_zip
from ckv_cli.models.sasrec import SASRec, SASRecConfig

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid"}
PAD = "<pad>"
# config keys whose non-default value changes which items RecBole keeps or how it numbers them, and that
# `rebuild_vocab` cannot replay: (key, RecBole's default)
UNREPLAYABLE = (("rm_dup_inter", None), ("benchmark_filename", None), ("alias_of_item_id", None),
                ("preload_weight", None), ("additional_feat_suffix", None))


def read_recbole(src: Path) -> tuple[dict, dict]:
    """(state_dict, final_config_dict) of a RecBole checkpoint, read safely."""
    obj = load_torch_zip(src)
    if not isinstance(obj, dict) or "state_dict" not in obj or "config" not in obj:
        kind = global_name(obj) or type(obj).__name__
        raise CkvError(f"{src}: not a RecBole checkpoint (expected a dict with 'config' and 'state_dict', got {kind})")
    state, config = obj["state_dict"], obj["config"]
    if not isinstance(state, dict):
        raise CkvError(f"{src}: not a RecBole checkpoint ('state_dict' is {global_name(state) or type(state).__name__})")
    cfg = config.state.get("final_config_dict") if isinstance(config, Inert) and isinstance(config.state, dict) else None
    if global_name(config) != "recbole.config.configurator.Config" or not isinstance(cfg, dict):
        raise CkvError(f"{src}: not a RecBole checkpoint ('config' is {global_name(config) or type(config).__name__}, "
                       "expected RecBole's Config with its final_config_dict)")
    return dict(state), cfg


def _get(cfg: dict, key: str, kind, src: Path):
    value = cfg.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if not ok:
        raise CkvError(f"{src}: RecBole config '{key}' is {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def sasrec_config(cfg: dict, state: dict, src: Path) -> SASRecConfig:
    """The ckv configuration that computes RecBole's SASRec forward (module docstring); CkvError naming any
    hyperparameter ckv cannot represent."""
    model = cfg.get("model")
    if model != "SASRec":
        raise CkvError(f"{src}: RecBole model '{model}' is not supported (ckv imports RecBole's SASRec)")
    act = _get(cfg, "hidden_act", str, src)
    if act not in ACTIVATIONS:
        raise CkvError(f"{src}: RecBole hidden_act='{act}' cannot be represented (ckv has: {', '.join(ACTIVATIONS)})")
    d, heads = _get(cfg, "hidden_size", int, src), _get(cfg, "n_heads", int, src)
    if d < 1 or heads < 1 or d % heads:
        raise CkvError(f"{src}: RecBole hidden_size={d} with n_heads={heads} cannot be represented (d % heads != 0)")
    emb = state.get("item_embedding.weight")
    if emb is None or emb.dim() != 2 or emb.shape[0] < 2:
        raise CkvError(f"{src}: tensor 'item_embedding.weight' is missing or not a (n_items + 1, d) table")
    eps = float(_get(cfg, "layer_norm_eps", (int, float), src))
    if not (math.isfinite(eps) and eps > 0):
        raise CkvError(f"{src}: RecBole layer_norm_eps={eps!r} cannot be represented (must be positive)")
    return SASRecConfig(
        n_items=int(emb.shape[0]) - 1, d=d, n_layers=_get(cfg, "n_layers", int, src), n_heads=heads,
        max_len=_get(cfg, "MAX_ITEM_LIST_LENGTH", int, src), dropout=0.0, block="post_ln",
        ffn_dim=_get(cfg, "inner_size", int, src), ffn_act=ACTIVATIONS[act], ln_eps=eps, ln_affine=True,
        qkv_bias=True, emb_scale=False, emb_ln=True, final_ln=False, score="dot", temperature=1.0)


def expected_shapes(c: SASRecConfig) -> dict[str, tuple]:
    d, inner = c.d, c.ffn_dim
    out = {"item_embedding.weight": (c.n_items + 1, d), "position_embedding.weight": (c.max_len, d),
           "LayerNorm.weight": (d,), "LayerNorm.bias": (d,)}
    for i in range(c.n_layers):
        p = f"trm_encoder.layer.{i}."
        for lin in ("query", "key", "value", "dense"):
            out[f"{p}multi_head_attention.{lin}.weight"] = (d, d)
            out[f"{p}multi_head_attention.{lin}.bias"] = (d,)
        out[f"{p}multi_head_attention.LayerNorm.weight"] = out[f"{p}multi_head_attention.LayerNorm.bias"] = (d,)
        out[f"{p}feed_forward.dense_1.weight"], out[f"{p}feed_forward.dense_1.bias"] = (inner, d), (inner,)
        out[f"{p}feed_forward.dense_2.weight"], out[f"{p}feed_forward.dense_2.bias"] = (d, inner), (d,)
        out[f"{p}feed_forward.LayerNorm.weight"] = out[f"{p}feed_forward.LayerNorm.bias"] = (d,)
    return out


def map_weights(state: dict, c: SASRecConfig) -> dict:
    """RecBole names -> ckv SASRec names."""
    m = {"item_emb.weight": state["item_embedding.weight"], "pos_emb.weight": state["position_embedding.weight"],
         "emb_ln.weight": state["LayerNorm.weight"], "emb_ln.bias": state["LayerNorm.bias"]}
    for i in range(c.n_layers):
        p, q = f"trm_encoder.layer.{i}.", f"layers.{i}."
        for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v"), ("dense", "o")):
            for w in ("weight", "bias"):
                m[f"{q}{ours}.{w}"] = state[f"{p}multi_head_attention.{theirs}.{w}"]
        for w in ("weight", "bias"):
            m[f"{q}ln1.{w}"] = state[f"{p}multi_head_attention.LayerNorm.{w}"]
            m[f"{q}ffn.0.{w}"] = state[f"{p}feed_forward.dense_1.{w}"]
            m[f"{q}ffn.3.{w}"] = state[f"{p}feed_forward.dense_2.{w}"]
            m[f"{q}ln2.{w}"] = state[f"{p}feed_forward.LayerNorm.{w}"]
    return m


# ------------------------------------------------------------------------------------- the item vocabulary


def _intervals(spec, key: str, src: Path):
    """RecBole's interval string "[a,b);(c,d]" -> [(left, a, b, right)], None for None (`_parse_intervals_str`)."""
    if spec is None:
        return None
    out = []
    for part in str(spec).split(";"):
        part = part.strip()
        pair = part[1:-1].split(",")
        if len(pair) != 2 or part[:1] not in "([" or part[-1:] not in ")]" or not part:
            raise CkvError(f"{src}: RecBole {key}={spec!r} is not an interval ckv can read")
        try:
            out.append((part[0], float(pair[0]), float(pair[1]), part[-1]))
        except ValueError:
            raise CkvError(f"{src}: RecBole {key}={spec!r} is not an interval ckv can read") from None
    return out


def _within(x, intervals) -> np.ndarray | bool:
    result = True
    for i, (lb, lo, hi, rb) in enumerate(intervals):
        r = (x >= lo if lb == "[" else x > lo) & (x <= hi if rb == "]" else x < hi)
        result = r if i == 0 else result | r
    return result


def rebuild_vocab(log, cfg: dict, src: Path) -> list[str]:
    """RecBole's `field2id_token['item_id']` for this log under the checkpoint's config (module docstring)."""
    for key, default in UNREPLAYABLE:
        if cfg.get(key, default) not in (default, [], {}):
            raise CkvError(f"{src}: cannot rebuild RecBole's item vocabulary: its config sets {key}={cfg.get(key)!r}; "
                           "pass --item-vocab (RecBole's dataset.field2id_token['item_id'])")
    load_col = cfg.get("load_col")
    if isinstance(load_col, dict) and set(load_col) - {"inter"}:
        raise CkvError(f"{src}: cannot rebuild RecBole's item vocabulary: its config loads "
                       f"{', '.join(sorted(set(load_col) - {'inter'}))} feature files (load_col), which RecBole filters "
                       "and numbers items by; pass --item-vocab")
    items = np.asarray(log.items)
    users = np.asarray(log.users)
    keep = np.ones(len(items), dtype=bool)
    fields = {cfg.get("RATING_FIELD", "rating"): log.ratings, cfg.get("TIME_FIELD", "timestamp"): log.timestamps}
    for field, spec in (cfg.get("val_interval") or {}).items():
        if field not in fields or fields[field] is None or isinstance(spec, (list, tuple)):
            raise CkvError(f"{src}: cannot rebuild RecBole's item vocabulary: val_interval filters field '{field}', "
                           "which ckv does not read; pass --item-vocab")
        keep &= _within(np.asarray(fields[field], dtype=np.float64), _intervals(spec, "val_interval", src))
    u_int = _intervals(cfg.get("user_inter_num_interval"), "user_inter_num_interval", src)
    i_int = _intervals(cfg.get("item_inter_num_interval"), "item_inter_num_interval", src)
    if u_int is not None or i_int is not None:  # RecBole's `_filter_by_inter_num` loop, users and items banned together
        while True:
            uc = Counter(users[keep]) if u_int else Counter()
            ic = Counter(items[keep]) if i_int else Counter()
            ban_u = {u for u, n in uc.items() if not _within(n, u_int)} if u_int else set()
            ban_i = {i for i, n in ic.items() if not _within(n, i_int)} if i_int else set()
            if not ban_u and not ban_i:
                break
            drop = np.zeros(len(items), dtype=bool)
            if ban_u:
                drop |= np.isin(users, list(ban_u))
            if ban_i:
                drop |= np.isin(items, list(ban_i))
            keep &= ~drop
    order = dict.fromkeys(items[keep].tolist())  # first appearance in file order: pandas.factorize
    return [PAD, *order]


def read_vocab_file(path: Path) -> list[str]:
    """A vocabulary file: a JSON list (RecBole's field2id_token, '[PAD]' first) or one raw id per line."""
    path = Path(path)
    if not path.is_file():
        raise CkvError(f"item vocabulary not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            vocab = json.loads(text)
        except ValueError:
            raise CkvError(f"{path}: not a JSON list of item ids") from None
        if not isinstance(vocab, list) or not all(isinstance(x, (str, int)) for x in vocab):
            raise CkvError(f"{path}: not a JSON list of item ids")
        vocab = [str(x) for x in vocab]
    else:
        vocab = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if vocab and vocab[0] in ("[PAD]", PAD):
        vocab = vocab[1:]
    if len(set(vocab)) != len(vocab):
        raise CkvError(f"{path}: the item vocabulary lists an item twice")
    return [PAD, *vocab]


def recbole_time_key(cfg: dict) -> str:
    """How RecBole's config stores the time it orders by: 'normalized' ((t - min) / (max - min), `normalize_all` or
    `normalize_field`) or 'raw'; either way a float32 tensor."""
    time_field = cfg.get("TIME_FIELD", "timestamp")
    return "normalized" if cfg.get("normalize_all") or time_field in (cfg.get("normalize_field") or []) else "raw"


def recbole_protocol_data(data: str, item_vocab: list[str], time_key: str = "raw"):
    """The log as RecBole's sequential evaluation sees it, for
    `ckv_cli.tasks.next_item.evaluate_model(model, ds, "test", exclude_seen=False)` (RecBole 1.2.1's full sort masks only the padding column for sequential models:
    `FullSortEvalDataLoader.collate_fn` passes no history index). RecBole keeps float fields as float32 tensors
    (`Dataset._dataframe_to_interaction`), after min-max scaling where the config normalises them (`time_key`,
    recorded at import as train.recbole_time_key), and orders each user's events by that float32 time, ties in
    file order: 64-second steps at 1e9 s. On ML-1M that reorders 5,919 of 6,040 users' sequences and changes 1,191
    test targets; ckv's own protocol orders by the exact integer time. The timestamps returned are the ranks of
    those float32 values (an order key: for SASRec, which reads no time)."""
    if time_key not in ("raw", "normalized"):
        raise CkvError(f"unknown RecBole time key '{time_key}' (raw, normalized)")
    path, name = resolve(data)
    log = read_log(path)
    t = log.timestamps.astype(np.float64)
    if time_key == "normalized" and len(t) and t.max() > t.min():
        t = (t - t.min()) / (t.max() - t.min())
    log.timestamps = np.unique(t.astype(np.float32), return_inverse=True)[1].astype(np.int64)
    return build(log, f"{name}-recbole-order", item_vocab=item_vocab)


def import_recbole(src: Path, out=None, force: bool = True, data: str | None = None, item_vocab: str | None = None,
                   **unknown) -> Imported:
    """Read, check and convert a RecBole SASRec checkpoint (module docstring)."""
    if unknown:
        raise CkvError(f"recbole import: unknown option(s) {', '.join(sorted(unknown))}")
    preflight(src, out, force)
    if data is None and item_vocab is None:
        raise CkvError("recbole import needs --data LOG (to rebuild RecBole's item numbering) or --item-vocab FILE")
    state, cfg = read_recbole(src)
    config = sasrec_config(cfg, state, src)
    check_state(src, state, expected_shapes(config), "RecBole SASRec with this config")
    log = None
    if data is not None:
        path, name = resolve(data)
        log = read_log(path)
    if item_vocab is not None:
        vocab, origin = read_vocab_file(Path(item_vocab)), f"file {Path(item_vocab).name}"
    else:
        vocab, origin = rebuild_vocab(log, cfg, src), "rebuilt from the log and the checkpoint's filters"
    if len(vocab) != config.n_items + 1:
        raise CkvError(f"{src}: the item vocabulary ({origin}) has {len(vocab) - 1:,} items, the embedding table "
                       f"{config.n_items:,} (+ 1 padding row): not the data this model was trained on")
    model = load_mapped(SASRec(config), map_weights(state, config))
    dataset, fingerprint = "", ""
    if log is not None:
        seq = build(log, name, item_vocab=vocab)
        dataset, fingerprint = name, seq.fingerprint
    source = {"framework": "recbole", "version": "1.2.x (the file does not record it)", "sha256": sha256_file(src),
              "path": src.name, "model": "SASRec"}
    return Imported(model=model, item_vocab=vocab, source=source, dataset=dataset, fingerprint=fingerprint,
                    notes={"item_vocab": origin, "recbole_dataset": str(cfg.get("dataset")),
                           "recbole_time_key": recbole_time_key(cfg)})
