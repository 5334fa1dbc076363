"""Many replicas, one store: two real `e2p serve` processes on one PostgreSQL database (a throwaway cluster). A PUT
through one is used by the other's next request, a DELETE is refused there at once, PostgreSQL stopped and started
under load gives 503s with Retry-After (never a 500, never a hang) and both replicas recover by themselves, a killed
replica leaves the other alone, and no acknowledged write is lost. Also deletion at the byte level on PostgreSQL."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import new_database

ADMIN, KEY = "admin-key", "user-key"
DIM = 384  # persona-input-k1 reads all-MiniLM-L6-v2's 384 values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """`e2p serve` as a process (the shipped input projector on SmolLM2), on the given store."""

    def __init__(self, store: str, log_dir):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"replica-{self.port}.log", "w")
        env = {**os.environ, "E2P_ADMIN_KEY": ADMIN, "E2P_API_KEY": KEY}
        self.proc = subprocess.Popen([sys.executable, "-m", "e2p.cli", "serve", "--projector", "persona-input-k1",
                                      "--store", store, "--port", str(self.port), "--max-tokens-limit", "8",
                                      "--request-timeout", "20", "--model-name", "e2p"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 180) -> "Replica":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"replica exited; see {self.log.name}"
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"replica did not start; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _vec(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM).astype("float32")
    return (v / np.linalg.norm(v)).tolist()


def _put(client: httpx.Client, url: str, user: str, seed: int) -> httpx.Response:
    return client.put(f"{url}/v1/users/{user}/embedding", json={"embedding": _vec(seed)},
                      headers={"Authorization": f"Bearer {ADMIN}"})


def _chat(client: httpx.Client, url: str, user: str) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "e2p", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                             "user": user})


@pytest.fixture(scope="module")
def replicas(pg_cluster, tmp_path_factory):
    store = new_database(pg_cluster)
    logs = tmp_path_factory.mktemp("replicas")
    a, b = Replica(store, logs), Replica(store, logs)
    a.wait(), b.wait()
    yield a, b, store
    a.stop(), b.stop()


@pytest.mark.backbone
def test_a_put_through_one_replica_is_used_by_the_other(replicas):
    a, b, _ = replicas
    with httpx.Client(timeout=30) as client:
        assert _put(client, a.url, "alice", 1).json()["version"] == 1
        r = _chat(client, b.url, "alice")
        assert r.status_code == 200 and r.headers["x-e2p-embedding-version"] == "1"
        staleness = []
        for i in range(2, 42):  # the time from A's 200 to B answering with the new version
            assert _put(client, a.url, "alice", i).status_code == 200
            done = time.perf_counter()
            while client.get(f"{b.url}/v1/users/alice/embedding",
                             headers={"Authorization": f"Bearer {ADMIN}"}).json()["version"] != i:
                pass
            staleness.append(time.perf_counter() - done)
        r = _chat(client, b.url, "alice")
        assert r.headers["x-e2p-embedding-version"] == "41"  # B's reply says which version it used
        p50, p95 = np.percentile(staleness, [50, 95])
        print(f"staleness A's 200 -> B answers with the new version: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
        assert p95 < 0.1  # goal: p95 < 100 ms on loopback (no replica caches a vector: B reads the row A committed)
        assert client.delete(f"{a.url}/v1/users/alice/embedding", headers={"Authorization": f"Bearer {ADMIN}"}
                             ).status_code == 200
        r = _chat(client, b.url, "alice")
        assert r.status_code == 404 and r.json()["error"]["code"] == "user_not_found"  # at once


@pytest.mark.backbone
def test_postgres_restart_under_load_gives_503s_then_recovers_and_loses_no_write(replicas, pg_cluster):
    a, b, _ = replicas
    acked: dict[str, int] = {}  # user -> seed of the last PUT answered 200
    statuses: list[int] = []
    slowest = [0.0]
    stop = threading.Event()

    def writer(n: int):
        user = f"w{n}"
        with httpx.Client(timeout=30) as client:
            seed = n * 100_000
            while not stop.is_set():
                seed += 1
                url = (a, b)[seed % 2].url
                t = time.monotonic()
                try:
                    r = _put(client, url, user, seed)
                except httpx.HTTPError:
                    continue  # a killed replica: not acknowledged
                slowest[0] = max(slowest[0], time.monotonic() - t)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    acked[user] = seed
                else:
                    assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
                    assert r.json()["error"]["code"] == "store_unavailable"
                time.sleep(0.01)

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    with httpx.Client(timeout=30) as client:
        time.sleep(1.0)
        pg_cluster.stop("fast")
        time.sleep(0.5)
        down = [_chat(client, r.url, "w0") for r in (a, b)]
        ready = [client.get(r.url + "/readyz").status_code for r in (a, b)]
        time.sleep(2.0)
        pg_cluster.start()
        end = time.monotonic() + 30  # both recover without a restart of their own
        while time.monotonic() < end and not all(_chat(client, r.url, "w0").status_code == 200 for r in (a, b)):
            time.sleep(0.2)
        assert all(_chat(client, r.url, "w0").status_code == 200 for r in (a, b))
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(30)
    for r in down:  # while PostgreSQL is down: an OpenAI-shaped 503 with Retry-After, never a 500
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "store_unavailable"
    assert ready == [503, 503]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    assert slowest[0] < 20  # nothing waited past the request timeout
    from e2p.store import open_store

    store = open_store(replicas[2])
    try:
        for user, seed in acked.items():  # every acknowledged write is there
            assert np.array_equal(store.get(user).vector, np.asarray(_vec(seed), dtype="float32")), user
    finally:
        store.close()


@pytest.mark.backbone
def test_a_killed_replica_leaves_the_other_unaffected(replicas):
    a, b, _ = replicas
    with httpx.Client(timeout=30) as client:
        assert _put(client, b.url, "carol", 7).status_code == 200
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        for i in range(5):
            assert _chat(client, b.url, "carol").status_code == 200
            assert _put(client, b.url, "carol", 8 + i).json()["version"] == 2 + i


def test_deletion_on_postgres_at_the_byte_level(pg_cluster):
    """DELETE removes the row and vacuums; purge (VACUUM FULL, `e2p users delete --purge`) rewrites the tables so the
    deleted vector's bytes are in none of their files. What the WAL keeps is stated in docs/privacy.md, not promised."""
    import psycopg

    from e2p.store import open_store

    dsn = new_database(pg_cluster)
    store = open_store(dsn, dim=DIM)
    secret = np.full(DIM, 0.123456789, dtype="float32")
    secret[::7] = np.arange(len(secret[::7]), dtype="float32") * 1e-3 + 0.987654  # a byte pattern nothing else has
    store.put("gone", secret)
    for i in range(50):
        store.put(f"keep{i}", np.asarray(_vec(i), dtype="float32"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # the heap pages on disk
    needle = secret.tobytes()[:64]
    files = pg_cluster.relation_files(dsn, "embeddings")
    assert any(needle in f.read_bytes() for f in files)
    assert store.delete("gone") and store.get("gone") is None
    store.purge()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    files = pg_cluster.relation_files(dsn, "embeddings")
    assert files and not any(needle in f.read_bytes() for f in files)
    assert store.get("keep3") is not None and len(store) == 50
    store.close()


@pytest.mark.backbone
def test_readyz_is_503_while_the_model_loads_then_200(tmp_path):
    """The port opens before the model loads: a probe sees 503 `starting` (not a refused connection), a chat gets an
    OpenAI-shaped 503 with Retry-After, and /readyz turns 200 once the model is loaded."""
    replica = Replica(str(tmp_path / "s.db"), tmp_path)
    seen, chat = [], None
    try:
        end = time.monotonic() + 180
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < end:
                assert replica.proc.poll() is None, f"replica exited; see {replica.log.name}"
                try:
                    r = client.get(replica.url + "/readyz")
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                seen.append((r.status_code, r.json().get("status")))
                if r.status_code == 200:
                    break
                if chat is None:
                    chat = _chat(client, replica.url, "anyone")
                time.sleep(0.05)
    finally:
        replica.stop()
    assert (503, "starting") in seen and seen[-1][0] == 200
    assert chat.status_code == 503 and chat.headers["retry-after"] == "1" and chat.json()["error"]["code"] == "starting"
