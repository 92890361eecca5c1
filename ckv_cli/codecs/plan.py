"""A cache plan: which codec stores each stream a model declares (`ckv_cli.spec.CacheSpec`), which token ids are
stored, and whether side fields (hash signatures) are stored or derived. One plan for every model.

- Ids: the model's `required` ids (read whenever it scores: window items, HSTU's timestamps, SIM's item ids) and
  the ids of every stream the plan recomputes. Bit-packed where the id declares bits; counted in per-user bytes.
- Streams: a codec each; the `recompute` codec stores nothing and the reader's model recomputes the stream from
  the stored ids (`model.recompute`: a first self-attention layer from (item, position); a CTR token from its
  event). A stream that is a function of ids the plan stores anyway is recomputed by default (it is free).
- Side fields: stored exactly (bit-packed), recomputed from the ids when every stream is, or derived again from
  the decoded streams by the model (`model.derive_side`: the compression error carries into the search).
- Eviction (`evict`): the plan decides once per token which are kept (`keep_mask`: one decision for every
  stream), hands the mask to every evict stream, zeroes the dropped tokens of recomputed streams, stores the
  mask when it is not known from the per-user counts (`tokens/keep`, 1 bit per token) and returns it with the
  decoded cache (`FlatCache.keep`), where attention reads it.
- Context (`predictive`): a codec with `needs_context` also gets, as `context=`, the first layer's K and V of each
  token side by side ((N, d_k + d_v); None unless both are recomputed from the ids, so the encoder and the reader
  see the same values) and, in `fit`, the users' offsets.
- Event times (`time_bits` > 0, `ckv_cli.codecs.timecode`): stored at a few bits per token plus one anchor per
  user (`time/code`, `time/anchor`) instead of int32 per token; `time_weights` ((layers, buckets), the model's
  time-bias tables) steer its fit and are not stored. The intervals are shared tensors (`shared/time/bounds`,
  `shared/time/gaps`); decoded times are the representatives (`BucketTimeCodec.decode`), which is what every reader
  (scoring, compressed-domain attention, a store's append) sees.

Joint K/V (`joint=kv`, `ckv_cli.codecs.joint`): each layer's coded K and V share one codec over [k; v], stored
under the K stream (`joint`); the V stream (`joined`) stores nothing and decodes as the second half of K's.

Descriptions (an artifact's metadata 'plan') keep the two layouts artifacts have always had: next-item models'
`{n_layers, n_items, timestamps, streams}` (a recomputed stream is "items") and CTR models' `{task: "ctr", arch,
n_items, codes, items_stored, stream_dims, streams}` (a recomputed stream is "eventid"); `plan_from_description`
reads both, checking every value (a file is never trusted).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec
from ckv_cli.codecs.bits import bits_for
from ckv_cli.codecs.evict import EvictCodec, kept_counts
from ckv_cli.codecs.joint import JOINED, JOINT, JointCodec, JointPart
from ckv_cli.codecs.plain import PlainCodec
from ckv_cli.codecs.recompute import RecomputeCodec
from ckv_cli.codecs.registry import registry
from ckv_cli.codecs.timecode import BucketTimeCodec
from ckv_cli.errors import CkvError
from ckv_cli.spec import CacheSpec, FlatCache, Side, TokenId

RECOMPUTE = RecomputeCodec.name
EVENTID = "eventid"  # `--codec eventid`: every stream recomputed from the event ids (the CTR models' name for it)
NEXT_ITEM, CTR = "next-item", "ctr"  # the two description layouts
MAX_WIDTH = 1 << 16
MAX_BITS = 32
DECODE_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, KeyError, AttributeError, OverflowError)


def _items(codec: StreamCodec, items: np.ndarray) -> dict:
    """The item ids as a keyword for codecs that read them (`needs_items`), nothing for the others."""
    return {"items": items} if codec.needs_items else {}


def _keep(codec: StreamCodec, keep: np.ndarray | None) -> dict:
    """The plan's keep mask as a keyword for evicting codecs (`needs_keep`), nothing for the others."""
    return {"keep": keep} if codec.needs_keep else {}


