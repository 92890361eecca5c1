"""A set of files replaced as a unit: a sharded artifact (shards, shared file, index; written by
`ckv_cli.pipeline.shard`).

The index is the commit point. The new files are written beside the old set under names no file has (the
canonical names when they are free, else the same names with a generation tag: `NAME.1-00000-of-00004...`), so
the old index and its files stay valid while the new set is written; the index is then swapped by one rename;
only then are the old set's files (those the old index lists) removed. Whatever stops the run before the swap
(an error, Ctrl-C, SIGTERM, a full disk) removes the new files: a fresh run leaves nothing, a `--force` run
leaves the old set exactly as it was. A hard kill (SIGKILL, power loss) after the swap may leave old files
beside the new set, never a broken index.

    fs = FileSet(index, force, names=lambda g: [...file names of generation g...], option="-o")
    with fs:
        ...write fs.paths (any process may)...
        fs.commit(lambda: write_index(...))
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ckv_cli.errors import CkvError
from ckv_cli.io.guarded import _index_files, check_target, current
from ckv_cli.io.signals import deferred

MAX_GENERATIONS = 100


class FileSet:
    def __init__(self, index, force: bool, names: Callable[[int], list[str]], option: str = "-o"):
        """`names(g)`: the set's file names (beside the index) for generation g (0: the canonical names)."""
        self.index, self.force, self.option = Path(index), force, option
        guard = current()
        if guard is not None:
            if not guard.claimed(self.index):
                guard.claim(self.index, force, option)
        else:
            check_target(self.index, force, option)
        self.old = [self.index.parent / n for n in _index_files(self.index)] if self.index.exists() else []
        for g in range(MAX_GENERATIONS):
            paths = [self.index.parent / n for n in names(g)]
            taken = next((p for p in paths if p.exists() or p.is_symlink()), None)
            if taken is None:
                break
            if not force:
                raise CkvError(f"{taken} exists; pass --force to overwrite it")
        else:
            raise CkvError(f"{self.index.parent}: {MAX_GENERATIONS} generations of {self.index.name}'s files exist; "
                           "remove the old ones")
        for p in paths:  # free names: the checks of the directory and name length
            if guard is not None:
                guard.claim(p, False, option)
            else:
                check_target(p, False, option)
        self.paths, self.generation, self.committed = paths, g, False

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if not self.committed:
            self.rollback()

    def rollback(self) -> None:
        """Remove every new file (the old set and index are untouched)."""
        with deferred():
            for p in self.paths:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass

    def commit(self, write_index: Callable[[], object]):
        """Write the index (staged, then renamed over the old one), then remove the old set's files that the new
        set does not reuse. Returns what `write_index` returns."""
        from ckv_cli.io import guarded

        staged: list = []
        guarded._TXNS.append(staged)
        try:
            result = write_index()  # staged: written and fsynced beside the old index, not renamed yet
        except BaseException:
            with deferred():
                for s in staged:
                    s.discard()
            raise
        finally:
            guarded._TXNS.remove(staged)
        with deferred():  # the swap and the removal of the old files are not cut by a signal (raised after)
            try:
                for s in staged:
                    s.commit()
            except BaseException:
                for s in staged:
                    s.discard()
                raise
            self.committed = True
            keep = {str(p.resolve()) for p in [self.index, *self.paths]}
            for p in self.old:
                if str(p.resolve()) not in keep:
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass
        return result
