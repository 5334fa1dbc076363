"""Replicas on one PostgreSQL store, measured in one run: 2 `e2p serve` replicas x 32 clients on a store of 100k users
(5% of requests PUTs) beside one replica on SQLite, and `e2p users import` of 1M x 384 into PostgreSQL beside SQLite
(rows/s, peak memory). PostgreSQL is a throwaway cluster with its default durability (fsync and synchronous_commit on).

    python benchmarks/store_replicas.py --out benchmarks/results/store_replicas.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from pgcluster import Cluster, why_not  # noqa: E402
from serve_load import free_port, stop_server, wait_healthy  # noqa: E402
from serve_soak import pct  # noqa: E402

ADMIN, KEY, DIM = "admin-key", "user-key", 384


def write_vectors(path: Path, rows: int) -> Path:
    """rows x 384 float32 unit vectors in a .npy with ids u0..u{rows-1} in a text file beside it (streamed reads)."""
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(rows, DIM))
    for i in range(0, rows, 100_000):
        block = rng.standard_normal((min(100_000, rows - i), DIM)).astype("float32")
        out[i:i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    path.with_suffix(".ids").write_text("".join(f"u{i}\n" for i in range(rows)))
    return path


def timed_import(vectors: Path, store: str) -> dict:
    """`e2p users import` as its own process: wall time, rows/s and its peak resident memory."""
    cmd = [sys.executable, "-m", "e2p.cli", "users", "import", str(vectors), "--ids", str(vectors.with_suffix(".ids")),
           "--store", store]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    out = proc.stdout.read()
    if status != 0:
        raise SystemExit(f"import into {store} failed:\n{out}")
    rows = int(out.split("imported ")[1].split()[0])
    return {"rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def start_replica(store: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "E2P_ADMIN_KEY": ADMIN, "E2P_API_KEY": KEY}
    cmd = [sys.executable, "-m", "e2p.cli", "serve", "--projector", "persona-input-k1", "--store", store, "--port",
           str(port), "--model-name", "e2p", "--max-tokens-limit", "8", "--max-queue", "256", "--request-timeout", "120"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def load(urls: list[str], clients: int, seconds: float, users: int, put_share: float) -> dict:
    """`clients` threads per replica for `seconds`: chats of one token for random stored users, `put_share` PUTs."""
    lat = {"chat": [], "put": []}
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(url: str, seed: int):
        rng = random.Random(seed)
        with httpx.Client(timeout=180) as http:
            while time.monotonic() < end:
                user = f"u{rng.randrange(users)}"
                put = rng.random() < put_share
                t = time.perf_counter()
                try:
                    if put:
                        v = np.random.default_rng(seed).standard_normal(DIM).astype("float32")
                        r = http.put(f"{url}/v1/users/{user}/embedding", json={"embedding": (v / np.linalg.norm(v)).tolist()},
                                     headers={"Authorization": f"Bearer {ADMIN}"})
                    else:
                        r = http.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                      json={"model": "e2p", "messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 1, "user": user})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == 200:
                        lat["put" if put else "chat"].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(url, i * 1000 + j)) for i, url in enumerate(urls)
               for j in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(statuses.values())
    return {"requests": total, "statuses": statuses, "errors": total - statuses.get(200, 0),
            "requests_per_s": round(total / seconds, 1),
            "chat_s": {"p50": round(pct(lat["chat"], 50), 3), "p95": round(pct(lat["chat"], 95), 3)},
            "put_s": {"p50": round(pct(lat["put"], 50), 3), "p95": round(pct(lat["put"], 95), 3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--import-rows", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000, help="users in the store under load")
    ap.add_argument("--clients", type=int, default=32, help="client threads per replica")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--out", default="benchmarks/results/store_replicas.json")
    args = ap.parse_args()
    if why_not():
        raise SystemExit(why_not())
    work = Path(tempfile.mkdtemp(prefix="e2p-replicas-"))
    cluster = Cluster(durable=True)
    results: dict = {"command": "python benchmarks/store_replicas.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
                     "postgres": "throwaway cluster, fsync and synchronous_commit on"}
    procs = []
    try:
        big = write_vectors(work / "big.npy", args.import_rows)
        results["import"] = {"postgresql": timed_import(big, cluster.dsn),
                             "sqlite": timed_import(big, str(work / "big.db"))}
        print(json.dumps(results["import"]), flush=True)
        big.unlink()
        from e2p.store import open_store  # a fresh database for the load: the 100k users

        import psycopg

        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE load")
        pg_store = cluster.dsn.rsplit("/", 1)[0] + "/load"
        small = write_vectors(work / "small.npy", args.users)
        for store in (pg_store, str(work / "load.db")):
            timed_import(small, store)
        assert len(open_store(pg_store)) == args.users
        a, url_a = start_replica(pg_store, work / "a.log")
        b, url_b = start_replica(pg_store, work / "b.log")
        procs += [a, b]
        load([url_a, url_b], 2, 5, args.users, 0.05)  # warm-up
        results["two_replicas_postgresql"] = load([url_a, url_b], args.clients, args.seconds, args.users, 0.05)
        for p in (a, b):
            stop_server(p)
        procs.clear()
        one, url = start_replica(str(work / "load.db"), work / "one.log")
        procs.append(one)
        load([url], 2, 5, args.users, 0.05)
        results["one_replica_sqlite"] = load([url], args.clients, args.seconds, args.users, 0.05)
    finally:
        for p in procs:
            stop_server(p)
        cluster.close()
    print(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
