"""Readers for interaction logs: CSV/TSV (column mapping), Parquet, RecBole `.inter`, MovieLens `ratings.dat`.

Every reader returns a `Log`: raw user ids, raw item ids, timestamps and optional ratings, in file order.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckv_cli.errors import CkvError


@dataclass
class Log:
    """Raw interaction log in file order (row i of every array is line i of the file)."""

    users: np.ndarray  # (N,) str
    items: np.ndarray  # (N,) str
    timestamps: np.ndarray  # (N,) int64
    ratings: np.ndarray | None  # (N,) float32
    item_genres: dict[str, list[str]] | None = None
    source: str = ""
    recognised: dict[str, str] | None = None  # role -> column found by a common name (`ALIASES`), not given


    def __len__(self) -> int:
        return len(self.users)


DEFAULT_COLUMNS = {"user": "user", "item": "item", "timestamp": "timestamp", "rating": "rating"}
# Common names of each column, recognised without --columns (compared in lower case, without '_', '-', ' ', and
# without a RecBole ':type' suffix). A column --columns names is never guessed; two candidates for one role are
# refused with one line.
ALIASES = {
    "user": ("user", "userid", "uid", "users", "customerid", "customer", "clientid", "visitorid", "memberid",
             "accountid", "reviewerid", "viewerid", "personid"),
    "item": ("item", "itemid", "iid", "items", "movieid", "movie", "productid", "product", "asin", "sku", "articleid",
             "trackid", "songid", "bookid", "isbn", "videoid", "contentid", "businessid", "animeid", "recipeid",
             "gameid", "courseid", "newsid", "poiid"),
    "timestamp": ("timestamp", "ts", "time", "unixtime", "unixtimestamp", "epoch", "timestamps", "eventtime",
                  "unixreviewtime", "datetimeunix"),
    "rating": ("rating", "ratings", "score", "stars", "star", "rate", "overall", "preference"),
}


def _norm(name: str) -> str:
    return "".join(c for c in name.split(":")[0].lower() if c not in "_- ")


def resolve_columns(header: list[str], given: dict[str, str] | None, path) -> tuple[dict[str, str], dict[str, str]]:
    """(mapping role -> column, the roles found by a common name): --columns first, then ckv's own names, then
    `ALIASES`. A role with no column keeps ckv's name (reported missing later, rating optional)."""
    mapping, recognised = {**DEFAULT_COLUMNS, **(given or {})}, {}
    used = {mapping[r] for r in mapping if mapping[r] in header}
    for role in ("user", "item", "timestamp", "rating"):
        if (given and role in given) or mapping[role] in header:
            continue
        found = [h for h in header if _norm(h) in ALIASES[role] and h not in used]
        if len(found) > 1:
            raise CkvError(f"{path}: columns {', '.join(found)} could each be the {role}; name one with "
                           f"--columns {role}=NAME")
        if found:
            mapping[role], recognised[role] = found[0], found[0]
            used.add(found[0])
    return mapping, recognised


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CkvError(f"data file not found: {path}")
    if path.is_dir():
        raise CkvError(f"expected a file, got a directory: {path}")
    if not os.access(path, os.R_OK):
        raise CkvError(f"data file is not readable: {path}")
    if path.stat().st_size == 0:
        raise CkvError(f"data file is empty: {path}")


def _to_int64(values, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError as e:
        raise CkvError(f"{path}: column '{what}' is not numeric ({e})") from None
    if not np.all(np.isfinite(arr)):
        raise CkvError(f"{path}: column '{what}' contains NaN or Inf")
    if arr.size and np.abs(arr).max() >= 2.0**62:
        raise CkvError(f"{path}: column '{what}' has values too large for a 64-bit integer")
    return arr.astype(np.int64)


def _to_float(values, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float32)
    except ValueError as e:
        raise CkvError(f"{path}: column '{what}' is not numeric ({e})") from None
    if not np.all(np.isfinite(arr)):
        raise CkvError(f"{path}: column '{what}' contains NaN or Inf")
    return arr


def _from_columns(cols: dict[str, list], mapping: dict[str, str], path: Path, header: list[str]) -> Log:
    missing = [mapping[k] for k in ("user", "item", "timestamp") if mapping[k] not in cols]
    if missing:
        raise CkvError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)}); map them with --columns")
    n = len(cols[mapping["user"]])
    if n == 0:
        raise CkvError(f"{path}: no rows after the header")
    rating_col = mapping.get("rating")
    ratings = _to_float(cols[rating_col], rating_col, path) if rating_col and rating_col in cols else None
    return Log(
        users=np.asarray(cols[mapping["user"]], dtype=str),
        items=np.asarray(cols[mapping["item"]], dtype=str),
        timestamps=_to_int64(cols[mapping["timestamp"]], mapping["timestamp"], path),
        ratings=ratings,
        source=str(path),
    )


