"""Bulk-import scale check: write an N x E Parquet file of synthetic users (in chunks), import it into a
fresh SQLite store with `e2p.store.import_embeddings`, and report peak RSS and rows/s.

    python benchmarks/import_scale.py                         # 1,000,000 x 64, JSON to benchmarks/results/import_scale.json
    python benchmarks/import_scale.py --rows 50000 --dim 384 --out /tmp/x.json --workdir /tmp/imp

The import runs in a fresh child process, so the writer's memory does not hide it. Peak RSS is
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (the process's high-water mark): "baseline" is read in the
child after importing e2p.store / pyarrow / numpy and opening the store, "peak" after the import, and
"growth" is their difference: a flat figure (the same for 50k and 1M rows) means the import holds one
chunk, not the file. The Parquet file is written in chunks as well.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def write_parquet(path: Path, rows: int, dim: int, chunk: int, seed: int = 0, list_type: str = "list") -> float:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    t0 = time.time()
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        flat = pa.array(rng.standard_normal(n * dim, dtype=np.float32))
        if list_type == "fixed":
            emb = pa.FixedSizeListArray.from_arrays(flat, dim)
        else:
            offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int64 if list_type == "large" else np.int32))
            emb = (pa.LargeListArray if list_type == "large" else pa.ListArray).from_arrays(offsets, flat)
        users = pa.array([f"user-{i:09d}" for i in range(start, start + n)])
        batch = pa.table({"user": users, "embedding": emb})
        if writer is None:
            writer = pq.ParquetWriter(str(path), batch.schema)
        writer.write_table(batch)
    writer.close()
    return time.time() - t0


def child_import(pq_path: str, db_path: str, dim: int, chunk_rows: int, rows: int) -> dict:
    import numpy  # noqa: F401  (everything the import needs is loaded before the baseline)
    import pyarrow.parquet  # noqa: F401

    from e2p.store import EmbeddingStore, import_embeddings

    store = EmbeddingStore(db_path, dim=dim)
    rss_before = peak_rss_mb()
    t0 = time.time()
    n = import_embeddings(pq_path, store, chunk_rows=chunk_rows)
    import_s = time.time() - t0
    rss_after = peak_rss_mb()
    assert n == rows and len(store) == rows, (n, len(store))
    probe = store.get(f"user-{rows - 1:09d}")
    assert probe is not None and probe.vector.shape == (dim,)
    store.close()
    out = {"import_s": import_s, "rss_before": rss_before, "rss_after": rss_after}
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=10_000, help="import chunk (and writer chunk)")
    ap.add_argument("--list-type", choices=["list", "large", "fixed"], default="list")
    ap.add_argument("--workdir", default=None, help="where the Parquet file and store go (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_scale.json"))
    ap.add_argument("--child-import", nargs=2, metavar=("PARQUET", "DB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_import:
        return child_import(*args.child_import, dim=args.dim, chunk_rows=args.chunk_rows, rows=args.rows)

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="e2p-import-")
        work = Path(tmp.name)
    pq_path, db_path = work / "users.parquet", work / "users.db"
    for p in (db_path, Path(str(db_path) + "-wal"), Path(str(db_path) + "-shm")):
        p.unlink(missing_ok=True)
    rss_start = peak_rss_mb()
    write_s = write_parquet(pq_path, args.rows, args.dim, args.chunk_rows, list_type=args.list_type)
    rss_after_write = peak_rss_mb()
    import subprocess

    child = subprocess.run([sys.executable, __file__, "--child-import", str(pq_path), str(db_path),
                            "--dim", str(args.dim), "--chunk-rows", str(args.chunk_rows), "--rows", str(args.rows)],
                           check=True, capture_output=True, text=True)
    imp = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "rows": args.rows, "dim": args.dim, "chunk_rows": args.chunk_rows, "list_type": args.list_type,
        "parquet_mb": round(pq_path.stat().st_size / 2**20, 1),
        "store_mb": round(sum(p.stat().st_size for p in work.glob("users.db*")) / 2**20, 1),
        "write_parquet_s": round(write_s, 2), "writer_peak_rss_mb": round(rss_after_write, 1),
        "writer_rss_growth_mb": round(rss_after_write - rss_start, 1),
        "import_s": round(imp["import_s"], 2), "import_rows_per_s": round(args.rows / imp["import_s"]),
        "import_peak_rss_mb_baseline": round(imp["rss_before"], 1), "import_peak_rss_mb": round(imp["rss_after"], 1),
        "import_rss_growth_mb": round(imp["rss_after"] - imp["rss_before"], 1),
        "raw_embeddings_mb": round(args.rows * args.dim * 4 / 2**20, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
