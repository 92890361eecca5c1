"""One index for a layer's K and V (issue 21 part 2): a codec over the concatenation [k; v] instead of one per
stream. A cached layer's K and V are both functions of the same token state (SASRec: two affine maps of one
LayerNorm output; HSTU: two slices of one projection), so one pool entry can stand for both: one index per
token instead of two, at some error per stream.

`--param joint=kv` (any codec) makes the plan (`ckv_cli.codecs.plan.build_plan`) pair each layer's coded K and V:
- the K stream gets a `JointCodec`: the codec asked for (`inner`), fitted and run on [k / s_k ; v / s_v] (each
  stream divided by its RMS on the calibration tokens, `joint_scale`, so both weigh alike in the pool's error),
  its fields stored under the K stream's name, its shared tensors with `joint_scale` beside them;
- the V stream gets a `JointPart` (`joined`): it stores nothing; the plan takes the V half of the K stream's
  decoded vectors.
Streams whose partner is recomputed from ids (the first layer) or not coded stay one codec each.
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int
from ckv_cli.errors import CkvError

JOINT, JOINED = "joint", "joined"


class JointCodec(StreamCodec):
    """`inner` (a registered codec name and its parameters) over [k; v]; registered under the K stream (width
    `d`), its partner the V stream (`partner`, width `d_with`)."""

    name = JOINT

    def __init__(self, d: int, d_with: int, partner: str, inner: str, inner_params: dict | None = None):
        from ckv_cli.codecs.plan import make_codec

        self.d = check_positive_int("d", d)
        self.d_with = check_positive_int("d_with", d_with)
        if not isinstance(partner, str) or not partner:
            raise CkvError(f"joint: partner must be a stream name, got {partner!r}")
        if inner in (JOINT, JOINED) or not isinstance(inner, str):
            raise CkvError(f"joint: inner codec {inner!r} is not a codec")
        params = dict(inner_params or {})
        params.pop("d", None)
        self.partner = partner
        self.inner = make_codec(inner, self.d + self.d_with, params)
        self.scale = None  # (2,) RMS of K and of V on the calibration tokens

    @property
    def needs_items(self) -> bool:
        """As the inner codec, which may change its mind: index=auto that chose flat, `set_index` over a pool."""
        return self.inner.needs_items

    @property
    def needs_context(self) -> bool:
        """As the inner codec (predictive): the plan then passes the first layer's K/V as `context=`."""
        return getattr(self.inner, "needs_context", False)

    @property
    def width(self) -> int:
        """Width of what `decode` returns: K and V side by side."""
        return self.d + self.d_with

    def params(self) -> dict:
        inner = {k: v for k, v in self.inner.params().items() if k != "d"}
        return {"d": self.d, "d_with": self.d_with, "partner": self.partner, "inner": self.inner.name,
                "inner_params": inner}

    def _vector_scale(self) -> torch.Tensor:
        if self.scale is None:
            raise CkvError("codec used before fit or load")
        return torch.cat([self.scale[0].expand(self.d), self.scale[1].expand(self.d_with)])  # (d + d_with,)

    @property
    def token_local(self) -> bool:
        """As the inner codec: whether a store may append a user's new tokens without re-encoding the old ones."""
        return getattr(self.inner, "token_local", True)

    @property
    def codes_tail(self) -> bool:
        """As the inner codec: whether `encode` codes a user's newest tokens alone (`tail`, a store's append)."""
        return getattr(self.inner, "codes_tail", False)

    def _kw(self, items, context=None) -> dict:
        out = {"items": items} if self.inner.needs_items else {}
        if self.needs_context:
            out["context"] = context
        return out

    @property
    def needs_fisher(self) -> bool:
        """The inner codec fits in the Fisher metric: the plan passes `fisher=`, the (d + d_with)-wide Fisher matrix
        of [k; v] (cross terms included)."""
        return bool(getattr(self.inner, "needs_fisher", False))

    # -- fitting and coding (x: (N, d + d_with), K then V)
    def fit(self, x: torch.Tensor, seed: int, items: np.ndarray | None = None, context: torch.Tensor | None = None,
            user_offsets: np.ndarray | None = None, fisher: torch.Tensor | None = None) -> None:
        x = x.float()
        rms = torch.stack([x[:, : self.d].pow(2).mean().sqrt(), x[:, self.d :].pow(2).mean().sqrt()])
        self.scale = rms.clamp(min=1e-8)
        extra = {"user_offsets": user_offsets} if self.needs_context else {}
        if self.needs_fisher and fisher is not None:  # the error of x / s is s * error: F becomes S F S
            s = self._vector_scale().double()
            extra["fisher"] = fisher.double() * s[:, None] * s[None, :]
        self.inner.fit(x / self._vector_scale(), seed, **self._kw(items, context), **extra)

    def fields(self) -> list[Field]:
        return self.inner.fields()

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray, items: np.ndarray | None = None,
               context: torch.Tensor | None = None, tail: np.ndarray | None = None) -> dict:
        extra = {} if tail is None else {"tail": tail}  # `codes_tail` inner codecs only
        return self.inner.encode(x.float() / self._vector_scale(), user_offsets, **self._kw(items, context), **extra)

    def decode(self, fields: dict, user_offsets: np.ndarray, items: np.ndarray | None = None,
               context: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.decode(fields, user_offsets, **self._kw(items, context)).float() * self._vector_scale()

    def shared(self) -> dict[str, torch.Tensor]:
        return {"joint_scale": self.scale, **self.inner.shared()}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        rest = dict(shared)
        scale = rest.pop("joint_scale")
        if tuple(scale.shape) != (2,) or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise CkvError("joint: joint_scale is not two positive numbers")
        self.scale = scale.float()
        self.inner.load_shared(rest)

    # -- what the store, attention and inspect ask of a pool codec, forwarded
    @property
    def index(self):
        return getattr(self.inner, "index", None)

    def __getattr__(self, name):
        if name in ("pool_size", "indices", "index_fields", "index_check", "set_index", "user_dim", "user_dtype",
                    "layout"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    def fit_index(self, x: torch.Tensor, items: np.ndarray, user_offsets: np.ndarray | None = None,
                  context: torch.Tensor | None = None) -> None:
        self.inner.fit_index(x.float() / self._vector_scale(), items, user_offsets, context)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (N, d + d_with) -> K (N, d), V (N, d_with)."""
        return out[:, : self.d], out[:, self.d :]

    def stream_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension factors from the inner codec's space back to K and to V."""
        v = self._vector_scale()
        return v[: self.d], v[self.d :]


class JointPart(StreamCodec):
    """The V stream of a joint pair: nothing stored; the plan takes its vectors from `leader` (the K stream)."""

    name = JOINED

    def __init__(self, d: int, leader: str):
        self.d = check_positive_int("d", d)
        if not isinstance(leader, str) or not leader:
            raise CkvError(f"joined: leader must be a stream name, got {leader!r}")
        self.leader = leader

    def params(self) -> dict:
        return {"d": self.d, "leader": self.leader}

    def fit(self, x: torch.Tensor, seed: int) -> None:
        pass

    def fields(self) -> list[Field]:
        return []

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray) -> dict:
        return {}

    def decode(self, fields: dict, user_offsets: np.ndarray) -> torch.Tensor:
        """Zeros: the plan fills this stream from its leader's decoded vectors."""
        return torch.zeros(int(user_offsets[-1] - user_offsets[0]), self.d)

