"""Streamed imports: bounded memory, Spark / BigQuery Parquet layouts, all-or-nothing across chunks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from e2p.cli import main
from e2p.errors import DataError
from e2p.store.files import iter_embedding_chunks, read_embeddings
from e2p.store import EmbeddingStore, import_embeddings

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "import_scale.py"
DIM = 8


def _vecs(n, dim=DIM, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype("float32")


def test_import_memory_stays_flat(tmp_path):
    # 50k x 768 float32 = 146 MB of vectors. A streamed import holds a few copies of one chunk (2000 rows, 6 MB)
    # plus pyarrow / SQLite start-up (~90 MB): measured ~123 MB of growth, the same for 20k..1M rows; reading
    # the whole file (the old importer) would need at least 90 + 146 MB.
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(BENCH), "--rows", "50000", "--dim", "768", "--chunk-rows", "2000", "--workdir", str(tmp_path),
                    "--out", str(out)], check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   capture_output=True)
    r = json.loads(out.read_text())
    assert r["rows"] == 50000 and r["raw_embeddings_mb"] > 140
    assert r["import_rss_growth_mb"] < 160, r


def _spark_like_tables(users, vecs):
    n, d = vecs.shape
    flat = pa.array(vecs.reshape(-1))
    offs32 = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    offs64 = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int64))
    lst = pa.ListArray.from_arrays(offs32, flat)
    return {
        "list_float": pa.table({"user": users, "embedding": lst}),
        "list_double": pa.table({"user": users, "embedding": pa.ListArray.from_arrays(offs32, flat.cast(pa.float64()))}),
        "large_list": pa.table({"user": users, "embedding": pa.LargeListArray.from_arrays(offs64, flat)}),
        "fixed_size_list": pa.table({"user": users, "embedding": pa.FixedSizeListArray.from_arrays(flat, d)}),
        # Spark names list items `element`; some BigQuery / Hive exports wrap the list or its items in a struct
        "spark_element": pa.table({"user": users, "embedding": pa.array(vecs.tolist(), pa.list_(pa.field("element", pa.float32())))}),
        "struct_wrapped": pa.table({"user": users, "embedding": pa.StructArray.from_arrays(
            [pa.ListArray.from_arrays(offs32, pa.StructArray.from_arrays([flat], ["element"]))], ["list"])}),
    }


def test_spark_bigquery_parquet_layouts(tmp_path):
    users = ["ann", "ben", "cy", "dee", "eve"]
    vecs = _vecs(5)
    for name, table in _spark_like_tables(users, vecs).items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=2)
        rows = read_embeddings(path)
        assert [u for u, _ in rows] == users, name
        assert np.allclose(np.stack(rows_v := [np.asarray(v) for _, v in rows]), vecs, atol=1e-6), name
        assert all(v.dtype == np.float32 for v in rows_v)
        store = EmbeddingStore(tmp_path / f"{name}.db", dim=DIM)
        assert import_embeddings(path, store, chunk_rows=2) == 5 and np.allclose(store.get("eve").vector, vecs[4])


def test_configurable_columns_and_integer_ids(tmp_path):
    vecs = _vecs(3)
    path = tmp_path / "bq.parquet"
    pq.write_table(pa.table({"user_id": pa.array([10, 11, 12], pa.int64()), "vec": pa.array(vecs.tolist(), pa.list_(pa.float64())),
                             "country": ["x", "y", "z"]}), path)
    with pytest.raises(DataError, match="no `user` column"):
        read_embeddings(path)
    rows = read_embeddings(path, user_column="user_id", embedding_column="vec")
    assert [u for u, _ in rows] == ["10", "11", "12"]
    db = tmp_path / "c.db"
    assert main(["users", "import", str(path), "--store", str(db), "--user-column", "user_id", "--embedding-column", "vec"]) == 0
    assert EmbeddingStore(db).get("12") is not None
    jl = tmp_path / "e.jsonl"
    jl.write_text("".join(json.dumps({"id": f"u{i}", "v": v.tolist()}) + "\n" for i, v in enumerate(vecs)))
    assert [u for u, _ in read_embeddings(jl, user_column="id", embedding_column="v")] == ["u0", "u1", "u2"]


def test_all_or_nothing_across_chunks(tmp_path, open_store):
    store = open_store(DIM)
    store.put("keep", _vecs(1)[0])
    users = [f"u{i}" for i in range(9)]
    vecs = _vecs(9)
    bad = vecs.copy()
    bad[7, 3] = np.nan  # in the 4th chunk of 2
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"user": users, "embedding": bad.tolist()}), path)
    with pytest.raises(DataError, match=r"row 7 \(user 'u7'\).*NaN"):
        import_embeddings(path, store, chunk_rows=2)
    assert len(store) == 1 and store.get("keep").version == 1
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"user": u, "embedding": v.tolist()}) + "\n" for u, v in zip(users + ["u1"], np.vstack([vecs, vecs[:1]]))))
    with pytest.raises(DataError, match=r"row 9: user id 'u1' appears more than once"):
        import_embeddings(dup, store, chunk_rows=2)
    assert len(store) == 1
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"user": ["a", "b", "c"], "embedding": [[0.0] * DIM, [0.0] * DIM, [1.0] * 3]}), ragged)
    with pytest.raises(DataError, match=r"row 2 \(user 'c'\).*expects 8"):
        import_embeddings(ragged, store)
    good = tmp_path / "good.csv"
    good.write_text("user,embedding\n" + "".join(f'{u},"{json.dumps(v.tolist())}"\n' for u, v in zip(users, vecs)))
    assert import_embeddings(good, store, chunk_rows=4) == 9 and len(store) == 10
    assert import_embeddings(good, store, chunk_rows=4) == 9 and store.get("u8").version == 2  # re-import bumps


def test_numpy_files_stream(tmp_path):
    users = np.array([f"user{i}" for i in range(7)])
    vecs = _vecs(7)
    np.savez_compressed(tmp_path / "c.npz", user=users, embedding=vecs)
    chunks = list(iter_embedding_chunks(tmp_path / "c.npz", chunk_rows=3))
    assert [len(u) for u, _ in chunks] == [3, 3, 1]
    assert np.array_equal(np.vstack([v for _, v in chunks]), vecs) and sum((u for u, _ in chunks), []) == list(users)
    np.save(tmp_path / "plain.npy", vecs)
    chunks = list(iter_embedding_chunks(tmp_path / "plain.npy", chunk_rows=4))
    assert [u for u, _ in chunks][1] == ["4", "5", "6"]
    (tmp_path / "ids.txt").write_text("\n".join(users[:5]) + "\n")
    with pytest.raises(DataError, match="fewer user ids"):
        import_embeddings(tmp_path / "plain.npy", EmbeddingStore(tmp_path / "n.db"), ids_file=tmp_path / "ids.txt")
    assert len(EmbeddingStore(tmp_path / "n.db")) == 0
