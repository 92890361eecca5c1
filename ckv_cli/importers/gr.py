"""generative-recommenders (meta-recsys, `research/`) HSTU and SASRec -> ckv HSTU / SASRec.

The file is `torch.save({'epoch', 'model_state_dict': DDP(model).state_dict(), 'optimizer_state_dict'})`
(`research/trainer/train.py`): plain tensors, read with `torch.load(weights_only=True)`; keys carry DDP's `module.`
prefix (accepted with or without). No configuration is saved: the architecture comes from the run's `.gin` file
(`parse_gin`: a few literal bindings, never evaluated) or from `--bind NAME=VALUE` flags with the same names,
checked against the weights' shapes.

HSTU (`modeling/sequential/hstu.py`) in ckv's terms (`ckv_cli.models.hstu`): LayerNorm without affine at eps 1e-6,
UVQK without bias, N = max_sequence_length + gr_output_length + 1 for the normaliser and the Toeplitz position
bias, time buckets floor(log(max(|dt|, 1)) / 0.301), the gap from the next event's time (the target's for the
newest event: `query_time="next"`). SASRec (`sasrec.py`): Q from LN(x) and K, V from x (`block="query_ln"`),
LayerNorm eps 1e-8 without affine, a ReLU/GELU 1x1-conv FFN, no final LayerNorm. Both: sqrt(d)-scaled item
embeddings plus positions, L2-normalised user and item embeddings, dot product (cosine scores).
Item ids: generative-recommenders keeps the dataset's raw integer ids (MovieLens movie ids), so row i is raw id
str(i) unless `--item-vocab` names the raw id of each row.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ckv_cli.data.readers import read_log
from ckv_cli.data.sequences import build, resolve
from ckv_cli.errors import CkvError
from ckv_cli.importers.common import Imported, check_state, load_mapped, preflight, sha256_file
from ckv_cli.importers.recbole import PAD, read_vocab_file
from ckv_cli.models.hstu import HSTU, HSTUConfig
from ckv_cli.models.sasrec import SASRec, SASRecConfig

# train_fn's and the encoders' defaults (research/trainer/train.py, modeling/sequential/encoder_utils.py)
DEFAULTS = {
    "train_fn.main_module": "SASRec", "train_fn.max_sequence_length": 200, "train_fn.item_embedding_dim": 240,
    "train_fn.gr_output_length": 10, "train_fn.user_embedding_norm": "l2_norm", "train_fn.item_l2_norm": False,
    "train_fn.interaction_module_type": "", "train_fn.temperature": 0.05, "train_fn.l2_norm_eps": 1e-6,
    "train_fn.embedding_module_type": "local", "train_fn.dropout_rate": 0.2, "train_fn.main_module_bf16": False,
    "hstu_encoder.num_blocks": 2, "hstu_encoder.num_heads": 1, "hstu_encoder.dqk": 64, "hstu_encoder.dv": 64,
    "hstu_encoder.normalization": "rel_bias", "hstu_encoder.linear_config": "uvqk",
    "hstu_encoder.linear_activation": "silu", "hstu_encoder.concat_ua": False,
    "hstu_encoder.enable_relative_attention_bias": True, "hstu_encoder.linear_dropout_rate": 0.0,
    "sasrec_encoder.num_blocks": 2, "sasrec_encoder.num_heads": 1, "sasrec_encoder.ffn_hidden_dim": 64,
    "sasrec_encoder.ffn_activation_fn": "relu", "sasrec_encoder.ffn_dropout_rate": 0.2,
}
ENCODER_SIZES = {"HSTU": ("num_blocks", "num_heads", "dqk", "dv"), "SASRec": ("num_blocks", "num_heads", "ffn_hidden_dim")}
# bindings that change the forward pass and the value ckv reproduces (anything else is refused, named)
REQUIRED = {"train_fn.user_embedding_norm": ("l2_norm",), "train_fn.item_l2_norm": (True,),
            "train_fn.interaction_module_type": ("DotProduct",), "train_fn.embedding_module_type": ("local",),
            "train_fn.main_module_bf16": (False,),
            "hstu_encoder.normalization": ("rel_bias", "hstu_rel_bias"), "hstu_encoder.linear_config": ("uvqk",),
            "hstu_encoder.linear_activation": ("silu",), "hstu_encoder.concat_ua": (False,),
            "hstu_encoder.enable_relative_attention_bias": (True,)}
_BINDING = re.compile(r"^([A-Za-z_][\w.]*)\s*=\s*(.+?)\s*$")


def parse_value(text: str):
    """A gin literal: int, float, quoted string, True/False/None. Never evaluated; anything else is None-typed
    `_Unparsed` (an error only where the importer needs that binding)."""
    t = text.strip()
    if t in ("True", "False"):
        return t == "True"
    if t == "None":
        return None
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'" and t[0] not in t[1:-1] and "\\" not in t:
        return t[1:-1]
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", t):
        return float(t)
    return _Unparsed(t)


class _Unparsed(str):
    """A binding value that is not a plain literal (a macro, a reference, a container)."""


def parse_gin(text: str) -> dict:
    """`name.param = literal` lines of a gin file (comments and blank lines skipped; a value spanning lines, a
    macro or an import is kept unparsed and refused only if the importer reads it)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = _BINDING.match(line)
        if m:
            out[m.group(1)] = parse_value(m.group(2))
    return out


