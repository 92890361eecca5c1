"""What every importer shares: the result type, weight-mapping checks, and writing the ckv checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckv_cli.errors import CkvError
from ckv_cli.io.files import check_output, sha256_file
from ckv_cli.models.checkpoint import save_checkpoint

__all__ = ["Imported", "check_state", "load_mapped", "preflight", "sha256_file", "write"]


@dataclass
class Imported:
    """A converted model (eval mode, weights loaded) and everything its checkpoint records."""

    model: torch.nn.Module
    item_vocab: list[str]  # raw item ids, [0] = "<pad>"
    source: dict  # framework, version, sha256, path
    dataset: str = ""
    fingerprint: str = ""
    notes: dict = field(default_factory=dict)  # what the conversion decided (vocabulary origin, ...)


def check_state(src: Path, state: dict, expected: dict[str, tuple], what: str) -> None:
    """Every expected tensor present with its shape and a float dtype, finite, and nothing else (one line)."""
    for name, shape in expected.items():
        if name not in state:
            raise CkvError(f"{src}: tensor '{name}' is missing ({what})")
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise CkvError(f"{src}: '{name}' is not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise CkvError(f"{src}: tensor '{name}' has shape {tuple(t.shape)}, the architecture implies {tuple(shape)}")
        if not t.is_floating_point():
            raise CkvError(f"{src}: tensor '{name}' is {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise CkvError(f"{src}: tensor '{name}' contains NaN or Inf")
    extra = sorted(set(state) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CkvError(f"{src}: unexpected tensor '{extra[0]}'{more}: not part of the {what}")


def load_mapped(model: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load ckv-named float32 tensors into `model` (strict: the mapping must name every parameter)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    if missing:  # a mapping bug, not the user's input
        raise AssertionError(f"importer left {missing} unset")
    model.load_state_dict({k: v.detach().to(torch.float32).reshape(own[k].shape).contiguous() for k, v in mapped.items()})
    return model.eval()


def write(imported: Imported, out: str | Path, force: bool = True) -> None:
    """The ordinary ckv checkpoint of an imported model (`ckv_cli.models.checkpoint.save_checkpoint`: written
    through `ckv_cli.io.files.atomic_write`, an existing file replaced only with `force`)."""
    save_checkpoint(imported.model, out, dataset=imported.dataset, fingerprint=imported.fingerprint,
                    item_vocab=imported.item_vocab, metrics={},
                    train={"imported": True, **imported.notes}, force=force, source=imported.source)


def preflight(src: Path, out: str | Path | None, force: bool) -> None:
    if not src.exists():
        raise CkvError(f"checkpoint not found: {src}")
    if src.is_dir():
        raise CkvError(f"expected a checkpoint file, got a directory: {src}")
    check_output(Path(out) if out is not None else None, force)
