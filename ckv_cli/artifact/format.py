"""The artifact format: one safetensors file that explains itself.

Tensors
- `shared/<stream>/<name>`: what every user shares (pools, routers, bases), e.g. `shared/L1.k/pool`; `shared/time/*`
  the intervals of event times coded at a few bits (`time/code` per token, `time/anchor` per user);
- `users/offsets` (U + 1,) int64: user u's tokens are [offsets[u], offsets[u+1]);
- `users/id_bytes`, `users/id_offsets`: the user id table (utf-8), so users are found by their raw id;
- `tokens/<id>`: the ids the plan stores per token (`tokens/items` bit-packed; `tokens/timestamps` int32 for
  models that read event times; `tokens/ratings`, `tokens/gaps` for recomputed CTR streams), `tokens/codes`
  (stored signatures), `tokens/keep`; per stream `<stream>/<field>`: per-token fields flattened in user order,
  as (N, width) (bit-packed ones as uint8 streams), per-user fields as (U, width), ragged fields (a variable
  number of rows per user, e.g. the escaped indices of an item-coded index) as their rows in user order, each
  user's row count in the per-user field its declaration names (`counts`). `stored_shape` is the rule.
`__metadata__` (strings; JSON where structured): format, format_version, plan (`ckv_cli.codecs.plan`), fields
(name -> per/dtype/width/bits/count, and counts for a ragged field), accounting (bytes, NOTES §4), metrics, source checkpoint path and sha256,
data fingerprint, command, ckv version, seed, `task` ("ctr" for CTR models), and `checksums` (sha256 of each
tensor's bytes, checked by `verify`).
"""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import torch

from ckv_cli.codecs import Field
from ckv_cli.codecs.bits import packed_nbytes
from ckv_cli.codecs.joint import JointCodec
from ckv_cli.codecs.plan import DECODE_ERRORS, MAX_BITS, MAX_WIDTH
from ckv_cli.errors import CkvError
from ckv_cli.io import formats
from ckv_cli.spec import token_index

FORMAT = formats.ARTIFACT
SHARD_FORMAT = formats.SHARD
FORMAT_VERSION = formats.FORMAT_VERSION
SAFETENSORS_DTYPE = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
                     "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64", "int64": "I64",
                     "float64": "F64"}  # numpy name -> safetensors name (every dtype numpy can read)
ACCOUNTING_NUMBERS = ("users", "tokens", "full_fp16_bytes", "full_fp32_bytes", "per_user_bytes", "shared_bytes",
                      "bytes_per_token", "full_fp16_bytes_per_token", "per_user_ratio_fp16", "per_user_ratio_fp32",
                      "total_ratio_fp16", "total_ratio_fp32")  # `ckv_cli.compress.accounting` writes them all
def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def field_meta(f: Field, count: int) -> dict:
    """A field's entry in metadata 'fields': `count` rows (tokens, users + 1 for the offsets, users, or a ragged
    field's rows); a ragged field also names its per-user counts field."""
    out = {"per": f.per, "dtype": f.dtype, "width": f.width, "bits": f.bits, "count": count}
    if f.per == "ragged":
        out["counts"] = f.counts
    return out


def reorder_users(joined: dict[str, np.ndarray], fields_meta: dict, lengths: np.ndarray,
                  order: np.ndarray) -> dict[str, np.ndarray]:
    """Fields of users laid back to back (`joined`: token fields user by user, `lengths` (U,) tokens each; per-user
    fields one row per user; ragged fields their rows user by user, counted by their counts field) -> the same
    fields with the users in `order` (indices into those U users)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tok = token_index(starts[order], lengths[order])
    out = {}
    for k, v in joined.items():
        fm = fields_meta[k]
        if fm["per"] == "user":
            out[k] = v[order]
        elif fm["per"] == "ragged":
            n = np.asarray(joined[fm["counts"]], np.int64).reshape(-1)
            out[k] = v[token_index(np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)[order], n[order])]
        else:
            out[k] = v[tok]
    return out


def stored_shape(name: str, f: Field, count: int) -> tuple[int, ...]:
    """The shape a field is stored at: packed bytes (bits > 0); (count,) for the user offsets and the plan's own
    per-token fields (`tokens/...`); (count, width) for every codec field and per-user field."""
    if f.bits:
        return (packed_nbytes(count, f.bits),)
    if name == "users/offsets" or name.startswith("tokens/"):
        return (count,)
    return (count, f.width)


def ragged_count(fm) -> int | None:
    """A ragged field's row count from its metadata entry, or None where it is not a count."""
    count = fm.get("count") if isinstance(fm, dict) else None
    return count if _is_int(count, 0, 2**62) else None


