"""CollectiveKV (Li et al., "CollectiveKV: ...", ICLR 2026, arXiv 2601.19178): a global pool shared by all users,
a router that picks one pool entry per token, and an r-dim user-specific part.

Layouts:
- `residual`: x ~ P[idx] + B u, B a (d, r) orthonormal basis (PCA of the pool's residuals), u = B^T (x - P[idx]);
- `concat` (the paper's): in the SVD basis R of the calibration vectors, the pool gives d - r coordinates and
  the user part the r coordinates the pool approximates worst: x ~ mu + R [P[idx] ; u].
Initialisation needs no gradients: k-means for the pool; the router `argmax(W x + b)` with W = 2P, b = -|P|^2 is
exactly nearest-entry assignment. Per token it stores the index (packed at ceil(log2 m) bits) and r values
(int8 with one fp16 scale per user, or fp16). `pool_dtype` fp16 stores the pool (and the router derived from
it) at half the shared bytes; the pool is rounded to fp16 right after k-means, so the encoder routes to exactly
the entries the reader holds. `metric="fisher"` fits the pool and routes in the model's Fisher metric
(`ckv_cli.codecs.metric`; residual layout). `index="item"` codes the index given the token's item instead
(`ckv_cli.codecs.itemindex`: a position in the item's list of pool entries, or an escape to the full index).
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int, dequantize_per_user, quantize_per_user
from ckv_cli.codecs.bits import bits_for
from ckv_cli.codecs.itemindex import AUTO, IndexCoding, squared_error
from ckv_cli.codecs.kmeans import kmeans
from ckv_cli.codecs.metric import check_factor, check_metric, coords, fit_pool, fitted_factor, pool_coords, router
from ckv_cli.codecs.nearest import linear_argmax, linear_topk
from ckv_cli.errors import CkvError


class CollectiveCodec(IndexCoding, StreamCodec):
    name = "collective"

    def __init__(self, d: int, pool_size: int = 8192, user_dim: int = 0, layout: str = "residual",
                 user_dtype: str = "int8", iters: int = 20, pool_dtype: str = "fp32", index: str = "flat",
                 index_bits=AUTO, escape_tol: float = 0.0, metric: str = "l2", index_lists: str = "count",
                 index_fill: int = 0):
        self.d = check_positive_int("d", d)
        self.pool_size = check_positive_int("pool size", pool_size, 2)
        self.user_dim = check_positive_int("user dim", user_dim, 0)
        if layout not in ("residual", "concat"):
            raise CkvError(f"layout must be 'residual' or 'concat', got {layout!r}")
        if user_dtype not in ("int8", "fp16"):
            raise CkvError(f"user dtype must be 'int8' or 'fp16', got {user_dtype!r}")
        if self.user_dim >= d:
            raise CkvError(f"user dim ({user_dim}) must be smaller than the vector width ({d})")
        if pool_dtype not in ("fp32", "fp16"):
            raise CkvError(f"pool dtype must be 'fp32' or 'fp16', got {pool_dtype!r}")
        self.layout, self.user_dtype, self.iters, self.pool_dtype = layout, user_dtype, iters, pool_dtype
        self.metric = check_metric(metric)
        if self.metric != "l2" and layout != "residual":
            raise CkvError(f"metric={metric} needs the residual layout (the concat layout has its own basis)")
        self.metric_L = None  # (d, d) factor of the Fisher metric (`metric="fisher"`), set by fit or load
        self.bits = bits_for(self.pool_size)
        self.pool = self.router_w = self.router_b = self.basis = self.mean = None
        self.user_coords = self.pool_coords = None
        self._init_index(self.pool_size, index, index_bits, escape_tol, index_lists, index_fill)

    def params(self) -> dict:
        out = {"d": self.d, "pool_size": self.pool_size, "user_dim": self.user_dim, "layout": self.layout,
               "user_dtype": self.user_dtype}
        if self.pool_dtype != "fp32":  # absent from artifacts written before the option existed
            out["pool_dtype"] = self.pool_dtype
        if self.metric != "l2":
            out["metric"] = self.metric
        return {**out, **self.index_params()}

    def _stored(self, pool: torch.Tensor) -> torch.Tensor:
        """The pool as the artifact will hold it (rounded to fp16 with `pool_dtype` fp16), in fp32."""
        return pool.half().float() if self.pool_dtype == "fp16" else pool

    # -- fitting -------------------------------------------------------------------------------------------
    @property
    def needs_fisher(self) -> bool:
        """The plan passes `fisher=` (the stream's Fisher matrix, `ckv_cli.tasks.fisher`) to `fit`."""
        return self.metric == "fisher"

    def fit(self, x: torch.Tensor, seed: int, items: np.ndarray | None = None, fisher: torch.Tensor | None = None) -> None:
        x = x.float()
        if self.needs_fisher:
            self.metric_L = fitted_factor(fisher, self.d)
        if x.shape[0] < self.pool_size:  # k-means would return fewer entries than the metadata declares
            raise CkvError(f"a pool of {self.pool_size} entries needs at least as many calibration vectors, got "
                           f"{x.shape[0]} (use more calibration users or a smaller pool)")
        r = self.user_dim
        if self.layout == "residual":
            if self.pool_dtype == "fp32" and self.metric_L is None:
                pool, assign = kmeans(x, self.pool_size, seed=seed, iters=self.iters, return_assign=True)
                self._set_pool(pool)
            else:  # the rounded pool's (or the metric's) nearest entries are the tied router's choice
                self._set_pool(self._stored(fit_pool(x, self.pool_size, seed, self.iters, self.metric_L)))
                assign = self._route(x)
            res = x - self.pool[assign]  # (N, d); assign is what the tied router picks
            self.basis = torch.linalg.svd(res, full_matrices=False).Vh[:r].T.contiguous() if r else torch.zeros(self.d, 0)
            self.mean = torch.zeros(self.d)
        else:
            self.mean = x.mean(0)
            # (d, d) rotation R; full when fewer vectors than dims (U is then small), else Vh would be (N, d)
            self.basis = torch.linalg.svd(x - self.mean, full_matrices=x.shape[0] < self.d).Vh.T.contiguous()
            z = (x - self.mean) @ self.basis  # (N, d)
            if r:
                full, assign = kmeans(z, self.pool_size, seed=seed, iters=max(3, self.iters // 4), return_assign=True)
                err = ((z - full[assign]) ** 2).mean(0)  # (d,) error per coordinate
                user = err.topk(r).indices.sort().values
            else:
                user = torch.zeros(0, dtype=torch.long)
            keep = torch.ones(self.d, dtype=torch.bool)
            keep[user] = False
            self.user_coords, self.pool_coords = user, keep.nonzero().squeeze(1)
            self._set_pool(self._stored(kmeans(z[:, self.pool_coords], self.pool_size, seed=seed, iters=self.iters)))
        self.fit_index(x, items)  # item-coded: the item lists, from the calibration tokens' entries

    def index_inputs(self, x: torch.Tensor, items: np.ndarray, user_offsets: np.ndarray | None = None,
                     context: torch.Tensor | None = None, neighbours: int = 0):
        zp = self._pool_part(x)
        near = linear_topk(zp, self.router_w, self.router_b, neighbours) if neighbours else None  # (N, k)
        return self._route(zp), self._error(zp), near

    def _pool_part(self, x: torch.Tensor) -> torch.Tensor:
        """The coordinates the pool approximates: (N, d) or (N, d - r)."""
        z = self._coords(x)
        return z[:, self.pool_coords] if self.layout == "concat" else z

    def _error(self, zp: torch.Tensor):
        """Squared error of tokens (rows of `zp`) against pool entries (in the metric), for the item index's escape
        tolerance."""
        return squared_error(coords(zp, self.metric_L), pool_coords(self, self.pool, self.metric_L))

    def _set_pool(self, pool: torch.Tensor) -> None:
        self.pool = pool.contiguous()  # (m, d) or (m, d - r)
        self.router_w, self.router_b = router(self.pool, self.metric_L)  # x @ W^T + b, argmax = nearest entry
        self.router_tied = True  # until distillation trains the router apart from the pool

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """argmax of the router logits x @ W^T + b (chunked, blocked argmax: `ckv_cli.codecs.nearest`)."""
        return linear_argmax(x, self.router_w, self.router_b)

    def _coords(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.basis if self.layout == "concat" else x.float()

    # -- distillation -------------------------------------------------------------------------------------
    def trainable(self) -> list[torch.Tensor]:
        """Pool and router as leaf tensors that require grad (the basis and user part stay fixed)."""
        for name in ("pool", "router_w", "router_b"):
            setattr(self, name, getattr(self, name).detach().clone().requires_grad_(True))
        return [self.pool, self.router_w, self.router_b]

    def freeze(self) -> None:
        for name in ("pool", "router_w", "router_b"):
            setattr(self, name, getattr(self, name).detach())
        self.pool = self._stored(self.pool)  # a trained pool goes back to what the artifact holds (fp16)
        self.router_tied = False

    def gated_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time decode (the paper's gated top-1): sigmoid(top logit) * P[idx] so gradients reach the
        router; returns (x_hat (N, d), top-1 router logit (N,)). Inference uses P[idx] without the gate. The
        argmax runs in chunks without autograd; only the chosen logit is rebuilt with gradients."""
        z = self._coords(x)
        zp = (z[:, self.pool_coords] if self.layout == "concat" else z).detach()
        with torch.no_grad():
            idx = self._route(zp)  # (N,)
        top = (zp * self.router_w[idx]).sum(1) + self.router_b[idx]  # (N,)
        base = torch.sigmoid(top)[:, None] * self.pool[idx]
        if self.layout == "residual":
            u = (z - self.pool[idx]).detach() @ self.basis  # (N, r)
            return base + u @ self.basis.T, top
        zh = torch.zeros_like(z)
        zh[:, self.pool_coords] = base
        zh[:, self.user_coords] = z[:, self.user_coords]
        return zh @ self.basis.T + self.mean, top

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, m) router logits with gradients (for the load-balance loss on a token sample)."""
        z = self._coords(x)
        zp = (z[:, self.pool_coords] if self.layout == "concat" else z).detach()
        return zp @ self.router_w.T + self.router_b

    # -- storage -------------------------------------------------------------------------------------------
    def fields(self) -> list[Field]:
        out = self.index_fields()
        if self.user_dim:
            out.append(Field("user", "token", dtype=self.user_dtype.replace("fp", "float"), width=self.user_dim))
            if self.user_dtype == "int8":
                out.append(Field("scale", "user", dtype="float16", width=1))
        return out

    def encode_index(self, x: torch.Tensor, user_offsets: np.ndarray,
                     items: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """(index fields, user part u (N, r) in float) of a batch of tokens: the router's entries, coded flat or
        given the items (the item index's tolerance may take a listed entry instead: u is taken against it)."""
        if self.pool is None:
            raise CkvError("codec used before fit or load")
        z = self._coords(x)
        zp = z[:, self.pool_coords] if self.layout == "concat" else z
        out, idx = self.index_encode(self._route(zp), items, user_offsets, self._error(zp))
        idx = torch.from_numpy(idx)
        u = z[:, self.user_coords] if self.layout == "concat" else (z - self.pool[idx]) @ self.basis  # (N, r)
        return out, u

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray, items: np.ndarray | None = None) -> dict[str, np.ndarray]:
        out, u = self.encode_index(x, user_offsets, items)
        if self.user_dim:
            if self.user_dtype == "int8":
                out["user"], out["scale"] = quantize_per_user(u, user_offsets)
            else:
                out["user"] = u.half().numpy()
        return out

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray,
               items: np.ndarray | None = None) -> torch.Tensor:
        idx = torch.from_numpy(self.indices(fields, user_offsets, items))
        if self.user_dim:
            u = (dequantize_per_user(fields["user"], fields["scale"], user_offsets) if self.user_dtype == "int8"
                 else torch.from_numpy(fields["user"].astype(np.float32)))
        if self.layout == "residual":
            x = self.pool[idx]  # (N, d)
            return x + u @ self.basis.T if self.user_dim else x
        z = torch.empty(len(idx), self.d)
        z[:, self.pool_coords] = self.pool[idx]
        if self.user_dim:
            z[:, self.user_coords] = u
        return z @ self.basis.T + self.mean  # back from the SVD basis

    def shared(self) -> dict[str, torch.Tensor]:
        out = {"pool": self.pool.half() if self.pool_dtype == "fp16" else self.pool, "basis": self.basis, "mean": self.mean}
        if self.metric_L is not None:
            out["metric"] = self.metric_L
        if not self.router_tied:  # a tied router (W = 2P, b = -|P|^2) is derived from the pool on load
            out.update(router_w=self.router_w, router_b=self.router_b)
        if self.layout == "concat":
            out["user_coords"] = self.user_coords
            out["pool_coords"] = self.pool_coords
        out.update(self.index_shared())
        return out

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        if self.needs_fisher:  # before the pool: the tied router is derived from both
            self.metric_L = check_factor(shared["metric"], self.d)
        self._set_pool(shared["pool"].float())
        if "router_w" in shared:
            self.router_w, self.router_b, self.router_tied = shared["router_w"].float(), shared["router_b"].float(), False
        self.basis, self.mean = shared["basis"].float(), shared["mean"].float()
        if self.layout == "concat":
            self.user_coords, self.pool_coords = shared["user_coords"].long(), shared["pool_coords"].long()
        if self.pool.shape[0] != self.pool_size:
            raise CkvError(f"pool has {self.pool.shape[0]} entries, the metadata says {self.pool_size}")
        self.index_load_shared(shared)
