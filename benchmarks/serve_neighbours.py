"""Bad neighbours: do good requests slow down when other clients send bad or flooding ones?

    python benchmarks/serve_neighbours.py                 # 6 windows x 60 s, about 8 min with start-up
    python benchmarks/serve_neighbours.py --window 10 --rounds 1   # smoke run, about 2 min

One `e2p serve` (as serve_soak.py starts it) and --good clients looping over personalized greedy chats the whole
time. The run alternates windows of --window seconds: in "clean" windows --bad more clients send short good chats;
in "mixed" windows the same clients send a bad request after each of them (half their requests are bad; the soak
mixes in 1 in 5), going in turn through every bad kind of the soak benchmark plus the round-two ones: stop lists
over the count or length limit (400), a stop list at the limit (valid: 200), bursts of 12 concurrent text embeddings
(above --max-embed-requests: 429s), bursts of 48 concurrent user-endpoint reads (above --max-user-requests: 429s)
and inputs too large to embed. Alternating windows in one run means both sides share the machine's state; the
goal is that the good requests' p95 latency rises by less than 20% in the mixed windows. Writes JSON (--out).

The flood case (issue 45): `--back-to-back` makes the bad clients send only bad requests, one after another with no
pause, and `--bad-requests-per-minute N` gives them a key of their own with that rate limit (a key file beside the
good clients' key), so the server refuses them on their headers (429) before reading a body:

    python benchmarks/serve_neighbours.py --kinds 1500_messages --back-to-back --window 30 --rounds 2 \
        --out benchmarks/results/serve_flood.json
    python benchmarks/serve_neighbours.py --kinds 1500_messages --back-to-back --window 30 --rounds 2 \
        --bad-requests-per-minute 60 --out benchmarks/results/serve_flood_limited.json
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import embedding_dim, launch, model_id, stop_server, store_users, wait_healthy, warm_up  # noqa: E402
from serve_soak import BAD_EXPECTED, add_server_arguments, bad_request, chat, pct, send  # noqa: E402

ROUND_TWO = {"too_many_stops": 400, "too_long_stops": 400, "stops_at_limit": 200, "embeddings_burst": 429,
             "user_reads_burst": 429, "embeddings_too_large": 400}
GOAL = 0.20  # the good requests' p95 may rise by less than this in mixed windows
BAD_KEY = "bad-neighbour-benchmark-key-0001"  # --bad-requests-per-minute: the bad clients' own, rate-limited key


async def burst(c: httpx.AsyncClient, n: int, path: str, kwargs: dict, method: str = "post") -> int | str:
    """`n` requests at once; 429 when any was refused (the point of the burst), else the first odd status."""
    async def one():
        try:
            return (await c.request(method, path, timeout=60, **kwargs)).status_code
        except httpx.HTTPError as exc:
            return f"error: {type(exc).__name__}"
    statuses = await asyncio.gather(*(one() for _ in range(n)))
    return 429 if 429 in statuses else next((s for s in statuses if s != 200), 200)


async def bad_one(c, admin, kind: str, ctx: dict, rng: random.Random) -> int | str:
    """Send one bad request (or burst) of `kind`; its status."""
    model, users = ctx["model"], ctx["users"]
    body = chat(model, f"user{rng.randrange(users)}", rng, 8)
    body["temperature"] = 0.0
    if kind in BAD_EXPECTED:
        path, kwargs = bad_request(kind, model, ctx["dim"], users, rng)
        return (await send(c, path, kwargs, 120))[0]
    if kind == "too_many_stops":
        body["stop"] = [f"s{i}" for i in range(ctx["max_stops"] + 1)]
    elif kind == "too_long_stops":
        body["stop"] = ["x" * (ctx["max_stop_chars"] + 1)]
    elif kind == "stops_at_limit":  # valid, and as heavy as the limits allow: matched against every new token
        per = ctx["max_stop_chars"] // ctx["max_stops"]
        body["stop"] = [f"{i:02d}" + "q" * (per - 2) for i in range(ctx["max_stops"])]
    elif kind == "embeddings_burst":
        return await burst(c, 12, "/v1/embeddings", {"json": {"model": model, "input": ["a short profile"] * 4}})
    elif kind == "user_reads_burst":
        return await burst(admin, 48, f"/v1/users/user{rng.randrange(users)}/embedding", {}, method="get")
    elif kind == "embeddings_too_large":
        return (await send(c, "/v1/embeddings", {"json": {"model": model, "input": ["word"] * 300}}, 120))[0]
    return (await send(c, "/v1/chat/completions", {"json": body}, 120))[0]


async def good_client(c, ctx: dict, rng: random.Random, max_tokens: int) -> None:
    while not ctx["done"]:
        window = ctx["window"]
        status, latency, tokens, _ = await send(c, "/v1/chat/completions",
                                                {"json": chat(ctx["model"], f"user{rng.randrange(ctx['users'])}",
                                                              rng, max_tokens) | {"temperature": 0.0}}, 300)
        if window == ctx["window"]:  # a request that straddles two windows counts for neither
            ctx["good"].append({"window": window, "status": status, "latency": round(latency, 4), "tokens": tokens})


async def bad_client(c, admin, ctx: dict, rng: random.Random) -> None:
    while not ctx["done"]:
        if not ctx["back_to_back"]:
            body = chat(ctx["model"], f"user{rng.randrange(ctx['users'])}", rng, 8) | {"temperature": 0.0}
            await send(c, "/v1/chat/completions", {"json": body}, 300)  # every other request is a short good chat
        if not ctx["window"].startswith("mixed"):
            if ctx["back_to_back"]:
                await asyncio.sleep(0.05)  # a clean window: the flooding clients are idle
            continue
        kind = next(ctx["kinds"])
        status = await bad_one(c, admin, kind, ctx, rng)
        expected = {**BAD_EXPECTED, **ROUND_TWO}[kind]
        ok = status == expected or (expected != 200 and isinstance(status, int) and 400 <= status < 500)
        if kind in ("embeddings_burst", "user_reads_burst"):
            ok = status in (200, 429)  # a burst may find the others' requests finished already
        ctx["bad"].append({"window": ctx["window"], "kind": kind, "status": status, "as_expected": ok})


async def run(args, url: str, model: str, dim: int) -> dict:
    ctx = {"model": model, "dim": dim, "users": args.users, "max_stops": args.max_stop_strings,
           "max_stop_chars": args.max_stop_chars, "window": "warm", "done": False, "good": [], "bad": [],
           "back_to_back": args.back_to_back,
           "kinds": itertools.cycle(args.kinds.split(",") if args.kinds else list(BAD_EXPECTED) + list(ROUND_TWO)), "windows": []}
    rng = random.Random(args.seed)
    auth = {"authorization": f"Bearer {args.api_key}"}
    limits = httpx.Limits(max_connections=args.good + args.bad * 48)
    bad_auth = {"authorization": f"Bearer {BAD_KEY}"} if args.bad_requests_per_minute else auth
    async with httpx.AsyncClient(base_url=url, headers=auth, limits=limits) as c, \
            httpx.AsyncClient(base_url=url, headers=bad_auth, limits=limits) as bad, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {args.admin_key}"}, limits=limits) as admin:
        tasks = [asyncio.create_task(good_client(c, ctx, random.Random(rng.random()), args.max_tokens))
                 for _ in range(args.good)]
        tasks += [asyncio.create_task(bad_client(bad, admin, ctx, random.Random(rng.random()))) for _ in range(args.bad)]
        await asyncio.sleep(args.window / 2)  # the good clients fill the batch before the first window counts
        for i in range(args.rounds * 2):
            name = f"{('clean', 'mixed')[i % 2]}{i // 2}"
            ctx["window"] = name
            print(f"[{time.strftime('%H:%M:%S')}] window {i + 1}/{args.rounds * 2}: {name}", flush=True)
            await asyncio.sleep(args.window)
        ctx["done"] = True
        await asyncio.gather(*tasks)
    return ctx


def summarize(ctx: dict, args) -> dict:
    side = {}
    for name in ("clean", "mixed"):
        rows = [r for r in ctx["good"] if r["window"].startswith(name)]
        ok = [r["latency"] for r in rows if r["status"] == 200]
        side[name] = {"good_requests": len(rows), "good_200": len(ok), "good_not_200": len(rows) - len(ok),
                      "p50_s": pct(ok, 50), "p95_s": pct(ok, 95),
                      "tokens_per_s": round(sum(r["tokens"] for r in rows) / (args.window * args.rounds), 2)}
    bad = {}
    for r in ctx["bad"]:
        b = bad.setdefault(r["kind"], {"sent": 0, "as_expected": 0, "statuses": {}})
        b["sent"] += 1
        b["as_expected"] += r["as_expected"]
        b["statuses"][str(r["status"])] = b["statuses"].get(str(r["status"]), 0) + 1
    rise = (side["mixed"]["p95_s"] / side["clean"]["p95_s"] - 1) if side["clean"]["p95_s"] and side["mixed"]["p95_s"] \
        else None
    no_5xx = all(not s.startswith("5") for b in bad.values() for s in b["statuses"])
    goals = {"p95_rise_below_20pct": rise is not None and rise < GOAL,
             "good_all_200": all(s["good_not_200"] == 0 for s in side.values()),
             "bad_all_as_expected": all(b["as_expected"] == b["sent"] for b in bad.values()), "no_5xx": no_5xx}
    return {"sides": side, "p95_rise": None if rise is None else round(rise, 4), "bad": bad, "goals": goals}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=float, default=60.0, help="seconds per window")
    p.add_argument("--rounds", type=int, default=3, help="pairs of clean + mixed windows")
    p.add_argument("--good", type=int, default=8, help="clients sending good chats all the time")
    p.add_argument("--bad", type=int, default=4, help="extra clients sending bad requests in mixed windows")
    p.add_argument("--kinds", default=None, help="comma-separated bad kinds to send (default: all)")
    p.add_argument("--back-to-back", action="store_true", help="bad clients send only bad requests, with no pause")
    p.add_argument("--bad-requests-per-minute", type=int, default=None,
                   help="give the bad clients a key of their own with this rate limit (a key file)")
    add_server_arguments(p)
    p.add_argument("--max-stop-strings", type=int, default=16, help="as the server's default")
    p.add_argument("--max-stop-chars", type=int, default=256, help="as the server's default")
    p.add_argument("--out", default="benchmarks/results/serve_neighbours.json")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.bad_requests_per_minute:
        import tempfile

        from e2p.serve.keys import add_key
        from e2p.serve.limits import Limits

        args.keys = str(Path(tempfile.mkdtemp(prefix="e2p-neighbours-")) / "keys.json")
        add_key(args.keys, "default", "user", BAD_KEY, Limits(requests_per_minute=args.bad_requests_per_minute))
    proc, url, projector_kind = launch(args)
    try:
        wait_healthy(url, proc)
        model, dim = model_id(url, args.api_key), embedding_dim(args.projector)
        store_users(url, args.admin_key, args.users, dim, args.seed)
        warm_up(url, args.api_key, model)
        httpx.post(url + "/v1/embeddings", headers={"authorization": f"Bearer {args.api_key}"}, timeout=300,
                   json={"model": model, "input": "load the text encoder"}).raise_for_status()  # not in a window
        ctx = asyncio.run(run(args, url, model, dim))
    finally:
        stop_server(proc)
    result = {"model": model, "projector_kind": projector_kind, "window_s": args.window, "rounds": args.rounds,
              "good_clients": args.good, "bad_clients": args.bad, "max_tokens": args.max_tokens,
              "back_to_back": args.back_to_back, "bad_requests_per_minute": args.bad_requests_per_minute,
              "command": "python benchmarks/serve_neighbours.py " + " ".join(sys.argv[1:]),
              **summarize(ctx, args)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, s in result["sides"].items():
        print(f"{name}: {s['good_200']}/{s['good_requests']} good answered, p50 {s['p50_s']} s, p95 {s['p95_s']} s, "
              f"{s['tokens_per_s']} tok/s")
    for kind, b in result["bad"].items():
        print(f"  bad {kind}: {b['as_expected']}/{b['sent']} as expected {b['statuses']}")
    print(f"good p95 rise with bad neighbours: {result['p95_rise']:+.1%} (goal < {GOAL:.0%})"
          if result["p95_rise"] is not None else "no p95 measured")
    for goal, ok in result["goals"].items():
        print(f"{'PASS' if ok else 'FAIL'} {goal}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