def _context(codec: StreamCodec, context: torch.Tensor | None) -> dict:
    """The first layer's K/V as a keyword for codecs that read them (`needs_context`), nothing for the others."""
    return {"context": context} if getattr(codec, "needs_context", False) else {}


def recomputed(codec) -> bool:
    return isinstance(codec, RecomputeCodec)


def pack_side(values: torch.Tensor, bits: int) -> np.ndarray:
    """(N, count) unsigned values of `bits` bits -> one uint64 per token, value r at bits [r*bits, (r+1)*bits)."""
    v = values.to(torch.int64).numpy().astype(np.uint64)  # (N, count)
    shifts = (np.arange(v.shape[1], dtype=np.uint64) * np.uint64(bits))
    return (v << shifts).sum(1, dtype=np.uint64)


def unpack_side(packed: np.ndarray, count: int, bits: int) -> torch.Tensor:
    v = np.asarray(packed, dtype=np.uint64)
    shifts = np.arange(count, dtype=np.uint64) * np.uint64(bits)
    return torch.from_numpy(((v[:, None] >> shifts) & np.uint64((1 << bits) - 1)).astype(np.int64))  # (N, count)


@dataclass
class CachePlan:
    streams: dict[str, StreamCodec]  # name -> codec (RecomputeCodec: recomputed from the stored ids)
    ids: tuple[TokenId, ...]  # the ids stored per token
    n_items: int
    side: tuple[Side, ...] = ()  # the model's side fields
    side_stored: bool = False  # stored exactly; else recomputed from the ids (every stream recomputed) or derived
    dims: dict[str, int] = field(default_factory=dict)  # stream widths where known
    layout: str = NEXT_ITEM  # the description layout
    arch: str | None = None  # the model's name (CTR descriptions record it)
    time: BucketTimeCodec | None = None  # timestamps stored at a few bits (None: as the id declares, int32)
    time_weights: np.ndarray | None = None  # (layers, buckets) time-bias tables that steer `time.fit`; not stored

    def __post_init__(self):
        params = {(c.keep, c.policy) for c in self.streams.values() if isinstance(c, EvictCodec)}
        if len(params) > 1:
            raise CkvError("every evict stream of a plan must have the same keep and policy (one decision per token)")

    # -- what the plan is
    @staticmethod
    def key(layer: int, kind: str) -> str:
        return f"L{layer}.{kind}"

    @property
    def id_names(self) -> list[str]:
        return [t.name for t in self.ids]

    @property
    def timestamps(self) -> bool:
        return "timestamps" in self.id_names

    @property
    def n_layers(self) -> int:
        return sum(1 for n in self.streams if n.endswith(".k"))

    @property
    def recomputed_streams(self) -> list[str]:
        return [n for n, c in self.streams.items() if recomputed(c)]

    @property
    def all_recomputed(self) -> bool:
        return bool(self.streams) and all(recomputed(c) for c in self.streams.values())

    @property
    def side_mode(self) -> str:
        """recomputed (every stream is recomputed from the ids, side fields with them), none (no side fields),
        stored, or derived (from the decoded streams)."""
        if self.all_recomputed:
            return "recomputed"
        if not self.side:
            return "none"
        return "stored" if self.side_stored else "derived"

    def coded(self) -> dict[str, StreamCodec]:
        """The streams a codec stores (not recomputed)."""
        return {n: c for n, c in self.streams.items() if not recomputed(c)}

    def shared_owners(self) -> dict:
        """What holds shared tensors (`shared/<owner>/<name>`), each with `shared()` and `load_shared()`: every coded
        stream's codec and, when event times are coded, `time` (their intervals)."""
        return {**self.coded(), **({"time": self.time} if self.time is not None else {})}

    def timestamps_of(self, fields: dict[str, np.ndarray], offsets: np.ndarray) -> np.ndarray:
        """(N,) int64 event times of a batch of users' fields: the stored int32 times, or the time codec's
        representatives."""
        if self.time is None:
            return np.asarray(fields["tokens/timestamps"], dtype=np.int64)
        return self.time.decode({f.name: fields[f"time/{f.name}"] for f in self.time.fields()}, offsets)

    @property
    def evictor(self) -> tuple[int, EvictCodec] | None:
        """(index in stream order, codec) of the first evict stream (whose keys the key-norm rules read), or None."""
        for i, codec in enumerate(self.streams.values()):
            if isinstance(codec, EvictCodec):
                return i, codec
        return None

    def _evict_keys(self, flat: FlatCache) -> torch.Tensor:
        """The keys of the evict stream's layer (its K, or the K beside an evicted V)."""
        name = list(self.streams)[self.evictor[0]]
        return flat.stream(name[:-1] + "k")

    def keep_mask(self, flat: FlatCache) -> np.ndarray | None:
        """Which tokens the plan keeps (N,) bool, one decision per token for every stream; None without eviction."""
        ev = self.evictor
        return None if ev is None else ev[1].select(self._evict_keys(flat), flat.offsets)

    def kept_tokens(self, offsets: np.ndarray) -> int:
        """Tokens kept over the users of `offsets` (every token without eviction): the rows of `kept` fields."""
        lengths = np.diff(offsets)
        ev = self.evictor
        return int(lengths.sum() if ev is None else kept_counts(lengths, ev[1].keep).sum())

    def fields(self) -> dict[str, Field]:
        """Every stored array, by artifact name."""
        out = {}
        for t in self.ids:
            if t.name == "timestamps" and self.time is not None:
                out.update({f"time/{f.name}": f for f in self.time.fields()})
                continue
            out[f"tokens/{t.name}"] = (Field(t.name, "token", bits=t.bits) if t.bits
                                       else Field(t.name, "token", dtype=t.dtype))
        out["users/offsets"] = Field("offsets", "user", dtype="int64")
        if self.side_stored:
            for s in self.side:
                out[f"tokens/{s.name}"] = Field(s.name, "token", bits=s.total_bits)
        ev = self.evictor
        if ev is not None and ev[1].stores_flags:
            out["tokens/keep"] = Field("keep", "token", bits=1)
        for name, codec in self.coded().items():
            for f in codec.fields():  # a ragged field's counts field by its artifact name
                out[f"{name}/{f.name}"] = replace(f, counts=f"{name}/{f.counts}") if f.counts else f
        return out

    # -- fitting, encoding, decoding
    def codec_input(self, flat: FlatCache, name: str) -> torch.Tensor:
        """What stream `name`'s codec reads: the stream, or for a joint K codec its K and V side by side."""
        codec = self.streams[name]
        if isinstance(codec, JointCodec):
            return torch.cat([flat.stream(name).float(), flat.stream(codec.partner).float()], 1)
        return flat.stream(name)

    def context(self, streams: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(N, d_k + d_v) the first layer's K and V of each token, when both are recomputed from the ids and a codec
        reads them (`needs_context`); None otherwise."""
        if not any(getattr(c, "needs_context", False) for c in self.coded().values()):
            return None
        k, v = self.key(0, "k"), self.key(0, "v")
        if recomputed(self.streams.get(k)) and recomputed(self.streams.get(v)) and k in streams and v in streams:
            return torch.cat([streams[k].float(), streams[v].float()], 1)
        return None

    def fisher_groups(self) -> dict[str, tuple[str, ...]]:
        """Streams whose codec fits in the model's Fisher metric (`metric=fisher`): {stream: the streams whose
        gradients its Fisher matrix spans} (a joint K/V codec: both). Empty when none does."""
        out = {}
        for name, codec in self.coded().items():
            if getattr(codec, "needs_fisher", False):
                out[name] = (name, codec.partner) if isinstance(codec, JointCodec) else (name,)
        return out

    def fit(self, flat: FlatCache, seed: int, progress: Callable[[str], None] | None = None,
            fisher: dict[str, torch.Tensor] | None = None) -> None:
        """`fisher`: each `fisher_groups()` stream's Fisher matrix (`ckv_cli.tasks.fisher`)."""
        missing = set(self.fisher_groups()) - set(fisher or {})
        if missing:
            raise CkvError(f"metric=fisher: no Fisher matrix for {', '.join(sorted(missing))} (ckv compress computes "
                           "it on the calibration users of a next-item model)")
        if self.time is not None:
            self.time.fit(np.asarray(flat.ids["timestamps"]), flat.offsets, self.time_weights)
        ctx = self.context(flat.streams)
        for i, (name, codec) in enumerate(self.streams.items()):
            if recomputed(codec) or isinstance(codec, JointPart):
                continue
            if progress:
                progress(name)
            try:
                extra = {"user_offsets": flat.offsets} if getattr(codec, "needs_context", False) else {}
                if getattr(codec, "needs_fisher", False):
                    extra["fisher"] = fisher[name]
                codec.fit(self.codec_input(flat, name), seed + i, **_items(codec, flat.items), **_context(codec, ctx),
                          **extra)
            except CkvError as e:  # say which stream was refused
                raise CkvError(f"{name}: {e}", e.exit_code) from None

    def encode_ids(self, flat: FlatCache) -> dict[str, np.ndarray]:
        """The stored ids' fields (`tokens/<id>`) of a batch of tokens."""
        out = {}
        for t in self.ids:
            v = np.asarray(flat.ids[t.name])
            if t.name == "timestamps" and self.time is not None:
                out.update({f"time/{k}": a for k, a in self.time.encode(v, flat.offsets).items()})
                continue
            if t.bits:
                out[f"tokens/{t.name}"] = v.astype(np.uint32)
                continue
            info = np.iinfo(t.dtype)
            if len(v) and (int(v.min()) < info.min or int(v.max()) > info.max):  # astype would wrap silently
                raise CkvError(f"{t.name} {int(v.min())}..{int(v.max())} do not fit the artifact's {t.dtype} field"
                               + (" (seconds expected; divide millisecond timestamps by 1000)" if t.name == "timestamps" else ""))
            out[f"tokens/{t.name}"] = v.astype(t.dtype)
        return out

    def encode(self, flat: FlatCache, memo: dict[str, dict[str, np.ndarray]] | None = None,
               inverse: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The fields of a batch of users' tokens. With `memo` (stream -> the fields of every distinct token) and
        `inverse` (each token's distinct row), those streams take their rows instead of being encoded."""
        out = self.encode_ids(flat)
        keep = self.keep_mask(flat)
        if keep is not None and self.evictor[1].stores_flags:
            out["tokens/keep"] = keep.astype(np.uint8)
        if self.side_stored:
            for s in self.side:
                out[f"tokens/{s.name}"] = pack_side(flat.side[s.name], s.bits)
        ctx = self.context(flat.streams)
        for name, codec in self.coded().items():
            if memo is not None and name in memo:
                enc = {k: v[inverse] for k, v in memo[name].items()}
            else:
                enc = codec.encode(self.codec_input(flat, name), flat.offsets, **_items(codec, flat.items),
                                   **_keep(codec, keep), **_context(codec, ctx))
            for fname, arr in enc.items():
                out[f"{name}/{fname}"] = arr
        return out

    @torch.no_grad()
    def decode(self, fields: dict[str, np.ndarray], offsets: np.ndarray, model) -> FlatCache:
        """Fields of a batch of users (token fields concatenated in user order) -> their flat cache. `model` (the
        one reading the cache) recomputes the recomputed streams and derives the side fields."""
        ids = {t.name: (self.timestamps_of(fields, offsets) if t.name == "timestamps"
                        else np.asarray(fields[f"tokens/{t.name}"], dtype=np.int64)) for t in self.ids}
        n = int(offsets[-1]) if len(offsets) else 0
        ev = self.evictor
        keep = None if ev is None else (np.asarray(fields["tokens/keep"], dtype=bool) if ev[1].stores_flags
                                        else ev[1].select(None, offsets))
        rec, rec_side = {}, {}
        if self.recomputed_streams:
            rec, rec_side = model.recompute(self.recomputed_streams, ids, offsets)
            if keep is not None:  # dropped tokens decode as zeros in every stream
                drop = torch.from_numpy(~keep)
                rec = {k: x.masked_fill(drop[:, None], 0.0) for k, x in rec.items()}
        items = ids.get("items", np.zeros(n, np.int64))
        ctx = self.context(rec)
        streams = {}
        for name, codec in self.streams.items():
            if recomputed(codec):
                streams[name] = rec[name]
            elif isinstance(codec, JointPart):
                continue  # filled from its leader's decoded vectors
            else:
                sub = {f.name: fields[f"{name}/{f.name}"] for f in codec.fields()}
                out = codec.decode(sub, offsets, **_items(codec, items), **_keep(codec, keep),
                                   **_context(codec, ctx)).float()
                if isinstance(codec, JointCodec):
                    streams[name], streams[codec.partner] = codec.split(out)
                else:
                    streams[name] = out
        streams = {name: streams[name] for name in self.streams}  # stream order
        side = {}
        if self.side_stored:
            spec = {s.name: s for s in model.cache_spec().side}
            side = {s.name: model.side_values(s.name, unpack_side(fields[f"tokens/{s.name}"], spec[s.name].count,
                                                                  spec[s.name].bits)) for s in self.side}
        elif self.all_recomputed:
            side = rec_side
        elif self.side:
            side = model.derive_side(streams)
        return FlatCache(np.asarray(offsets, np.int64), streams, ids, side, keep)

    # -- the model that reads it
    def check_model(self, model) -> str | None:
        """What makes `model` unable to read caches of this plan (items, streams, widths, ids), or None."""
        spec = model.cache_spec()
        arch = getattr(model, "arch", None)
        if self.arch is not None and self.arch != arch:
            return f"made from a {self.arch} checkpoint, the model is {arch}"
        if self.n_items != model.config.n_items:
            return f"holds ids of {self.n_items:,} items, the checkpoint has {model.config.n_items:,}"
        if set(self.streams) != set(spec.names):
            if self.layout == NEXT_ITEM:
                return f"holds {self.n_layers} layers, the checkpoint has {len(spec.names) // 2}"
            return f"caches streams {self.dims or list(self.streams)}, the checkpoint's are {spec.widths}"
        for s in spec.streams:
            codec = self.streams[s.name]
            if codec.d is not None and codec.d != s.width:
                return f"stream {s.name} is {codec.d} wide, the checkpoint's is {s.width}"
            if recomputed(codec) and (not s.recomputable or not set(s.from_ids) <= set(self.id_names)):
                return f"stream {s.name} is recomputed from ids, which the checkpoint's cannot be"
        stored = set(self.id_names)
        for t in spec.ids:
            if t.required and t.name not in stored:
                return (f"holds no {t.name}, which the checkpoint's attention reads" if t.name == "timestamps"
                        else f"holds no {t.name}, which the checkpoint reads")
        if "timestamps" in stored and "timestamps" not in {t.name for t in spec.ids}:
            return "holds timestamps, which the checkpoint does not read"
        mine, theirs = {s.name: s.total_bits for s in self.side}, {s.name: s.total_bits for s in spec.side}
        if self.side_stored and mine != theirs:
            return f"stores side fields {mine}, the checkpoint's are {theirs}"
        if not self.all_recomputed and set(mine) != set(theirs):
            return f"holds side fields {sorted(mine) or 'none'}, the checkpoint's are {sorted(theirs) or 'none'}"
        return None

    # -- descriptions
    def describe(self) -> dict:
        """JSON-able: enough to rebuild the plan from an artifact's metadata (module docstring)."""
        if self.layout == CTR:
            return {"task": CTR, "arch": self.arch, "n_items": self.n_items, "codes": self.side_mode,
                    "items_stored": "items" in self.id_names, "stream_dims": dict(self.dims),
                    "streams": {n: (EVENTID if recomputed(c) else {"codec": c.name, "params": c.params()})
                                for n, c in self.streams.items()}}
        out = {"n_layers": self.n_layers, "n_items": self.n_items, "timestamps": self.timestamps,
               "streams": {n: ("items" if recomputed(c) else {"codec": c.name, "params": c.params()})
                           for n, c in self.streams.items()}}
        if self.time is not None:
            out["time"] = self.time.params()
        return out


# ---------------------------------------------------------------------------------------------- building


def make_codec(name: str, d: int, params: dict, kind: str = "") -> StreamCodec:
    """`kind` ('k' or 'v') adds the codec's defaults for that stream kind under `params`. The joint pair's codecs
    (`joint`, `joined`) are made here too (from descriptions), though `--codec` does not take them."""
    codecs = {**registry(), JOINT: JointCodec, JOINED: JointPart}
    if name not in codecs:
        raise CkvError(f"unknown codec '{name}' (known: {', '.join(sorted(codecs))})")
    try:
        return codecs[name](d=d, **{**codecs[name].stream_defaults.get(kind, {}), **params})
    except TypeError as e:
        raise CkvError(f"bad parameters for codec '{name}': {e}") from None


def build_plan(spec: CacheSpec, name: str, params: dict, *, n_items: int, share: tuple[str, ...] = ("k", "v"),
               recompute_free: bool = True, side_stored: bool = False, layout: str = NEXT_ITEM,
               arch: str | None = None, time_weights: np.ndarray | None = None) -> CachePlan:
    """Every stream of `spec` gets codec `name`, except streams that are a function of ids stored anyway (recomputed
    when `recompute_free`) and kinds left out of `share` (kept at fp16). `recompute` (or `eventid`) recomputes every
    stream (each must be a function of ids). `params['time_bits']` > 0 stores the event times at that many bits
    per token (`BucketTimeCodec`, fitted with `time_weights`, the model's (layers, buckets) time-bias tables)."""
    bad = set(share) - {"k", "v"}
    if bad or not share:
        raise CkvError(f"--share takes k, v or k,v (got {','.join(share) or 'nothing'})")
    params = dict(params)
    joint = params.pop("joint", None)
    if joint not in (None, "kv"):
        raise CkvError(f"joint takes kv (one codec over each layer's K and V), got {joint!r}")
    time = _time_codec(params.pop("time_bits", 0), spec, time_weights)
    if name == EVENTID:
        if params:
            raise CkvError(f"codec eventid takes no parameters (got {', '.join(sorted(params))})")
        name = RECOMPUTE
    if name not in registry():  # refused even when no stream would use it (a one-layer model, recomputed)
        raise CkvError(f"unknown codec '{name}' (known: {', '.join(sorted([*registry(), EVENTID]))})")
    if not spec.streams:
        raise CkvError("the model caches nothing per user (no history is read): there is nothing to compress")
    required = {t.name for t in spec.ids if t.required}
    streams = {}
    for s in spec.streams:
        if name == RECOMPUTE:
            if not s.recomputable:
                raise CkvError(f"{s.name}: not a function of stored ids (it depends on the user's other events): "
                               "it cannot be recomputed; use another codec")
            streams[s.name] = RecomputeCodec(s.width)
        elif recompute_free and s.recomputable and set(s.from_ids) <= required:
            streams[s.name] = RecomputeCodec(s.width)
        elif s.kind in share:
            streams[s.name] = make_codec(name, s.width, params, s.kind)
        else:
            streams[s.name] = PlainCodec(d=s.width, dtype="float16")
    if joint:
        streams = _joined(spec, streams, name, params, kinds=set(share))
    if layout == CTR and any(getattr(c, "index", None) is not None or isinstance(c, JointCodec) for c in streams.values()):
        raise CkvError("index=item and joint=kv are for next-item models (CTR artifacts read neither back)")
    needed = required | {i for s in spec.streams if recomputed(streams[s.name]) for i in s.from_ids}
    ids = tuple(t for t in spec.ids if t.name in needed)
    if side_stored and not spec.side:
        side_stored = False  # nothing to store
    return CachePlan(streams, ids, n_items, spec.side, side_stored, spec.widths, layout, arch, time,
                     None if time is None else time_weights)


def _time_codec(bits, spec: CacheSpec, weights: np.ndarray | None) -> BucketTimeCodec | None:
    """The time codec of `time_bits` (0: none), refused for models that read no event times."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise CkvError(f"time_bits must be an integer >= 0, got {bits!r}")
    if not bits:
        return None
    if not spec.reads_times:
        raise CkvError("time_bits: this model's attention reads no event times (nothing to store)")
    if weights is None:
        raise CkvError("time_bits: this model declares no time-bias tables to fit the time codec to")
    return BucketTimeCodec(bits=bits, max_bucket=int(np.asarray(weights).shape[1]) - 1)


def _joined(spec: CacheSpec, streams: dict, name: str, params: dict, kinds: set[str]) -> dict:
    """`streams` with each K and V of one layer coded by `name` replaced by a joint pair (module docstring)."""
    if kinds != {"k", "v"}:
        raise CkvError("joint=kv needs K and V both coded (--share k,v)")
    widths = {s.name: s.width for s in spec.streams}
    out, pairs = dict(streams), 0
    for s in spec.streams:
        partner = s.name[:-1] + "v" if s.kind == "k" and s.name.endswith("k") else None
        if partner is None or partner not in streams:
            continue
        k, v = streams[s.name], streams[partner]
        if recomputed(k) or recomputed(v) or k.name != name or v.name != name:
            continue
        out[s.name] = JointCodec(widths[s.name], widths[partner], partner, name, params)
        out[partner] = JointPart(widths[partner], s.name)
        pairs += 1
    if not pairs:
        raise CkvError("joint=kv: no layer has both its K and V coded (the first layer is recomputed from item ids)")
    return out


def _check_joint(codecs: dict, bad) -> None:
    """Every joint K codec names a `joined` V stream that names it back, of the width it says."""
    for name, c in codecs.items():
        if isinstance(c, JointCodec):
            part = codecs.get(c.partner)
            if not isinstance(part, JointPart) or part.leader != name or part.d != c.d_with:
                raise bad(f"stream {name}: its joint partner {c.partner} is not a joined stream of width {c.d_with}")
        elif isinstance(c, JointPart):
            lead = codecs.get(c.leader)
            if not isinstance(lead, JointCodec) or lead.partner != name:
                raise bad(f"stream {name}: joined to {c.leader}, which is not its joint codec")


# ---------------------------------------------------------------------------------------------- reading


def _is_int(x, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def plan_from_description(desc, fields: dict | None = None, bad: Callable[[str], Exception] = CkvError) -> CachePlan:
    """A plan rebuilt from an artifact's description (codecs unfitted: load their shared tensors next). `fields`
    (the metadata's field declarations) gives the width of stored side fields. Every value is checked; `bad(why)`
    makes the error raised for one that does not fit."""
    if not isinstance(desc, dict):
        raise bad("metadata 'plan' is missing or not a JSON object")
    if desc.get("task") == CTR:
        return _ctr_plan(desc, fields or {}, bad)
    missing = [k for k in ("n_layers", "n_items", "timestamps", "streams") if k not in desc]
    if missing:
        raise bad(f"the plan lacks '{missing[0]}'")
    if not _is_int(desc["n_layers"], 1, 1024):
        raise bad(f"the plan's n_layers is {desc['n_layers']!r}")
    if not _is_int(desc["n_items"], 1, 2**MAX_BITS - 2):
        raise bad(f"the plan's n_items is {desc['n_items']!r}")
    if type(desc["timestamps"]) is not bool:
        raise bad(f"the plan's timestamps is {desc['timestamps']!r}, not true or false")
    time = _described_time(desc.get("time"), desc["timestamps"], bad) if "time" in desc else None
    streams = desc["streams"]
    keys = [CachePlan.key(layer, kind) for layer in range(desc["n_layers"]) for kind in "kv"]
    if not isinstance(streams, dict) or set(streams) != set(keys):
        raise bad(f"the plan's streams are not L0.k ... L{desc['n_layers'] - 1}.v")
    codecs = {}
    for key in keys:
        entry = streams[key]
        if entry == "items":
            codecs[key] = RecomputeCodec()
            continue
        codecs[key] = _codec(key, entry, None, bad)
    _check_joint(codecs, bad)
    ids = [TokenId("items", bits=bits_for(desc["n_items"] + 1), required=True)]
    if desc["timestamps"]:
        ids.append(TokenId("timestamps", dtype="int32", required=True))
    dims = {k: c.d for k, c in codecs.items() if c.d is not None}
    return CachePlan(codecs, tuple(ids), desc["n_items"], (), False, dims, NEXT_ITEM, None, time)


def _described_time(entry, timestamps: bool, bad) -> BucketTimeCodec:
    """The time codec of a plan's `time` entry ({codec: bucket, bits, max_bucket}), unfitted."""
    if not timestamps:
        raise bad("the plan codes event times but stores no timestamps")
    if not isinstance(entry, dict) or entry.get("codec") != BucketTimeCodec.name or set(entry) != {"codec", "bits", "max_bucket"}:
        raise bad(f"the plan's time entry is {str(entry)[:80]}, not {{codec: bucket, bits, max_bucket}}")
    if not _is_int(entry["bits"], 1, 16) or not _is_int(entry["max_bucket"], 1, 4096):
        raise bad(f"the plan's time entry has bits {entry['bits']!r} and max_bucket {entry['max_bucket']!r}")
    return BucketTimeCodec(bits=entry["bits"], max_bucket=entry["max_bucket"])


def _codec(name: str, entry, width: int | None, bad) -> StreamCodec:
    if (not isinstance(entry, dict) or not isinstance(entry.get("codec"), str)
            or not isinstance(entry.get("params"), dict)):
        raise bad(f"stream {name}: not a codec and parameters")
    params = dict(entry["params"])
    d = params.pop("d", None)
    if not _is_int(d, 1, MAX_WIDTH):
        raise bad(f"stream {name}: width d is {d!r}")
    if width is not None and d != width:
        raise bad(f"stream {name}: width {d!r}, the plan's stream_dims say {width}")
    if entry["codec"] == RECOMPUTE:
        raise bad(f"stream {name}: not a codec and parameters")
    try:
        return make_codec(entry["codec"], d, params)
    except CkvError as e:
        raise bad(f"its plan: {e}") from None
    except DECODE_ERRORS as e:
        raise bad(f"its plan: {type(e).__name__}: {str(e)[:100]}") from None


def _ctr_plan(desc: dict, fields: dict, bad) -> CachePlan:
    from ckv_cli.data.ctr import N_GAPS, N_RATINGS  # the event ids' widths

    missing = [k for k in ("task", "arch", "n_items", "codes", "items_stored", "stream_dims", "streams") if k not in desc]
    if missing:
        raise bad(f"the plan lacks '{missing[0]}'")
    if not isinstance(desc["arch"], str):
        raise bad(f"the plan's arch is {desc['arch']!r}")
    if not _is_int(desc["n_items"], 1, 2**MAX_BITS - 2):
        raise bad(f"the plan's n_items is {desc['n_items']!r}")
    dims, streams = desc["stream_dims"], desc["streams"]
    if not isinstance(dims, dict) or not dims or not all(_is_int(d, 1, MAX_WIDTH) for d in dims.values()):
        raise bad(f"the plan's stream_dims are {dims!r}")
    if not isinstance(streams, dict) or set(streams) != set(dims):
        raise bad(f"the plan's streams are not {', '.join(dims)}")
    codecs = {}
    for name in dims:
        entry = streams[name]
        if entry == EVENTID:
            codecs[name] = RecomputeCodec(dims[name])
            continue
        codecs[name] = _codec(name, entry, dims[name], bad)
        if codecs[name].needs_items or isinstance(codecs[name], (JointCodec, JointPart)):
            raise bad(f"stream {name}: codec {entry['codec']} is not one CTR artifacts use")
    every = all(recomputed(c) for c in codecs.values())
    if desc["codes"] not in (("recomputed", "none") if every else ("derived", "stored", "none")):
        raise bad(f"the plan's signatures are {desc['codes']!r}")
    if type(desc["items_stored"]) is not bool or (every and not desc["items_stored"]):
        raise bad(f"the plan's items_stored is {desc['items_stored']!r}")
    ids = []
    if desc["items_stored"]:
        ids.append(TokenId("items", bits=bits_for(desc["n_items"] + 1)))
    if any(recomputed(c) for c in codecs.values()):
        ids += [TokenId("ratings", bits=bits_for(N_RATINGS)), TokenId("gaps", bits=bits_for(N_GAPS))]
    side: tuple[Side, ...] = ()
    if desc["codes"] in ("derived", "stored"):
        fm = fields.get("tokens/codes") if desc["codes"] == "stored" else None
        total = fm.get("bits") if isinstance(fm, dict) else None
        if desc["codes"] == "stored" and not _is_int(total, 1, 64):
            raise bad("the plan stores signatures, but metadata 'fields' gives no width for 'tokens/codes'")
        side = (Side("codes", total or 1, 1),)  # the model's own side spec unpacks them (count x bits)
    return CachePlan(codecs, tuple(ids), desc["n_items"], side, desc["codes"] == "stored", dict(dims), CTR, desc["arch"])
