"""The store's privacy promises: tenants are separate namespaces, old stores migrate to the default tenant, and a
deleted vector's bytes are in none of the store's files (database, -wal, -shm, any journal) afterwards."""
from __future__ import annotations

import sqlite3

import numpy as np

from e2p.store import DEFAULT_TENANT, EmbeddingStore

DIM = 64


def distinctive(seed: int = 7) -> np.ndarray:
    """A vector whose float32 bytes occur nowhere by chance."""
    return np.random.default_rng(seed).uniform(-1e6, 1e6, DIM).astype(np.float32)


def files_holding(folder, needle: bytes) -> list[str]:
    """Every file of the store's folder whose raw bytes contain `needle` (or its first or last 16 bytes)."""
    pieces = (needle, needle[:16], needle[-16:])
    return [p.name for p in sorted(folder.iterdir()) if p.is_file() and any(x in p.read_bytes() for x in pieces)]


def test_tenants_are_separate_namespaces(tmp_path):
    store = EmbeddingStore(tmp_path / "s.db")
    a, b = distinctive(1), distinctive(2)
    store.put("alice", a, tenant="acme")
    assert store.get("alice", tenant="globex") is None and store.get("alice") is None
    store.put("alice", b, tenant="globex")  # another person with the same id
    assert np.array_equal(store.get("alice", tenant="acme").vector, a)
    assert np.array_equal(store.get("alice", tenant="globex").vector, b)
    assert store.get("alice", tenant="acme").version == 1
    assert not store.delete("alice", tenant="initech")
    assert store.delete("alice", tenant="globex")
    assert np.array_equal(store.get("alice", tenant="acme").vector, a)
    assert store.users(tenant="acme") == ["alice"] and store.users() == [] and store.count("acme") == 1


def test_a_store_from_before_tenants_is_the_default_tenants(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # the schema of the stores written before tenants
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE embeddings (user TEXT PRIMARY KEY, vector BLOB NOT NULL, dim INTEGER NOT NULL, "
               "version INTEGER NOT NULL, updated_at REAL NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('dim', ?)", (str(DIM),))
    db.execute("INSERT INTO embeddings VALUES ('alice', ?, ?, 3, 1.0)", (distinctive().tobytes(), DIM))
    db.commit()
    db.close()
    store = EmbeddingStore(path)
    record = store.get("alice")
    assert record.version == 3 and np.array_equal(record.vector, distinctive())
    assert store.get("alice", tenant="acme") is None and store.get("alice", tenant=DEFAULT_TENANT) is not None
    store.put("alice", distinctive(3))
    assert store.get("alice").version == 4
    store.close()
    assert EmbeddingStore(path).get("alice").version == 4  # opening a migrated store again changes nothing


def test_deleted_vector_leaves_no_bytes_in_any_file(tmp_path):
    folder = tmp_path / "store"
    store = EmbeddingStore(folder / "users.db")
    for i in range(50):  # neighbours on the same pages
        store.put(f"user-{i}", distinctive(100 + i), tenant="acme")
    secret = distinctive().tobytes()
    store.put("alice", distinctive(), tenant="acme")
    store.put("alice", distinctive(), tenant="acme")  # an update writes the same bytes again
    assert files_holding(folder, secret)  # the test can see the vector while it is stored
    assert store.delete("alice", tenant="acme")
    assert files_holding(folder, secret) == [], "a deleted vector's bytes survived"
    assert store.get("user-3", tenant="acme") is not None and store.get("alice", tenant="acme") is None
    store.close()
    assert files_holding(folder, secret) == []


def test_the_file_search_would_find_a_plain_delete(tmp_path):
    """Without secure_delete and the checkpoint (plain SQLite) the bytes survive: the search above can fail."""
    folder = tmp_path / "plain"
    folder.mkdir()
    db = sqlite3.connect(folder / "p.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA secure_delete=OFF")
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
    db.execute("INSERT INTO t VALUES ('alice', ?)", (distinctive().tobytes(),))
    db.execute("DELETE FROM t WHERE k='alice'")
    assert files_holding(folder, distinctive().tobytes())
    db.close()


def test_a_reader_holding_the_wal_delays_the_wipe_until_the_next_delete(tmp_path, caplog):
    folder = tmp_path / "held"
    store = EmbeddingStore(folder / "users.db", timeout=0.2)
    store.put("bob", distinctive(5))
    secret = distinctive().tobytes()
    store.put("alice", distinctive())
    reader = sqlite3.connect(folder / "users.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM embeddings").fetchone()  # another process's snapshot pins the WAL
    assert store.delete("alice")
    assert "a reader held the WAL" in caplog.text
    reader.execute("COMMIT")
    reader.close()
    assert not store.delete("alice")  # the retry (nobody left to delete) still truncates the WAL
    assert files_holding(folder, secret) == []