def encode_meta(value) -> str:
    """A metadata value as a string: strings as they are, unless they start like JSON ('{', '[' or '"': then
    JSON-quoted, so that a path like '[v2].safetensors' reads back as itself); everything else as JSON."""
    if isinstance(value, str) and not value.startswith(("{", "[", '"')):
        return value
    return json.dumps(value, sort_keys=True)


def decode_meta(value: str):
    """Inverse of `encode_meta`; raises ValueError on a value that starts like JSON but is not."""
    if value.startswith(("{", "[")):
        return json.loads(value)
    if value.startswith('"'):
        try:
            out = json.loads(value)
        except ValueError:
            return value  # written by a ckv that stored such strings raw
        return out if isinstance(out, str) else value
    return value


def decode_metadata(raw: dict[str, str], path) -> dict:
    """Every `__metadata__` entry decoded (`decode_meta`), a one-line CkvError naming the one that is not."""
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = decode_meta(v)
        except (ValueError, RecursionError):
            raise CkvError(f"{path}: corrupted metadata entry '{k}'") from None
    return meta


def _is_int(x, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def checked_user_table(offsets: np.ndarray, id_off: np.ndarray, id_bytes: bytes, n_tokens: int, bad) -> list[str]:
    """The user id table of an artifact, after checking the token offsets (0 .. n_tokens, non-decreasing), the id
    offsets (0 .. len(id_bytes)) and that no user is listed twice; `bad(why)` makes the error."""
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != n_tokens:
        raise bad(f"user offsets are not increasing from 0 to the {n_tokens:,} tokens")
    if id_off[0] != 0 or (np.diff(id_off) < 0).any() or id_off[-1] != len(id_bytes):
        raise bad(f"user id offsets are not increasing from 0 to the {len(id_bytes):,} id bytes")
    user_ids = [id_bytes[a:b].decode("utf-8", "replace") for a, b in zip(id_off[:-1], id_off[1:])]
    if len(set(user_ids)) != len(user_ids):
        raise bad("the user id table holds a user twice")
    return user_ids


def check_listed_fields(fields, declared: dict, bad) -> None:
    """The metadata's 'fields' must list exactly the fields the plan declares; `bad(why)` makes the error."""
    if not isinstance(fields, dict):
        raise bad("metadata 'fields' is missing or not a JSON object")
    if set(fields) != set(declared):
        name = sorted(set(fields) ^ set(declared))[0]
        raise bad(f"field '{name}' is " + ("declared by the plan but not listed in metadata 'fields'"
                                           if name in declared else "listed in metadata 'fields' but not in the plan"))


def check_field_tensors(fields: dict, declared: dict, header: dict, n_tokens: int, n_users: int, bad) -> None:
    """Each declared field's metadata entry, width and tensor (dtype, shape in the safetensors `header`) must be
    what the plan stores for `n_tokens` tokens of `n_users` users; `bad(why)` makes the error."""
    for name, f in declared.items():
        fm = fields[name]
        if f.per == "ragged":
            count = ragged_count(fm)
            if count is None:
                raise bad(f"field '{name}' in metadata 'fields' gives no row count")
            if declared.get(f.counts) is None or declared[f.counts].per != "user":
                raise bad(f"field '{name}' counts its rows in '{f.counts}', which is not a per-user field")
        else:
            count = n_tokens if f.per == "token" else n_users + (name == "users/offsets")
        want = field_meta(f, count)
        if fm != want:
            if not isinstance(fm, dict) or set(fm) != set(want):
                raise bad(f"field '{name}' in metadata 'fields' is not {{{', '.join(want)}}}")
            key = next(k for k in want if fm[k] != want[k] or type(fm[k]) is not type(want[k]))
            raise bad(f"field '{name}' has {key} {fm[key]!r} in metadata 'fields', expected {want[key]!r}")
        if f.bits > MAX_BITS or f.width > MAX_WIDTH:
            raise bad(f"field '{name}' is {f.bits} bits x {f.width} wide")
        info = header.get(name)
        shape = list(stored_shape(name, f, want["count"]))
        dtype = "U8" if f.bits else SAFETENSORS_DTYPE.get(f.dtype)
        if info is None:
            raise bad(f"tensor '{name}' is missing")
        if info["dtype"] != dtype or list(info["shape"]) != shape:
            raise bad(f"tensor '{name}' is {info['dtype']} {info['shape']}, its field needs {dtype} {shape}")


def shared_tensors(plan) -> dict[str, np.ndarray]:
    """`shared/<stream>/<name>` -> array of every coded stream's shared tensors (pools, bases, routers, tables)."""
    return {f"shared/{owner}/{name}": t.detach().cpu().contiguous().numpy()
            for owner, codec in plan.shared_owners().items() for name, t in codec.shared().items()}


def _probe(codec) -> str | None:
    """Decode one all-zero token through a codec loaded from shared tensors: what breaks, or None. Shared
    tensors of the wrong shape fail here, at open, instead of in the middle of a read."""
    fields = {f.name: np.zeros(1, np.int64) if f.bits else np.zeros((1, f.width), f.dtype) for f in codec.fields()}
    for f in codec.fields():  # one row of each ragged field, counted by its counts field
        if f.per == "ragged":
            fields[f.counts] = np.ones_like(fields[f.counts])
    kw = {"items": np.zeros(1, np.int64)} if codec.needs_items else {}
    if getattr(codec, "needs_context", False):  # predictive: the first layer's K/V, as wide as its linear map reads
        weight = getattr(getattr(codec, "inner", codec), "weight", None)  # a joint codec's: its inner codec's
        kw["context"] = None if weight is None else torch.zeros(1, weight.shape[0] - 1)
    try:
        with warnings.catch_warnings():  # a misshapen tensor may warn before it fails
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                out = codec.decode(fields, np.array([0, 1]), **kw)
    except CkvError:
        return None  # a refusal the codec explains itself when the token is really read
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    width = codec.width if isinstance(codec, JointCodec) else codec.d  # a joint codec decodes K and V side by side
    if tuple(out.shape) != (1, width):
        return f"decodes to shape {tuple(out.shape)}, not (1, {width})"
    return None


def load_shared_into(plan, shared: dict[str, np.ndarray], bad) -> None:
    """Load each coded stream's shared tensors (`shared/<stream>/<name>` -> array) into its codec, and a time codec's
    (`shared/time/<name>`), checking that they fit; `bad(why)` makes the error raised."""
    for stream, codec in plan.shared_owners().items():
        prefix, what = f"shared/{stream}/", f"stream {stream}" if stream in plan.streams else "event times"
        try:
            codec.load_shared({n[len(prefix):]: torch.from_numpy(t.copy()) for n, t in shared.items() if n.startswith(prefix)})
        except KeyError as e:
            raise bad(f"{what} lack shared tensor {e}" if what == "event times" else f"{what} lacks shared tensor {e}") from None
        except CkvError as e:
            raise bad(f"{what}: {e}") from None
        except DECODE_ERRORS as e:
            raise bad(f"{what}: its shared tensors do not fit its codec ({type(e).__name__})") from None
        why = _probe(codec) if stream in plan.streams else None  # the time codec checks itself on load
        if why:
            raise bad(f"stream {stream}: its shared tensors do not fit its codec ({why})")
