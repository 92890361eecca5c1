"""Readers, sequences/splits/vocabularies, named datasets and batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckv_cli.data import DATASETS, build, cache_dir, fetch, load, read_log
from ckv_cli.data.batching import history_batch, pad_right
from ckv_cli.data.readers import Log
from ckv_cli.errors import CkvError


def write(path, text: str):
    path.write_text(text, encoding="utf-8", newline="")  # keep "\n" as written
    return path


MAPPING = {"user": "uid", "item": "movie", "timestamp": "ts", "rating": "stars"}


# ---------------------------------------------------------------- readers


def test_csv_with_column_mapping(tmp_path):
    p = write(tmp_path / "log.csv", "uid,movie,ts,stars,extra\nu2,m9,300,4.5,x\nu1,m1,100,2,y\nu2,m3,200,5,z\n")
    log = read_log(p, MAPPING)
    assert log.users.tolist() == ["u2", "u1", "u2"]  # file order, nothing sorted yet
    assert log.items.tolist() == ["m9", "m1", "m3"]
    assert log.timestamps.dtype == np.int64 and log.timestamps.tolist() == [300, 100, 200]
    assert log.ratings.dtype == np.float32 and log.ratings.tolist() == [4.5, 2.0, 5.0]
    assert len(log) == 3
    assert log.item_genres is None


def test_tsv_is_detected_from_tabs(tmp_path):
    p = write(tmp_path / "log.tsv", "uid\tmovie\tts\nu1\tm,1\t10\nu1\tm2\t20\n")  # a comma inside a TSV field
    log = read_log(p, {"user": "uid", "item": "movie", "timestamp": "ts"})
    assert log.items.tolist() == ["m,1", "m2"]
    assert log.timestamps.tolist() == [10, 20]
    assert log.ratings is None  # no rating column: no ratings, not an error


def test_default_column_names_need_no_mapping(tmp_path):
    log = read_log(write(tmp_path / "log.csv", "user,item,timestamp,rating\n1,2,3,4\n"))
    assert (log.users.tolist(), log.items.tolist(), log.timestamps.tolist(), log.ratings.tolist()) == (["1"], ["2"], [3], [4.0])


def test_csv_with_utf8_bom(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a byte-order mark; the first column must still be found
    p = tmp_path / "excel.csv"
    p.write_bytes("user,item,timestamp\nu1,m1,5\n".encode("utf-8-sig"))
    log = read_log(p)
    assert log.users.tolist() == ["u1"] and log.timestamps.tolist() == [5]


def test_missing_mapped_column_is_named(tmp_path):
    p = write(tmp_path / "log.csv", "uid,movie,ts\nu1,m1,1\n")
    with pytest.raises(CkvError, match="customer"):
        read_log(p, {"user": "customer", "item": "movie", "timestamp": "ts"})


def test_missing_default_columns_are_named(tmp_path):
    p = write(tmp_path / "log.csv", "who,item,when\nu1,m1,1\n")  # (uid and ts would be recognised)
    with pytest.raises(CkvError) as e:
        read_log(p)
    msg = str(e.value)
    assert "user" in msg and "timestamp" in msg and "--columns" in msg
    assert "\n" not in msg


def test_empty_file(tmp_path):
    with pytest.raises(CkvError, match="empty"):
        read_log(write(tmp_path / "empty.csv", ""))


def test_header_only_file(tmp_path):
    with pytest.raises(CkvError, match="no rows"):
        read_log(write(tmp_path / "hdr.csv", "user,item,timestamp\n"))


@pytest.mark.parametrize("name", ["dir.csv", "ml.inter", "ratings.dat"])
def test_directory_is_rejected(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(CkvError, match="directory"):
        read_log(tmp_path / name)


@pytest.mark.parametrize("name", ["nope.csv", "nope.inter", "ratings.dat", "nope.parquet"])
def test_missing_path_is_rejected(tmp_path, name):
    with pytest.raises(CkvError, match="not found"):
        read_log(tmp_path / name)


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", ""])
def test_non_finite_or_empty_timestamp(tmp_path, bad):
    p = write(tmp_path / "log.csv", f"user,item,timestamp\nu1,m1,1\nu1,m2,{bad}\n")
    with pytest.raises(CkvError, match="timestamp"):
        read_log(p)


def test_non_numeric_rating(tmp_path):
    with pytest.raises(CkvError, match="rating"):
        read_log(write(tmp_path / "log.csv", "user,item,timestamp,rating\nu1,m1,1,good\n"))


def test_row_with_wrong_field_count_names_the_line(tmp_path):
    with pytest.raises(CkvError, match=r"log\.csv:3"):
        read_log(write(tmp_path / "log.csv", "user,item,timestamp\nu1,m1,1\nu1,m2\n"))


INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "196\t242\t3\t881250949\n"
         "186\t302\t4\t891717742\n"
         "196\t377\t1\t878887116\n")
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n"
        "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
        "377\tHeavyweights\t1994\tChildren's Comedy\n")


def test_recbole_inter_with_item_file(tmp_path):
    write(tmp_path / "toy.inter", INTER)
    write(tmp_path / "toy.item", ITEM)
    log = read_log(tmp_path / "toy.inter")
    assert log.users.tolist() == ["196", "186", "196"]
    assert log.items.tolist() == ["242", "302", "377"]
    assert log.timestamps.tolist() == [881250949, 891717742, 878887116]
    assert log.ratings.tolist() == [3.0, 4.0, 1.0]
    assert log.item_genres == {"242": ["Comedy"], "302": ["Crime", "Film-Noir", "Mystery", "Thriller"],
                               "377": ["Children's", "Comedy"]}


def test_recbole_genres_become_multi_hot(tmp_path):
    write(tmp_path / "toy.inter", INTER + "196\t302\t5\t881250950\n186\t242\t5\t891717743\n186\t377\t2\t891717744\n")
    write(tmp_path / "toy.item", ITEM)
    ds = build(read_log(tmp_path / "toy.inter"), "toy")
    assert ds.genre_names == sorted(["Comedy", "Crime", "Film-Noir", "Mystery", "Thriller", "Children's"])
    assert ds.genres.shape == (ds.n_items + 1, len(ds.genre_names))
    assert ds.genres[0].sum() == 0  # padding row
    for i in range(1, ds.n_items + 1):
        expected = {"242": {"Comedy"}, "302": {"Crime", "Film-Noir", "Mystery", "Thriller"},
                    "377": {"Children's", "Comedy"}}[ds.item_ids[i]]
        assert {ds.genre_names[j] for j in np.flatnonzero(ds.genres[i])} == expected


def test_recbole_inter_without_item_file(tmp_path):
    log = read_log(write(tmp_path / "toy.inter", INTER))
    assert log.item_genres is None and len(log) == 3


def test_recbole_inter_with_wrong_header(tmp_path):
    with pytest.raises(CkvError, match="RecBole"):
        read_log(write(tmp_path / "bad.inter", "uid:token\titem_id:token\ttimestamp:float\n1\t2\t3\n"))


def test_movielens_dat_with_movies(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n\n2::1193::4::978298413\n")
    write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                    "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n")
    log = read_log(tmp_path / "ratings.dat")
    assert log.users.tolist() == ["1", "1", "2"]
    assert log.items.tolist() == ["1193", "661", "1193"]
    assert log.ratings.tolist() == [5.0, 3.0, 4.0]
    assert log.timestamps.tolist() == [978300760, 978302109, 978298413]
    assert log.item_genres == {"1193": ["Drama"], "661": ["Animation", "Children's", "Musical"]}


def test_movielens_dat_without_movies_has_no_genres(tmp_path):
    log = read_log(write(tmp_path / "ratings.dat", "1::1193::5::978300760\n"))
    assert log.item_genres is None


def test_movielens_dat_bad_line(tmp_path):
    with pytest.raises(CkvError, match=r"ratings\.dat:2"):
        read_log(write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1,661,3,978302109\n"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"uid": ["u1", "u1", "u2"], "movie": ["a", "b", "a"], "ts": [3, 1, 2], "stars": [5.0, 1.0, 4.0]})
    pq.write_table(table, tmp_path / "log.parquet")
    log = read_log(tmp_path / "log.parquet", MAPPING)
    assert log.users.tolist() == ["u1", "u1", "u2"] and log.timestamps.tolist() == [3, 1, 2]
    assert log.ratings.tolist() == [5.0, 1.0, 4.0]
    with pytest.raises(CkvError, match="customer"):
        read_log(tmp_path / "log.parquet", {**MAPPING, "user": "customer"})


# ---------------------------------------------------------------- sequences


def make_log(rows, ratings=True) -> Log:
    """rows: (user, item, timestamp[, rating]) in file order."""
    return Log(users=np.array([r[0] for r in rows], dtype=str), items=np.array([r[1] for r in rows], dtype=str),
               timestamps=np.array([r[2] for r in rows], dtype=np.int64),
               ratings=np.array([r[3] for r in rows], dtype=np.float32) if ratings else None)


def raw_sequence(ds, u):
    items, times = ds.sequence(u)
    return [ds.item_ids[i] for i in items], times.tolist()


ROWS = [  # user a: ties at t=5 must stay in file order (i9 before i1, whatever the item ids say)
    ("a", "i9", 5, 5.0), ("b", "i2", 1, 1.0), ("a", "i3", 3, 4.0), ("c", "i1", 7, 3.0), ("a", "i1", 5, 2.0),
    ("b", "i3", 2, 4.5), ("a", "i4", 1, 3.5), ("b", "i1", 3, 5.0), ("d", "i2", 9, 4.0), ("c", "i2", 8, 4.0),
    ("a", "i2", 6, 1.0), ("b", "i9", 2, 2.0),
]


def test_time_order_is_stable():
    ds = build(make_log(ROWS), "toy")
    u = {raw: k for k, raw in enumerate(ds.user_ids)}
    assert raw_sequence(ds, u["a"]) == (["i4", "i3", "i9", "i1", "i2"], [1, 3, 5, 5, 6])
    assert raw_sequence(ds, u["b"]) == (["i2", "i3", "i9", "i1"], [1, 2, 2, 3])  # tie at t=2 in file order
    a, b = ds.offsets[u["a"]], ds.offsets[u["a"] + 1]
    assert ds.ratings[a:b].tolist() == [3.5, 4.0, 5.0, 2.0, 1.0]  # ratings follow their events


def test_ties_keep_file_order_at_scale():
    rng = np.random.default_rng(0)
    n = 2000
    users = rng.integers(0, 20, n)
    times = rng.integers(0, 5, n)  # many ties
    rows = [(f"u{users[k]:02d}", f"e{k:05d}", int(times[k]), 1.0) for k in range(n)]  # item id = file line
    ds = build(make_log(rows), "ties")
    for u in range(ds.n_users):
        items, ts = raw_sequence(ds, u)
        assert sorted(zip(ts, items)) == list(zip(ts, items))  # by time, then by file line within a tie


def test_short_users_are_dropped_and_counted():
    ds = build(make_log(ROWS), "toy")
    assert ds.user_ids.tolist() == ["a", "b"]  # c has 2 events, d has 1
    assert ds.dropped_users == 2 and ds.n_users == 2
    assert ds.lengths().tolist() == [5, 4]
    assert len(ds.items) == len(ds.timestamps) == len(ds.ratings) == 9
    ds2 = build(make_log(ROWS), "toy", min_events=2)
    assert ds2.user_ids.tolist() == ["a", "b", "c"] and ds2.dropped_users == 1


def test_no_user_left_is_an_error():
    with pytest.raises(CkvError, match="at least 3"):
        build(make_log([("a", "x", 1, 1.0), ("a", "y", 2, 1.0), ("b", "x", 1, 1.0)]), "toy")


def test_vocabulary_has_padding_at_zero():
    ds = build(make_log(ROWS), "toy")
    assert ds.item_ids[0] == "<pad>"
    assert ds.item_ids[1:].tolist() == ["i1", "i2", "i3", "i4", "i9"]  # every raw item of the log, sorted
    assert ds.n_items == 5
    assert ds.items.min() >= 1 and ds.items.max() <= ds.n_items
    assert ds.genres.shape == (6, 0) and ds.genre_names == []


def test_leave_one_out_split():
    ds = build(make_log(ROWS), "toy")
    items = {k: ds.sequence(k)[0].tolist() for k in range(ds.n_users)}
    times = {k: ds.sequence(k)[1].tolist() for k in range(ds.n_users)}
    tr_items, tr_times, tr_targets = ds.split("train")
    assert len(tr_targets) == 0
    va_items, va_times, va_targets = ds.split("valid")
    te_items, te_times, te_targets = ds.split("test")
    for u in range(ds.n_users):
        seq, ts = items[u], times[u]
        assert tr_items[u].tolist() == seq[:-2] and tr_times[u].tolist() == ts[:-2]
        assert va_items[u].tolist() == seq[:-2] and va_times[u].tolist() == ts[:-2] and va_targets[u] == seq[-2]
        assert te_items[u].tolist() == seq[:-1] and te_times[u].tolist() == ts[:-1] and te_targets[u] == seq[-1]
    assert va_targets.dtype == np.int64 and te_targets.dtype == np.int64


def test_split_of_a_three_event_user():
    ds = build(make_log([("u", "x", 1, 1.0), ("u", "y", 2, 1.0), ("u", "z", 3, 1.0)]), "toy")
    x, y, z = 1, 2, 3  # sorted vocabulary
    assert [a.tolist() for a in ds.split("train")[0]] == [[x]]
    h, _, t = ds.split("valid")
    assert h[0].tolist() == [x] and t.tolist() == [y]
    h, _, t = ds.split("test")
    assert h[0].tolist() == [x, y] and t.tolist() == [z]


def test_item_vocab_maps_through_and_drops_unknown_items():
    vocab = ["<pad>", "i3", "i1", "i9", "i7"]  # a checkpoint's order, not sorted; i7 is absent from the log
    ds = build(make_log(ROWS), "toy", item_vocab=vocab)
    assert ds.item_ids.tolist() == vocab and ds.n_items == 4
    # unknown items: a's i4, i2; b's i2; c's i2; d's i2  -> 5 events
    assert ds.dropped_events == 5
    # a keeps i3, i9, i1 (3 events); b keeps i3, i9, i1 (3); c keeps only i1 and is dropped. d has no known
    # item left: its one event is counted in dropped_events, and d is not counted again as a dropped user
    assert ds.user_ids.tolist() == ["a", "b"] and ds.dropped_users == 1
    assert raw_sequence(ds, 0) == (["i3", "i9", "i1"], [3, 5, 5])
    assert ds.sequence(0)[0].tolist() == [1, 3, 2]  # indices into the given vocabulary
    assert ds.ratings[:3].tolist() == [4.0, 5.0, 2.0]


def test_item_vocab_of_the_log_itself_changes_nothing():
    ds = build(make_log(ROWS), "toy")
    again = build(make_log(ROWS), "toy", item_vocab=ds.item_ids.tolist())
    assert again.dropped_events == 0
    assert np.array_equal(again.items, ds.items) and again.fingerprint == ds.fingerprint


def test_ctr_labels():
    from ckv_cli.data.ctr import build_ctr

    ds = build(make_log(ROWS), "toy")
    ctr = build_ctr(ds)
    rating_of = {(r[0], r[1], r[2]): r[3] for r in ROWS}
    for e in range(len(ds.items)):
        key = (ds.user_ids[ctr.users[e]], ds.item_ids[ds.items[e]], int(ds.timestamps[e]))
        assert ctr.labels[e] == float(rating_of[key] >= 4.0)
    assert ctr.labels.sum() == 4  # a: 4.0, 5.0; b: 4.5, 5.0
    assert build_ctr(ds, positive_rating=5.0).labels.sum() == 2


def test_ctr_needs_ratings():
    from ckv_cli.data.ctr import build_ctr

    ds = build(make_log(ROWS, ratings=False), "toy")
    assert ds.ratings is None
    with pytest.raises(CkvError, match="needs a rating column"):
        build_ctr(ds)


def test_common_column_names_and_their_precedence():
    from ckv_cli.data.readers import resolve_columns

    mapping, found = resolve_columns(["UserId", "movie_id", "Timestamp", "stars"], None, "x.csv")
    assert mapping == {"user": "UserId", "item": "movie_id", "timestamp": "Timestamp", "rating": "stars"}
    assert found == {"user": "UserId", "item": "movie_id", "timestamp": "Timestamp", "rating": "stars"}
    mapping, found = resolve_columns(["user", "uid", "item", "ts", "timestamp"], {"item": "ts"}, "x.csv")
    assert mapping["user"] == "user" and mapping["item"] == "ts" and mapping["timestamp"] == "timestamp"
    assert found == {}  # ckv's own names and --columns are not "recognised"
    with pytest.raises(CkvError, match="user_id, customer_id could each be the user"):
        resolve_columns(["user_id", "customer_id", "item"], None, "x.csv")


def test_fingerprint():
    base = build(make_log(ROWS), "toy").fingerprint
    assert len(base) == 16
    assert build(make_log(ROWS), "toy").fingerprint == base  # deterministic
    assert build(make_log(ROWS), "other name").fingerprint == base  # the data, not the label
    changed_time = [r if k != 2 else ("a", "i3", 4, 4.0) for k, r in enumerate(ROWS)]
    assert build(make_log(changed_time), "toy").fingerprint != base
    changed_item = [r if k != 2 else ("a", "i2", 3, 4.0) for k, r in enumerate(ROWS)]
    assert build(make_log(changed_item), "toy").fingerprint != base
    extra_user = ROWS + [("e", "i1", 1, 1.0), ("e", "i2", 2, 1.0), ("e", "i3", 3, 1.0)]
    assert build(make_log(extra_user), "toy").fingerprint != base
    # the same events listed in another order that keeps each user's rows in order: same sequences, same print
    regrouped = sorted(ROWS, key=lambda r: r[0], reverse=True)  # stable: rows of one user keep their order
    assert regrouped != ROWS
    assert build(make_log(regrouped), "toy").fingerprint == base


# ---------------------------------------------------------------- named datasets


def test_ml_100k():
    ds = load("ml-100k")
    assert (ds.n_users, ds.n_items, len(ds.items)) == (943, 1682, 100000)
    assert ds.dropped_users == 0 and ds.dropped_events == 0
    assert ds.lengths().min() >= 20  # every ML-100K user rated at least 20 movies
    assert ds.ratings is not None and set(np.unique(ds.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(ds.genre_names) == 19 and ds.genres[1:].sum(axis=1).min() >= 1
    for u in (0, 500, 942):
        assert np.all(np.diff(ds.sequence(u)[1]) >= 0)
    assert fetch("ml-100k").name == "ml-100k.inter"


@pytest.mark.parametrize("name", ["ml-10m", "movielens"])
def test_unknown_dataset_name(name):
    with pytest.raises(CkvError, match="unknown dataset") as e:
        load(name)
    assert all(n in str(e.value) for n in DATASETS)
    with pytest.raises(CkvError, match="unknown dataset"):
        fetch(name)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CKV_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CKV_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "ckv"


def test_load_a_file_path(tmp_path):
    p = write(tmp_path / "log.csv", "user,item,timestamp\n" + "".join(f"u{k % 2},m{k},{k}\n" for k in range(8)))
    ds = load(str(p))
    assert ds.name == "log.csv" and ds.n_users == 2 and ds.n_items == 8


# ---------------------------------------------------------------- batching


def test_pad_right_keeps_the_most_recent_events():
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([8, 9])]
    out, lengths = pad_right(seqs, 3)
    assert out.dtype == torch.int64 and out.tolist() == [[3, 4, 5], [7, 0, 0], [8, 9, 0]]
    assert lengths.tolist() == [3, 1, 2]
    items, times, lengths = history_batch(seqs, [s * 10 for s in seqs], 4)
    assert items.tolist() == [[2, 3, 4, 5], [7, 0, 0, 0], [8, 9, 0, 0]]
    assert times.tolist() == [[20, 30, 40, 50], [70, 0, 0, 0], [80, 90, 0, 0]]
    assert lengths.tolist() == [4, 1, 2]