def parse_binds(binds: list[str] | None) -> dict:
    out = {}
    for b in binds or []:
        name, sep, value = b.partition("=")
        if not sep or not _BINDING.match(f"{name.strip()} = {value.strip() or '_'}"):
            raise CkvError(f"bad --bind '{b}': expected NAME=VALUE, e.g. hstu_encoder.num_blocks=2")
        out[name.strip()] = parse_value(value)
    return out


@dataclass
class GRArch:
    """What the bindings say about the model (defaults filled in)."""

    main_module: str
    max_len: int
    d: int
    out_len: int
    bindings: dict

    def get(self, key: str):
        value = self.bindings.get(key, DEFAULTS.get(key))
        if isinstance(value, _Unparsed):
            raise CkvError(f"gin binding {key} = {value} is not a literal ckv can read")
        return value


def arch_from(bindings: dict) -> GRArch:
    full = {**DEFAULTS, **bindings}
    for key, allowed in REQUIRED.items():
        value = full.get(key)
        if key.startswith("hstu_encoder.") and full["train_fn.main_module"] != "HSTU":
            continue
        if value not in allowed:
            raise CkvError(f"generative-recommenders {key} = {value!r} cannot be represented in ckv "
                           f"(supported: {', '.join(repr(a) for a in allowed)})")
    a = GRArch(full["train_fn.main_module"], full["train_fn.max_sequence_length"], full["train_fn.item_embedding_dim"],
               full["train_fn.gr_output_length"], bindings)
    for key, value in (("train_fn.max_sequence_length", a.max_len), ("train_fn.item_embedding_dim", a.d),
                       ("train_fn.gr_output_length", a.out_len)):
        if type(value) is not int or value < (0 if key.endswith("output_length") else 1):
            raise CkvError(f"generative-recommenders {key} = {value!r} is not a valid size")
    if a.main_module not in ("HSTU", "SASRec"):
        raise CkvError(f"generative-recommenders main_module '{a.main_module}' is not supported (HSTU, SASRec)")
    encoder = "hstu_encoder." if a.main_module == "HSTU" else "sasrec_encoder."
    for key in ENCODER_SIZES[a.main_module]:
        if type(value := a.get(encoder + key)) is not int or value < 1:
            raise CkvError(f"generative-recommenders {encoder}{key} = {value!r} is not a valid size")
    t = a.get("train_fn.temperature")
    if type(t) not in (int, float) or not math.isfinite(t) or t <= 0:
        raise CkvError(f"generative-recommenders train_fn.temperature = {t!r} is not a positive number")
    return a