def read_delimited(path: str | Path, columns: dict[str, str] | None = None, delimiter: str | None = None) -> Log:
    """CSV or TSV with a header row; `columns` maps ckv's names (user, item, timestamp, rating) to the file's."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            sample = f.readline()
            if delimiter is None:
                delimiter = "\t" if "\t" in sample else ","
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter)
            if "\x00" in sample:
                raise CkvError(f"{path}: not a text file")
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise CkvError(f"data file is empty: {path}") from None
            dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
            if dup is not None:
                raise CkvError(f"{path}: column '{dup}' appears twice in the header")
            mapping, recognised = resolve_columns(header, columns, path)
            cols: dict[str, list] = {h: [] for h in header}
            ids = [(header.index(mapping[k]), k) for k in ("user", "item") if mapping[k] in header]
            lineno = 1  # the line the next record starts on (a quoted field may span lines)
            for row in reader:
                start, lineno = lineno + 1, reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise CkvError(f"{path}:{start}: expected {len(header)} fields, got {len(row)}")
                for i, what in ids:
                    if not row[i].strip():
                        raise CkvError(f"{path}:{start}: empty {what} id")
                for h, v in zip(header, row):
                    cols[h].append(v)
    except csv.Error as e:
        why = str(e)
        if "field limit" in why:
            why = f"a field runs past {csv.field_size_limit():,} characters (an unterminated quote?)"
        elif "NUL" in why:
            why = "a NUL byte (not a text file?)"
        raise CkvError(f"{path}:{lineno + 1}: not valid CSV: {why}") from None
    except OSError as e:
        raise CkvError(f"could not read {path}: {e.strerror or e}") from None
    log = _from_columns(cols, mapping, path, header)
    log.recognised = recognised
    return log


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise CkvError("reading Parquet needs pyarrow: pip install 'ckv-cli[parquet]'") from None
    return pq


def log_of_table(table, mapping: dict[str, str], path, first_row: int = 0) -> Log:
    """A `Log` of a pyarrow table read from `path` (rows `first_row`...: a row group of it): ids as str() of each
    value, timestamps and ratings checked as every reader checks them; CkvError naming the first empty id. Every
    Parquet reader of ckv (one file, a dataset in one process, a dataset read by Ray's workers) reads rows here, so
    the same file gives the same log however it is read. Values go through Python (`to_pylist`), as they always
    have here: pyarrow's numpy conversions import pandas (~1 s)."""
    path = Path(path)
    header = list(table.column_names)
    missing = [mapping[k] for k in ("user", "item", "timestamp") if mapping[k] not in header]
    if missing:
        raise CkvError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)}); map them with --columns")
    ids = {}
    for what in ("user", "item"):
        values = table.column(mapping[what]).to_pylist()
        empty = next((i for i, v in enumerate(values) if v is None or not str(v).strip()), None)
        if empty is not None:
            raise CkvError(f"{path}: empty {what} id in row {first_row + empty + 1}")
        ids[what] = np.asarray(values, dtype=str)
    rating_col = mapping.get("rating")
    ratings = (_to_float(table.column(rating_col).to_pylist(), rating_col, path)
               if rating_col and rating_col in header else None)
    ts = _to_int64(table.column(mapping["timestamp"]).to_pylist(), mapping["timestamp"], path)
    return Log(users=ids["user"], items=ids["item"], timestamps=ts, ratings=ratings, source=str(path))


def read_parquet(path: str | Path, columns: dict[str, str] | None = None) -> Log:
    """Parquet via pyarrow (optional dependency)."""
    path = Path(path)
    _check_file(path)
    pq = _pyarrow()
    try:
        table = pq.ParquetFile(path).read()  # not pq.read_table, which imports pyarrow.dataset (and pandas): ~1 s
    except Exception as e:  # pyarrow raises many types for bad files
        raise CkvError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    mapping, recognised = resolve_columns(list(table.column_names), columns, path)
    log = log_of_table(table, mapping, path)
    if len(log) == 0:
        raise CkvError(f"{path}: no rows after the header")
    log.recognised = recognised
    return log


# ---------------------------------------------------------------------------------------------- Parquet datasets

PARQUET_SUFFIXES = (".parquet", ".pq")


def parquet_dataset(spec: str) -> list[Path] | None:
    """The files of the Parquet dataset `spec` names: a glob pattern (`logs/day-*.parquet`, `**` recursive), or
    a directory holding .parquet files (at any depth; names starting with '.' or '_' skipped, as Spark's
    `_SUCCESS`). Sorted by path: the log's order is file by file, rows in file order. None when `spec` is
    neither a pattern nor such a directory (a directory without Parquet files is refused as a file would be)."""
    import glob

    if Path(spec).is_file():
        return None
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                       if p.lower().endswith(PARQUET_SUFFIXES) and Path(p).is_file())
        if not files:
            raise CkvError(f"no Parquet files match {spec}")
        return files
    root = Path(spec)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(PARQUET_SUFFIXES)
                   and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
    return files or None


def dataset_name(spec: str) -> str:
    """What a report calls the log `spec` names: a file's or directory's name, or the pattern itself."""
    return spec if any(c in spec for c in "*?[") else Path(spec).name


