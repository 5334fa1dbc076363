"""Fairness between tenants: does tenant A's flood of long requests make tenant B's short ones wait?

    python benchmarks/tenant_fairness.py                  # the shipped projector, about 3 minutes
    python benchmarks/tenant_fairness.py --flood 48 --flood-tokens 200 --short 12

Starts `e2p serve` with a key file of two tenants (a and b). First B alone sends --short short requests (8 tokens,
one at a time); then A sends --flood long requests (--flood-tokens each) all at once and, while they run, B sends the
same short requests again. Reports B's latency p50 / p95 alone and beside the flood, and A's outcome (every request
answered, or refused with 429). Goal (issue 45): B's p95 within +20% of B alone, A losing nothing. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import default_projector, free_port, stop_server, wait_healthy  # noqa: E402
from serve_soak import pct  # noqa: E402

KEYS = {"a": "tenant-a-benchmark-key-000001", "b": "tenant-b-benchmark-key-000001"}


def chat(url: str, tenant: str, tokens: int, text: str) -> tuple[int, float]:
    body = {"model": "e2p", "messages": [{"role": "user", "content": text}], "max_tokens": tokens, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEYS[tenant]}"},
                   timeout=600)
    return r.status_code, time.perf_counter() - t0


def b_round(url: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        status, seconds = chat(url, "b", 8, f"Say hello number {i}.")
        assert status == 200, status
        out.append(seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--projector", default=None, help="default: the shipped one")
    ap.add_argument("--flood", type=int, default=48, help="tenant A's long requests, sent at once")
    ap.add_argument("--flood-tokens", type=int, default=200)
    ap.add_argument("--short", type=int, default=12, help="tenant B's short requests, one at a time, per phase")
    ap.add_argument("--out", default="benchmarks/results/tenant_fairness.json")
    args = ap.parse_args()
    from e2p.serve.keys import add_key

    folder = Path(tempfile.mkdtemp(prefix="e2p-fairness-"))
    for tenant, key in KEYS.items():
        add_key(folder / "keys.json", tenant, "user", key)
    projector = args.projector or default_projector(None)[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "e2p.cli", "serve", "--projector", projector, "--store", str(folder / "users.db"),
           "--port", str(port), "--keys", str(folder / "keys.json"), "--model-name", "e2p", "--max-batch-size", "8",
           "--max-queue", "128", "--max-tokens-limit", str(max(256, args.flood_tokens)), "--request-timeout", "900"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(args.out).with_suffix(".server.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        wait_healthy(url, proc)
        b_round(url, 2)  # warm-up
        alone = b_round(url, args.short)
        flood: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda i=i: flood.append(chat(url, "a", args.flood_tokens,
                                                                          f"Tell me a long story, part {i}.")))
                   for i in range(args.flood)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # A's rows hold the batch and the rest of A waits in the queue
        beside = b_round(url, args.short)
        for t in threads:
            t.join()
    finally:
        stop_server(proc)
    statuses = sorted({s for s, _ in flood})
    summary = {"b_alone_s": {"p50": pct(alone, 50), "p95": pct(alone, 95)},
               "b_beside_flood_s": {"p50": pct(beside, 50), "p95": pct(beside, 95)},
               "b_p95_ratio": round(pct(beside, 95) / pct(alone, 95), 3),
               "a_requests": len(flood), "a_statuses": statuses, "a_answered": sum(s == 200 for s, _ in flood),
               "a_p50_s": pct([t for _, t in flood], 50), "flood_tokens": args.flood_tokens, "short_tokens": 8,
               "command": "python benchmarks/tenant_fairness.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps({"summary": summary, "b_alone": alone, "b_beside": beside}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
