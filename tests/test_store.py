import json
import sqlite3
import threading

import numpy as np
import pytest

from e2p.cli import main
from e2p.errors import DataError, EmbeddingError
from e2p.store.files import read_embeddings
from e2p.store import EmbeddingStore, StoreError, import_embeddings

DIM = 8


def _vecs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype("float32")


def test_put_get_version_delete(open_store):
    store = open_store(DIM)
    v1, v2 = _vecs(2)
    rec = store.put("alice", v1)
    assert (rec.version, rec.dim) == (1, DIM) and np.array_equal(rec.vector, v1)
    rec2 = store.put("alice", v2)
    assert rec2.version == 2 and rec2.updated_at >= rec.updated_at and np.array_equal(store.get("alice").vector, v2)
    assert store.get("bob") is None and len(store) == 1 and store.users() == ["alice"]
    assert store.delete("alice") and not store.delete("alice") and store.get("alice") is None
    if open_store.backend == "sqlite":
        assert sqlite3.connect(open_store.spec).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writes_are_checked(open_store):
    store = open_store(DIM)
    with pytest.raises(EmbeddingError, match="expects 8"):
        store.put("a", [1.0, 2.0])
    with pytest.raises(EmbeddingError, match="NaN"):
        store.put("a", [float("nan")] + [0.0] * (DIM - 1))
    with pytest.raises(EmbeddingError, match="non-empty"):
        store.put("", _vecs(1)[0])
    assert len(store) == 0
    with pytest.raises(StoreError, match="holds 8-dim"):
        open_store(16)


def test_dimension_is_set_by_first_write_and_kept(open_store):
    store = open_store()
    assert store.dim is None
    store.put("a", [1.0, 2.0, 3.0])
    assert open_store().dim == 3
    with pytest.raises(EmbeddingError):
        store.put("b", [1.0, 2.0])


def test_thread_safe_concurrent_updates(open_store):
    store = open_store(DIM)
    other = open_store()  # a second connection, as a second process would have

    def work(i):
        for _ in range(20):
            (store if i % 2 else other).put("shared", _vecs(1, seed=i)[0])
            store.put(f"user{i}", _vecs(1, seed=i)[0])
            assert store.get("shared") is not None

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("shared").version == 120 and len(store) == 7


def _write_all_formats(tmp_path, users, vecs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    pq.write_table(pa.table({"user": users, "embedding": [v.tolist() for v in vecs]}), tmp_path / "list.parquet")
    files["list.parquet"] = tmp_path / "list.parquet"
    cols = {"user": users, **{f"e{j}": vecs[:, j] for j in range(DIM)}}
    pq.write_table(pa.table(cols), tmp_path / "wide.parquet")
    files["wide.parquet"] = tmp_path / "wide.parquet"
    lines = ["user," + ",".join(f"e{j}" for j in range(DIM))] + [u + "," + ",".join(map(repr, v.tolist())) for u, v in zip(users, vecs)]
    (tmp_path / "wide.csv").write_text("\n".join(lines) + "\n")
    files["wide.csv"] = tmp_path / "wide.csv"
    rows = ["user,embedding"] + [f'{u},"{json.dumps(v.tolist())}"' for u, v in zip(users, vecs)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    files["list.csv"] = tmp_path / "list.csv"
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"user": u, "embedding": v.tolist()}) + "\n" for u, v in zip(users, vecs)))
    files["e.jsonl"] = tmp_path / "e.jsonl"
    np.savez(tmp_path / "e.npz", user=np.array(users), embedding=vecs)
    files["e.npz"] = tmp_path / "e.npz"
    structured = np.zeros(len(users), dtype=[("user", "U16"), ("embedding", "f4", (DIM,))])
    structured["user"], structured["embedding"] = users, vecs
    np.save(tmp_path / "s.npy", structured)
    files["s.npy"] = tmp_path / "s.npy"
    return files


def test_read_every_format(tmp_path):
    users = ["ann", "ben", "cy"]
    vecs = _vecs(3)
    for name, path in _write_all_formats(tmp_path, users, vecs).items():
        rows = read_embeddings(path)
        assert [u for u, _ in rows] == users, name
        assert np.allclose(np.stack([np.asarray(v, dtype="float32") for _, v in rows]), vecs, atol=1e-6), name
    np.save(tmp_path / "plain.npy", vecs)
    assert [u for u, _ in read_embeddings(tmp_path / "plain.npy")] == ["0", "1", "2"]
    (tmp_path / "ids.txt").write_text("x\ny\nz\n")
    assert [u for u, _ in read_embeddings(tmp_path / "plain.npy", tmp_path / "ids.txt")] == ["x", "y", "z"]


def test_import_is_all_or_nothing_and_safe(tmp_path, open_store):
    store = open_store(DIM)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user": "a", "embedding": [0.0] * DIM}) + "\n" + json.dumps({"user": "b", "embedding": [1.0]}) + "\n")
    with pytest.raises(DataError, match="row 1 .*expects 8"):
        import_embeddings(bad, store)
    assert len(store) == 0
    np.save(tmp_path / "obj.npy", np.array([{"user": "a"}], dtype=object))
    with pytest.raises(DataError, match="without pickle"):
        read_embeddings(tmp_path / "obj.npy")
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({"user": "a", "embedding": [0.0] * DIM}) + "\n" for _ in range(2)))
    with pytest.raises(DataError, match="more than once"):
        read_embeddings(tmp_path / "dup.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        read_embeddings(tmp_path / "x.txt")


def test_cli_users_import(tmp_path, capsys, open_store):
    users = ["ann", "ben", "cy"]
    files = _write_all_formats(tmp_path, users, _vecs(3))
    db = open_store.spec
    assert main(["users", "import", str(files["list.parquet"]), "--store", str(db), "--dim", str(DIM)]) == 0
    assert "imported 3" in capsys.readouterr().out
    assert main(["users", "import", str(files["e.jsonl"]), "--store", str(db)]) == 0
    assert open_store().get("ben").version == 2
    assert main(["users", "import", str(files["e.npz"]), "--store", str(db), "--dim", "4"]) == 2  # wrong dimension
    assert "holds 8-dim" in capsys.readouterr().err