@dataclass(frozen=True)
class Piece:
    """One row group of one file of a Parquet dataset: what one read task reads. `seq` numbers its rows in the
    log's order (`file << 40 | row in the file`)."""

    file: int
    path: str
    row_group: int
    first_row: int
    rows: int

    @property
    def seq0(self) -> int:
        return (self.file << SEQ_FILE_SHIFT) | self.first_row


SEQ_FILE_SHIFT = 40  # rows per file below 2^40


def parquet_pieces(files: list[Path]) -> list[Piece]:
    """Every row group of every file (footers only are read), in the log's order."""
    pq = _pyarrow()
    out = []
    for i, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:
            raise CkvError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
        row = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            out.append(Piece(i, str(path), g, row, n))
            row += n
    return out


def read_piece(piece: Piece, columns: dict[str, str] | None = None) -> Log:
    """One row group as a `Log` (checked as `read_parquet` checks a file)."""
    pq = _pyarrow()
    try:
        table = pq.ParquetFile(piece.path).read_row_group(piece.row_group)
    except Exception as e:
        raise CkvError(f"{piece.path}: not a readable Parquet file ({type(e).__name__})") from None
    mapping, _ = resolve_columns(list(table.column_names), columns, piece.path)
    return log_of_table(table, mapping, piece.path, piece.first_row)


def read_parquet_dataset(files: list[Path], columns: dict[str, str] | None = None) -> Log:
    """A Parquet dataset read in this process: every file's rows, file by file (the order `parquet_dataset`
    gives), as one `Log`."""
    logs = [read_piece(p, columns) for p in parquet_pieces(files)]
    if not logs or sum(len(x) for x in logs) == 0:
        raise CkvError(f"{files[0].parent if files else 'the dataset'}: no rows in its {len(files)} Parquet file(s)")
    ratings = None if any(x.ratings is None for x in logs) else np.concatenate([x.ratings for x in logs])
    return Log(users=np.concatenate([x.users for x in logs]), items=np.concatenate([x.items for x in logs]),
               timestamps=np.concatenate([x.timestamps for x in logs]), ratings=ratings,
               source=str(files[0].parent))


def read_recbole_inter(path: str | Path) -> Log:
    """RecBole atomic file: TSV whose header names are `name:type` (user_id:token, item_id:token, ...)."""
    path = Path(path)
    _check_file(path)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
    names = [h.split(":")[0] for h in header]
    mapping = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"}
    if not all(mapping[k] in names for k in ("user", "item", "timestamp")):
        raise CkvError(f"{path}: not a RecBole .inter file (header: {', '.join(header)})")
    log = read_delimited(path, columns={k: f"{v}:{_type(header, v)}" for k, v in mapping.items() if v in names}, delimiter="\t")
    item_file = path.with_suffix(".item")
    if item_file.is_file():
        log.item_genres = read_recbole_genres(item_file)
    return log


def _type(header: list[str], name: str) -> str:
    return next(h.split(":", 1)[1] for h in header if h.split(":")[0] == name)


def read_recbole_genres(path: Path) -> dict[str, list[str]]:
    """Genres per raw item id from a RecBole `.item` file (column `genre` or `class`, space separated)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t")
        header = [h.split(":")[0] for h in next(reader)]
        gcol = next((header.index(c) for c in ("genre", "class", "genres") if c in header), None)
        if gcol is None or "item_id" not in header:
            return {}
        icol = header.index("item_id")
        return {row[icol]: row[gcol].split() for row in reader if len(row) > max(icol, gcol)}


def read_movielens_dat(path: str | Path) -> Log:
    """MovieLens `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header; genres from `movies.dat` beside it."""
    path = Path(path)
    _check_file(path)
    users, items, ratings, times = [], [], [], []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != 4:
                raise CkvError(f"{path}:{lineno}: expected UserID::MovieID::Rating::Timestamp")
            users.append(parts[0]); items.append(parts[1]); ratings.append(parts[2]); times.append(parts[3])
    if not users:
        raise CkvError(f"data file is empty: {path}")
    genres = None
    movies = path.with_name("movies.dat")
    if movies.is_file():
        genres = {}
        with open(movies, encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("::")
                if len(parts) == 3:
                    genres[parts[0]] = parts[2].split("|")
    return Log(
        users=np.asarray(users, dtype=str),
        items=np.asarray(items, dtype=str),
        timestamps=_to_int64(times, "timestamp", path),
        ratings=_to_float(ratings, "rating", path),
        item_genres=genres,
        source=str(path),
    )


def read_log(path: str | Path, columns: dict[str, str] | None = None) -> Log:
    """Pick a reader from the file name: `.inter`, `ratings.dat`/`.dat`, `.parquet`, else CSV/TSV; a directory
    of Parquet files or a glob pattern is a Parquet dataset (`parquet_dataset`)."""
    files = parquet_dataset(str(path))
    if files is not None:
        return read_parquet_dataset(files, columns)
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".inter"):
        return read_recbole_inter(path)
    if name.endswith(".dat"):
        return read_movielens_dat(path)
    if name.endswith((".parquet", ".pq")):
        return read_parquet(path, columns)
    return read_delimited(path, columns)