def read_gr(src: Path) -> dict:
    """model_state_dict of a generative-recommenders checkpoint (`module.` prefix removed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what counts
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it will not read this way
        text = str(e)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        w = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        why = (f"it references {m.group(1)}, which a weights-only file may not" if m else
               f"its pickle: {w.group(1).strip()[:100]}" if w else
               text.strip().splitlines()[0][:140] if text.strip() else type(e).__name__)
        raise CkvError(f"{src}: refused by torch.load(weights_only=True), nothing executed ({why})") from None
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CkvError(f"{src}: not a generative-recommenders checkpoint (no 'model_state_dict')")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _mismatch(src: Path, what: str, says, has) -> CkvError:
    return CkvError(f"{src}: the gin file does not match the weights: {what} says {says}, the weights have {has}")


def _item_table(a: GRArch, state: dict, src: Path, blocks: str, layer_key: str) -> torch.Tensor:
    """The item embedding table (n_items + 1, d), after checking it and the layer count against the gin file."""
    emb = state.get("_embedding_module._item_emb.weight")
    if emb is None or emb.dim() != 2:
        raise CkvError(f"{src}: tensor '_embedding_module._item_emb.weight' is missing")
    layers = {int(m.group(1)) for k in state if (m := re.match(layer_key, k))}
    if len(layers) != a.get(blocks):
        raise _mismatch(src, blocks, a.get(blocks), f"{len(layers)} layers")
    if emb.shape[1] != a.d:
        raise _mismatch(src, "train_fn.item_embedding_dim", a.d, f"item embeddings of width {emb.shape[1]}")
    return emb


def _check_positions(state: dict, src: Path, N: int) -> None:
    pos = state.get("_input_features_preproc._pos_emb.weight")
    if pos is not None and pos.shape[0] != N:
        raise _mismatch(src, "max_sequence_length + gr_output_length + 1", N, f"{pos.shape[0]} position rows")


def hstu_config(a: GRArch, state: dict, src: Path) -> HSTUConfig:
    n_layers, heads = a.get("hstu_encoder.num_blocks"), a.get("hstu_encoder.num_heads")
    dqk, dv = a.get("hstu_encoder.dqk"), a.get("hstu_encoder.dv")
    N = a.max_len + a.out_len + 1
    emb = _item_table(a, state, src, "hstu_encoder.num_blocks", r"_hstu\._attention_layers\.(\d+)\.")
    uvqk = state.get("_hstu._attention_layers.0._uvqk")
    if uvqk is not None and uvqk.shape[1] != heads * (2 * dqk + 2 * dv):
        raise _mismatch(src, "num_heads x (2 dqk + 2 dv)", heads * (2 * dqk + 2 * dv), f"_uvqk of width {uvqk.shape[1]}")
    _check_positions(state, src, N)
    return HSTUConfig(n_items=int(emb.shape[0]) - 1, d=a.d, n_layers=n_layers, n_heads=heads, d_qk=dqk, d_v=dv,
                      max_len=a.max_len, dropout=0.0, time_buckets=128, ln_eps=1e-6, ln_affine=False,
                      uvqk_bias=False, attn_norm=N, rel_pos="toeplitz", time_bucket="log_clamp1", query_time="next",
                      emb_scale=True, score="cosine", temperature=float(a.get("train_fn.temperature")), n_positions=N)


def hstu_mapping(c: HSTUConfig) -> tuple[dict, callable]:
    N = c.attn_norm
    shapes = {"_embedding_module._item_emb.weight": (c.n_items + 1, c.d), "_input_features_preproc._pos_emb.weight": (N, c.d)}
    for i in range(c.n_layers):
        p = f"_hstu._attention_layers.{i}."
        shapes.update({p + "_uvqk": (c.d, c.n_heads * (2 * c.d_qk + 2 * c.d_v)), p + "_o.weight": (c.d, c.n_heads * c.d_v),
                       p + "_o.bias": (c.d,), p + "_rel_attn_bias._pos_w": (2 * N - 1,),
                       p + "_rel_attn_bias._ts_w": (c.time_buckets + 1,)})

    def mapped(s: dict) -> dict:
        m = {"item_emb.weight": s["_embedding_module._item_emb.weight"], "pos_emb.weight": s["_input_features_preproc._pos_emb.weight"]}
        for i in range(c.n_layers):
            p, q = f"_hstu._attention_layers.{i}.", f"layers.{i}."
            m.update({q + "f1.weight": s[p + "_uvqk"].T, q + "f2.weight": s[p + "_o.weight"], q + "f2.bias": s[p + "_o.bias"],
                      q + "bias.pos": s[p + "_rel_attn_bias._pos_w"], q + "bias.time": s[p + "_rel_attn_bias._ts_w"]})
        return m

    return shapes, mapped


def sasrec_config(a: GRArch, state: dict, src: Path) -> SASRecConfig:
    n_layers, heads = a.get("sasrec_encoder.num_blocks"), a.get("sasrec_encoder.num_heads")
    ffn, act = a.get("sasrec_encoder.ffn_hidden_dim"), a.get("sasrec_encoder.ffn_activation_fn")
    if act not in ("relu", "gelu"):
        raise CkvError(f"generative-recommenders sasrec_encoder.ffn_activation_fn = {act!r} cannot be represented")
    N = a.max_len + a.out_len + 1
    emb = _item_table(a, state, src, "sasrec_encoder.num_blocks", r"attention_layers\.(\d+)\.")
    conv = state.get("forward_layers.0._conv1d.0.weight")
    if conv is not None and conv.shape[0] != ffn:
        raise _mismatch(src, "sasrec_encoder.ffn_hidden_dim", ffn, f"an FFN of width {conv.shape[0]}")
    _check_positions(state, src, N)
    if a.d % heads:
        raise CkvError(f"generative-recommenders item_embedding_dim={a.d} with num_heads={heads} cannot be represented")
    return SASRecConfig(n_items=int(emb.shape[0]) - 1, d=a.d, n_layers=n_layers, n_heads=heads, max_len=a.max_len,
                        dropout=0.0, block="query_ln", ffn_dim=ffn, ffn_act=act, ln_eps=1e-8, ln_affine=False,
                        qkv_bias=True, emb_scale=True, emb_ln=False, final_ln=False, score="cosine",
                        temperature=float(a.get("train_fn.temperature")), n_positions=N)


def sasrec_mapping(c: SASRecConfig) -> tuple[dict, callable]:
    N, d, f = c.n_positions, c.d, c.ffn_dim
    shapes = {"_embedding_module._item_emb.weight": (c.n_items + 1, d), "_input_features_preproc._pos_emb.weight": (N, d)}
    for i in range(c.n_layers):
        a, w = f"attention_layers.{i}.", f"forward_layers.{i}._conv1d."
        shapes.update({a + "in_proj_weight": (3 * d, d), a + "in_proj_bias": (3 * d,), a + "out_proj.weight": (d, d),
                       a + "out_proj.bias": (d,), w + "0.weight": (f, d, 1), w + "0.bias": (f,), w + "3.weight": (d, f, 1),
                       w + "3.bias": (d,)})

    def mapped(s: dict) -> dict:
        m = {"item_emb.weight": s["_embedding_module._item_emb.weight"], "pos_emb.weight": s["_input_features_preproc._pos_emb.weight"]}
        for i in range(c.n_layers):
            a, w, q = f"attention_layers.{i}.", f"forward_layers.{i}._conv1d.", f"layers.{i}."
            for j, name in enumerate("qkv"):
                m[f"{q}{name}.weight"] = s[a + "in_proj_weight"][j * d : (j + 1) * d]
                m[f"{q}{name}.bias"] = s[a + "in_proj_bias"][j * d : (j + 1) * d]
            m.update({q + "o.weight": s[a + "out_proj.weight"], q + "o.bias": s[a + "out_proj.bias"],
                      q + "ffn.0.weight": s[w + "0.weight"][..., 0], q + "ffn.0.bias": s[w + "0.bias"],
                      q + "ffn.3.weight": s[w + "3.weight"][..., 0], q + "ffn.3.bias": s[w + "3.bias"]})
        return m

    return shapes, mapped


def import_gr(src: Path, out=None, force: bool = True, gin: str | None = None, binds: list[str] | None = None,
              data: str | None = None, item_vocab: str | None = None, **unknown) -> Imported:
    """Read, check and convert a generative-recommenders checkpoint (module docstring)."""
    if unknown:
        raise CkvError(f"gr import: unknown option(s) {', '.join(sorted(unknown))}")
    preflight(src, out, force)
    bindings = {}
    if gin is not None:
        gp = Path(gin)
        if not gp.is_file():
            raise CkvError(f"gin file not found: {gp}")
        bindings = parse_gin(gp.read_text(encoding="utf-8", errors="replace"))
    bindings.update(parse_binds(binds))
    if not bindings:
        raise CkvError("gr import needs the run's --gin FILE or --bind NAME=VALUE flags (the checkpoint holds no config)")
    arch = arch_from(bindings)
    state = read_gr(src)
    mask = state.pop("_attn_mask", None)  # the causal mask buffer: (N, N) bool, checked, not a weight
    N = arch.max_len + arch.out_len + 1
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (N, N)
                             or not torch.equal(mask, torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1))):
        raise _mismatch(src, "max_sequence_length + gr_output_length + 1", N, f"an attention mask of shape {tuple(mask.shape)}")
    if arch.main_module == "HSTU":
        config = hstu_config(arch, state, src)
        shapes, mapped = hstu_mapping(config)
        model_cls = HSTU
    else:
        config = sasrec_config(arch, state, src)
        shapes, mapped = sasrec_mapping(config)
        model_cls = SASRec
    check_state(src, state, shapes, f"generative-recommenders {arch.main_module} of these bindings")
    model = load_mapped(model_cls(config), mapped(state))
    if item_vocab is not None:
        vocab, origin = read_vocab_file(Path(item_vocab)), f"file {Path(item_vocab).name}"
        if len(vocab) != config.n_items + 1:
            raise CkvError(f"{src}: the item vocabulary has {len(vocab) - 1:,} items, the embedding table "
                           f"{config.n_items:,} (+ 1 padding row)")
    else:
        vocab, origin = [PAD, *(str(i) for i in range(1, config.n_items + 1))], "raw integer ids (row i = id i)"
    dataset, fingerprint = "", ""
    if data is not None:
        path, name = resolve(data)
        seq = build(read_log(path), name, item_vocab=vocab)
        dataset, fingerprint = name, seq.fingerprint
    source = {"framework": "generative-recommenders", "version": "research (the file does not record a version)",
              "sha256": sha256_file(src), "path": src.name, "model": arch.main_module,
              "bindings": {k: (str(v) if isinstance(v, _Unparsed) else v) for k, v in sorted(bindings.items())}}
    return Imported(model=model, item_vocab=vocab, source=source, dataset=dataset, fingerprint=fingerprint,
                    notes={"item_vocab": origin})
