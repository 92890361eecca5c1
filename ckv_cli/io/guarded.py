"""The one writer of every file ckv writes (artifacts, shards, indexes, checkpoints, --json, --csv, --plot).

Two halves:
- `OutputGuard(inputs)`, made when a command starts, `claim`s every output the command will write before any work
  is done. A claim refuses: a path that exists, unless --force; a path that is one of the command's inputs, even
  with --force (same resolved path, or same inode: a hard link or a symlink to it); a path claimed twice in one
  command (`-o A --json A`); a directory; a missing parent, a parent that is a file, a parent that is not
  writable or on a read-only file system; a name longer than the file system takes. It probes the directory by
  creating (and removing) the temporary file the write will use, so what the OS would refuse is refused now.
- `write(path, fn)`: `fn(tmp)` writes a temporary file beside `path` (same directory, so the rename is atomic),
  which is fsynced, given the usual permissions, renamed over `path`, and the directory fsynced. The temporary
  file is removed on every way out: an exception, Ctrl-C, SIGTERM or SIGHUP (`ckv_cli.io.signals` raises them
  as KeyboardInterrupt), a full disk. Every OSError (and safetensors' wrapped ones) becomes one line naming the
  path and the cause. Under an active guard, `write` claims a path the command did not claim up front.
- `transaction()`: writes inside it are staged (written, fsynced, not renamed) and renamed together when it ends
  without an exception; an exception or an interrupt removes them all and leaves every old file as it was (an
  artifact and its fine-tuned student checkpoint: both or neither).

    guard = OutputGuard(inputs=[("the checkpoint", ckpt), ("the --data file", data)])
    with guard:
        guard.claim(out, force, "-o")
        guard.claim(json_out, force, "--json")
        ...                                  # the work
        write(out, lambda tmp: save(tmp))    # or io.files.atomic_write / write_safetensors, which call this
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ckv_cli.errors import CkvError
from ckv_cli.io import formats
from ckv_cli.io.signals import deferred, pause

TMP_SUFFIX = ".tmp"
_TMP_EXTRA = 1 + 1 + 8 + len(TMP_SUFFIX)  # "." + name + "." + 8 random characters + ".tmp"


# ---------------------------------------------------------------------------------------------- errors


def os_error(e: BaseException, path, doing: str = "write") -> CkvError:
    """One line for an OSError (or a library error wrapping one: safetensors' 'I/O error: ... (os error 28)')."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"(?:code: |os error )(\d+)", str(e))
        code = int(m.group(1)) if m else None
    why = os.strerror(code) if code else (getattr(e, "strerror", None) or str(e).splitlines()[0][:160])
    return CkvError(f"could not {doing} {path}: {why}")


def is_os_error(e: BaseException) -> bool:
    """An OSError, or safetensors' SafetensorError around an I/O error (what it raises on a full disk)."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError"
                                      and re.search(r"IoError|I/O error|os error \d+", str(e)) is not None)


# ---------------------------------------------------------------------------------------------- temporary files

_LIVE: set[str] = set()  # temporary files not yet renamed or removed (removed at exit, as a last resort)


@atexit.register
def _remove_live() -> None:
    for tmp in list(_LIVE):
        _unlink(tmp)


def _unlink(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError:
        return
    _LIVE.discard(tmp)


def name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _tmp_prefix(path: Path) -> str:
    """'.NAME.' with NAME cut (on a character boundary) so that the temporary name fits the file system."""
    room = name_max(path.parent) - _TMP_EXTRA
    raw = os.fsencode(path.name)
    name = path.name if len(raw) <= room else os.fsdecode(raw[:max(room, 1)].decode("utf-8", "ignore").encode())
    return f".{name}."


def _new_tmp(path: Path) -> str:
    with deferred():  # the name is registered before any signal can leave it unknown
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        _LIVE.add(tmp)
    return tmp


def _fsync(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.EBADF):  # some file systems refuse a dir fsync
            raise
    finally:
        os.close(fd)


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # an overwritten file keeps its permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask  # mkstemp makes 0600; a new file gets the usual permissions


# ---------------------------------------------------------------------------------------------- staged writes


@dataclass
class Staged:
    """A file written in full beside `path` (at `tmp`, fsynced) and not yet renamed into place."""

    path: Path
    tmp: str
    done: bool = False

    def commit(self) -> None:
        if self.done:
            return
        with deferred():  # rename and bookkeeping together
            try:
                os.chmod(self.tmp, _mode_for(self.path))
                os.replace(self.tmp, self.path)
            except OSError as e:
                raise os_error(e, self.path) from None
            _LIVE.discard(self.tmp)
            self.done = True
        try:
            _fsync(self.path.parent or Path("."), directory=True)
        except OSError:
            pass  # the rename happened; a directory that cannot be fsynced is not the user's problem
        pause(f"renamed {self.path.name}")

    def discard(self) -> None:
        with deferred():
            if not self.done:
                _unlink(self.tmp)
                self.done = True


def stage(path, fn: Callable[[str], object]) -> Staged:
    """`fn(tmp)` into a temporary file beside `path`, fsynced; not yet renamed. The temporary file is removed if
    anything (an error, a signal) stops this before it returns."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)  # a symlink: write its target
    guard = current()
    if guard is not None and guard.plans_dir(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, path.parent, "create the directory") from None
    try:
        tmp = _new_tmp(path)
    except OSError as e:
        raise os_error(e, path) from None
    staged = Staged(path, tmp)
    try:
        fn(tmp)
        _fsync(tmp)
        pause(f"written {path.name}")
    except BaseException as e:
        staged.discard()
        if is_os_error(e):
            raise os_error(e, path) from None
        raise
    return staged


_TXNS: list[list[Staged]] = []


def write(path, fn: Callable[[str], object], force: bool = True, option: str = "output") -> Path:
    """Write `path` through `fn(tmp)`, atomically (see the module docstring). Under an active guard a path it has
    not claimed is claimed now (with `force`); without one, the same checks run here. Inside `transaction()`
    the rename waits for the transaction's end. Returns `path`."""
    path = Path(path)
    guard = current()
    if guard is not None:
        if not guard.claimed(path):
            guard.claim(path, force, option)
    else:
        check_target(path, force, option)
    staged = stage(path, fn)
    if _TXNS:
        _TXNS[-1].append(staged)
    else:
        staged.commit()
    return path


def where(path) -> Path:
    """Where the bytes written for `path` are now: its staged temporary file inside a transaction, else `path`."""
    path = Path(os.path.realpath(path))
    for txn in reversed(_TXNS):
        for s in txn:
            if Path(os.path.realpath(s.path)) == path and not s.done:
                return Path(s.tmp)
    return path


@contextlib.contextmanager
def transaction():
    """Stage every `write` inside; rename them all (in order) when the block ends, or remove them all on any
    exception or interrupt."""
    txn: list[Staged] = []
    _TXNS.append(txn)
    try:
        yield txn
    except BaseException:
        _TXNS.remove(txn)
        with deferred():
            for s in txn:
                s.discard()
        raise
    _TXNS.remove(txn)
    try:
        with deferred():
            for s in txn:
                s.commit()
    except BaseException:
        with deferred():
            for s in txn:
                s.discard()
        raise


# ---------------------------------------------------------------------------------------------- checks


def _stat(path: Path, option: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        for anc in reversed(path.parents):
            if anc.exists() and not anc.is_dir():
                raise CkvError(f"{option} {path}: {anc} is a file, not a directory") from None
        raise CkvError(f"{option} {path}: a part of the path is not a directory") from None
    except OSError as e:
        raise os_error(e, path, "use the output") from None


def check_target(path, force: bool = True, option: str = "output", parent_planned: bool = False) -> Path:
    """The checks of a claim that need no knowledge of the command (existing file, directory, parent, name)."""
    path = Path(path)
    size = len(os.fsencode(path.name))
    limit = name_max(path.parent if path.parent.is_dir() else Path("."))
    if size > limit:
        raise CkvError(f"output file name too long: {path.name[:24]}... ({size} bytes, the file system takes {limit})")
    st = _stat(path, option)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CkvError(f"output is a directory: {path}")
    if st is not None and not stat.S_ISREG(st.st_mode):  # a rename would replace the device itself (/dev/null)
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "special")
        raise CkvError(f"{option} {path} is {kind}, not a regular file: ckv writes a file and renames it into place, "
                       "which would replace it (use '-' for stdout where the option takes it)")
    if st is not None and not force:
        raise CkvError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent
    if parent_planned:  # a directory the command creates (--plot DIR): its nearest existing ancestor must take it
        parent = next(a for a in [parent, *parent.parents] if a.exists() or a == Path(a.anchor or "."))
    pst = _stat(parent, option)
    if pst is None:
        raise CkvError(f"output directory does not exist: {parent}")
    if not stat.S_ISDIR(pst.st_mode):
        raise CkvError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        if _read_only(parent):
            raise CkvError(f"output directory is on a read-only file system: {parent}")
        raise CkvError(f"output directory is not writable: {parent}")
    if parent_planned and parent != path.parent:
        return path
    try:  # what the OS would refuse at write time (EROFS, EACCES under an ACL, ENOSPC for inodes), now
        tmp = _new_tmp(path)
    except OSError as e:
        raise os_error(e, path) from None
    _unlink(tmp)
    return path


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- the guard

_GUARDS: list["OutputGuard"] = []


def current() -> "OutputGuard | None":
    return _GUARDS[-1] if _GUARDS else None


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return os.path.abspath(path)


@dataclass
class OutputGuard:
    """Every output of one command, claimed before the work starts (see the module docstring). `inputs`: (what it
    is, path) pairs, e.g. ("the checkpoint", ckpt), or bare paths; a `.json` index brings its shard files."""

    inputs: Iterable = ()
    _inputs: list[tuple[str, str, object]] = field(default_factory=list)  # (what, resolved path, (dev, inode))
    _claims: dict[str, str] = field(default_factory=dict)  # resolved path -> option
    _dirs: set[str] = field(default_factory=set)  # directories the command may create (--plot)

    def __post_init__(self):
        for item in self.inputs:
            what, path = item if isinstance(item, tuple) else ("an input", item)
            self.add_input(path, what)

    def __enter__(self) -> "OutputGuard":
        _GUARDS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _GUARDS.remove(self)

    def add_input(self, path, what: str = "an input") -> None:
        if path is None or str(path) in ("", "-"):
            return
        path = Path(path)
        if not path.exists():
            return
        self._inputs.append((what, _resolved(path), _identity(path)))
        if path.suffix.lower() == ".json" and path.is_file():
            for name in _index_files(path):
                self.add_input(path.parent / name, f"a file of {what}")

    def claimed(self, path) -> bool:
        return _resolved(Path(path)) in self._claims

    def plans_dir(self, directory) -> bool:
        return _resolved(Path(directory)) in self._dirs

    def claim_dir(self, directory, option: str) -> Path | None:
        """A directory the command writes files into and creates if missing (--plot DIR)."""
        if directory is None:
            return None
        directory = Path(directory)
        st = _stat(directory, option)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise CkvError(f"{option} {directory} exists and is not a directory")
        self._dirs.add(_resolved(directory))
        return directory

    def claim(self, path, force: bool = False, option: str = "output") -> Path | None:
        """Refuse now what writing `path` later would get wrong or fail on; None for no path or '-' (stdout)."""
        if path is None or str(path) == "-":
            return None
        path = Path(path)
        key, ident = _resolved(path), _identity(path)
        for what, resolved, inode in self._inputs:
            if resolved == key or (ident is not None and ident == inode):
                raise CkvError(f"{option} {path} is {what} this command reads; write the output elsewhere (--force "
                               "never overwrites an input)")
        if key in self._claims and option in (self._claims[key], "output"):
            return path  # claimed again by the same option, or by a writer that does not know its option
        if key in self._claims:
            raise CkvError(f"{option} {path} is also the {self._claims[key]} output of this command; give each output "
                           "its own path")
        check_target(path, force, option, parent_planned=self.plans_dir(path.parent))
        self._claims[key] = option
        return path


def _index_files(index: Path) -> list[str]:
    """The shard and shared-file names a ckv index lists (nothing when it is not one, or unreadable)."""
    import json

    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict) or data.get("format") != formats.INDEX:
        return []
    entries = [data.get("shared")] + list(data.get("shards") or [])
    return [e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
            and Path(e["file"]).name == e["file"]]
