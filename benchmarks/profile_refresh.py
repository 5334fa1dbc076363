"""Refresh latency of the live profile: from an event's 200 to a reply that uses the new version, on one server.

    python benchmarks/profile_refresh.py                                  # the shipped projector, about 2 min
    python benchmarks/profile_refresh.py --projector runs/i44/style       # a PENS text + style projector

Starts `e2p serve` (as serve_load.py does), then --rounds times, for one of --users users in turn:
  1. `POST /v1/embeddings` of the round's text: the server's encoder alone, through the same HTTP stack;
  2. `POST /v1/users/{id}/events` with that text: embedded, folded into the running sums, stored (version + 1);
  3. right after its 200, a streamed chat for that user: the time until its headers arrive, which carry the
     version the reply uses (x-e2p-embedding-version), and until its first token.
Reports p50 / p95 of each, of the event's time beyond the encoder's (2 minus 1, per round), and the share of
replies that used the new version (must be all: one server reads its store at every request). Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import launch, model_id, stop_server, wait_healthy  # noqa: E402
from serve_soak import pct  # noqa: E402

HEADLINES = ["Stocks rally as the Fed holds rates", "Why the new phone matters: a review", "Storm hits the coast overnight",
             "Five things to know about the election", "Local team wins again", "Is coffee good for you?",
             "NASA delays its moon launch", "A quiet town and a loud mystery", "The best hikes near the city",
             "Markets slide on oil prices"]


def one_round(http: httpx.Client, admin: dict, user: dict, model: str, name: str, text: str) -> dict:
    t0 = time.perf_counter()
    r = http.post("/v1/embeddings", json={"model": model, "input": text}, headers=user)
    r.raise_for_status()
    t1 = time.perf_counter()
    r = http.post(f"/v1/users/{name}/events", json={"texts": [text]}, headers=admin)
    r.raise_for_status()
    version = r.json()["version"]
    t2 = time.perf_counter()
    body = {"model": model, "messages": [{"role": "user", "content": "Write a headline about the weather."}],
            "user": name, "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=user) as s:
        s.raise_for_status()
        t3 = time.perf_counter()
        used = int(s.headers["x-e2p-embedding-version"])
        first = None
        for line in s.iter_lines():
            if line.startswith("data: ") and '"content"' in line and first is None:
                first = time.perf_counter()
    return {"encoder_s": t1 - t0, "event_s": t2 - t1, "event_beyond_encoder_s": (t2 - t1) - (t1 - t0),
            "to_reply_headers_s": t3 - t2, "to_first_token_s": (first or t3) - t2, "version": version,
            "used_new_version": used == version}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--projector", default=None, help="a projector folder (default: the shipped one)")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--users", type=int, default=10, help="users the rounds take turns with (at most 10)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results/profile_refresh.json")
    args = ap.parse_args()
    # what serve_load.launch reads: the server's own defaults, the soak benchmark's keys
    args.users, args.api_key, args.admin_key = min(args.users, 10), "refresh-key", "refresh-admin"
    args.max_batch_size, args.batch_wait_ms, args.max_queue, args.request_timeout = 8, 10.0, 64, 120.0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    proc, url, kind = launch(args)
    try:
        wait_healthy(url, proc)
        model = model_id(url, args.api_key)
        admin, user = {"authorization": f"Bearer {args.admin_key}"}, {"authorization": f"Bearer {args.api_key}"}
        with httpx.Client(base_url=url, timeout=120) as http:
            for u in range(args.users):  # every user starts with one event; the first also loads the encoder
                http.post(f"/v1/users/user{u}/events", json={"texts": [HEADLINES[u % len(HEADLINES)]]},
                          headers=admin).raise_for_status()
            for i in range(3):  # warm-up rounds, not counted
                one_round(http, admin, user, model, "user0", HEADLINES[i])
            rounds = [one_round(http, admin, user, model, f"user{i % args.users}",
                                f"{HEADLINES[i % len(HEADLINES)]} ({i})") for i in range(args.rounds)]
    finally:
        stop_server(proc)
    keys = ("encoder_s", "event_s", "event_beyond_encoder_s", "to_reply_headers_s", "to_first_token_s")
    summary = {"projector": args.projector, "projector_kind": kind, "rounds": len(rounds),
               "used_new_version": sum(r["used_new_version"] for r in rounds),
               **{k: {"p50_ms": 1000 * pct([r[k] for r in rounds], 50), "p95_ms": 1000 * pct([r[k] for r in rounds], 95)}
                  for k in keys},
               "command": "python benchmarks/profile_refresh.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1))
    for k in keys:
        print(f"{k:>24}: p50 {summary[k]['p50_ms']:7.1f} ms   p95 {summary[k]['p95_ms']:7.1f} ms")
    print(f"replies that used the new version: {summary['used_new_version']}/{len(rounds)}")


if __name__ == "__main__":
    main()
