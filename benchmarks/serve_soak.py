"""Soak benchmark for `e2p serve`: the server survives its users (bad requests, overload, clients that leave).

    python benchmarks/serve_soak.py                    # 3 phases x 10 min: about 32 min with start-up
    python benchmarks/serve_soak.py --minutes 0.2      # smoke run: about 3 min with start-up
    python benchmarks/serve_soak.py --users 100 --max-queue 32 --out /tmp/soak.json --plot /tmp/soak.png

Starts `e2p serve` as serve_load.py does (real default backbone, shipped projector, SQLite store in a temp dir,
API and admin keys, --max-queue, 8 rows per batch), stores --users random embeddings, then runs three phases of
--minutes each, every client looping over non-streamed personalized chats (a random stored user, greedy or
seeded sampling):

  1. 16 clients; about 1 in 5 requests is a bad one that must get a 4xx, never a 5xx (the tiny top_p is valid:
     200), and 2 of the clients give up after 1 s on a 200-token request, so the server must free their rows;
  2. 64 clients: not above the queue limit, so every answer must be 200;
  3. 96 clients: above it, so 429s are expected (the client waits its Retry-After), but still no 5xx.

The server's RSS (/proc) and /healthz are sampled every 2 s. Afterwards a few normal requests must answer 200,
then the server is stopped with SIGTERM. Prints a table and a PASS/FAIL line per goal; writes JSON (--out),
every request as JSON lines (next to --out, .requests.jsonl) and a plot of RSS and traffic over time (--plot).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (MESSAGES, embedding_dim, launch, model_id, stop_server, store_users,  # noqa: E402
                        wait_healthy, warm_up)

PHASES = [16, 64, 96]  # clients per phase
ABANDONERS = 2  # of phase 1's clients: each gives up after 1 s on a long request
BAD_SHARE = 0.2
BAD_EXPECTED = {  # bad request kind -> the status it should get (any 4xx passes; tiny_top_p is valid: 200)
    "huge_seed": 400, "tiny_top_p": 200, "empty_prompt": 400, "1500_messages": 400,
    "lone_surrogate": 400, "unknown_user": 404, "wrong_dim_embedding": 400, "string_in_embedding": 400}


def rss_mb(pid: int) -> float | None:
    """Resident memory of the server process, read from outside it (works even while it is too busy to answer)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def chat(model: str, user: str, rng: random.Random, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(MESSAGES)}], "user": user,
            "max_tokens": max_tokens, "temperature": 0.0}
    if rng.random() < 0.5:
        body.update(temperature=0.8, seed=rng.randrange(2 ** 32))
    return body


def bad_request(kind: str, model: str, dim: int, users: int, rng: random.Random) -> tuple[str, dict]:
    """(path, httpx keyword arguments) of one request of the bad `kind`."""
    body = chat(model, f"user{rng.randrange(users)}", rng, 8)
    if kind == "huge_seed":
        body.update(temperature=1.0, seed=2 ** 64)
    elif kind == "tiny_top_p":
        body.update(temperature=1.0, top_p=1e-300)
    elif kind == "empty_prompt":
        return "/v1/completions", {"json": {"model": model, "prompt": "", "max_tokens": 8}}
    elif kind == "1500_messages":
        body["messages"] = [{"role": ("user", "assistant")[i % 2], "content": f"line {i}"} for i in range(1500)]
    elif kind == "lone_surrogate":  # json.dumps escapes it as the 6 characters \ud800 (httpx's json= cannot encode it)
        body["messages"] = [{"role": "user", "content": "\ud800"}]
        return "/v1/chat/completions", {"content": json.dumps(body).encode(),
                                        "headers": {"content-type": "application/json"}}
    elif kind == "unknown_user":
        body["user"] = f"nobody-{rng.randrange(10 ** 9)}"
    elif kind in ("wrong_dim_embedding", "string_in_embedding"):
        emb = np.random.default_rng(rng.randrange(2 ** 32)).standard_normal(dim).tolist()
        if kind == "wrong_dim_embedding":
            emb.append(0.0)
        else:
            emb[0] = "0.5"
        del body["user"]
        body["e2p"] = {"embedding": emb}
    return "/v1/chat/completions", {"json": body}


async def send(c: httpx.AsyncClient, path: str, kwargs: dict, timeout: float) -> tuple[int | str, float, int, str]:
    """(status or "timeout"/"error", latency, completion tokens, error body) of one request."""
    t0 = time.perf_counter()
    try:
        resp = await c.post(path, timeout=timeout, **kwargs)
    except httpx.TimeoutException:
        return "timeout", time.perf_counter() - t0, 0, ""
    except httpx.HTTPError as exc:
        return "error", time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - t0
    if resp.status_code == 200:
        return 200, latency, resp.json().get("usage", {}).get("completion_tokens", 0), ""
    return resp.status_code, latency, 0, resp.text[:400]


async def client(c, args, ctx: dict, phase: str, mode: str, deadline: float, rng: random.Random) -> None:
    """Loop until the phase ends; mode "mixed" sends some bad requests, "abandon" only long ones it gives up on."""
    while time.monotonic() < deadline:
        kind, path, timeout = "good", "/v1/chat/completions", args.request_timeout + 30
        if mode == "abandon":
            kind, timeout = "abandoned", 1.0
            kwargs = {"json": chat(ctx["model"], f"user{rng.randrange(args.users)}", rng, 200)}
        elif mode == "mixed" and rng.random() < BAD_SHARE:
            kind = next(ctx["bad_kinds"])  # in turn, so that even a short run sends every kind
            path, kwargs = bad_request(kind, ctx["model"], ctx["dim"], args.users, rng)
        else:
            kwargs = {"json": chat(ctx["model"], f"user{rng.randrange(args.users)}", rng, args.max_tokens)}
        status, latency, tokens, body = await send(c, path, kwargs, timeout)
        rec = {"t": round(time.monotonic() - ctx["t0"], 3), "phase": phase, "kind": kind, "status": status,
               "latency": round(latency, 4), "tokens": tokens}
        if body and status not in (429, BAD_EXPECTED.get(kind, 200)):
            rec["body"] = body  # what went wrong, for the report
        ctx["requests"].append(rec)
        if status == 429:
            await asyncio.sleep(1.0)  # the server's Retry-After
        elif mode == "abandon":
            await asyncio.sleep(1.0)


async def sampler(pid: int, url: str, ctx: dict, stop: asyncio.Event) -> None:
    """RSS and /healthz every 2 s, on a connection of its own so that a full client pool cannot delay it."""
    async with httpx.AsyncClient(base_url=url) as c:
        while not stop.is_set():
            try:
                health = (await c.get("/healthz", timeout=5)).status_code
            except httpx.HTTPError:
                health = "timeout"
            ctx["samples"].append({"t": round(time.monotonic() - ctx["t0"], 2), "phase": ctx["phase"],
                                   "rss_mb": rss_mb(pid), "healthz": health})
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except asyncio.TimeoutError:
                pass


async def wait_idle(c: httpx.AsyncClient, limit: float = 120) -> float:
    """Seconds until the server has nothing queued or decoding: the rows of clients that left must be freed."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        h = (await c.get("/healthz")).json()
        if not h["busy"] and h["queue_depth"] == 0:
            break
        await asyncio.sleep(0.2)
    return round(time.monotonic() - t0, 2)


async def server_statuses(admin: httpx.AsyncClient) -> dict[str, int]:
    """POST answers by status as the server counted them (/metrics): also those to clients that had already left."""
    counts = {}
    text = (await admin.get("/metrics")).text
    for labels, value in re.findall(r'^e2p_requests_total\{(.*)\} ([0-9.e+]+)$', text, re.M):
        if 'method="POST"' not in labels:
            continue  # not /healthz and /metrics, which the benchmark itself polls
        status = re.search(r'status="(\d+)"', labels).group(1)
        counts[status] = counts.get(status, 0) + int(float(value))
    return counts


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


async def soak(args, url: str, pid: int, model: str, dim: int) -> dict:
    ctx = {"t0": time.monotonic(), "phase": "c16", "requests": [], "samples": [], "model": model, "dim": dim,
           "bad_kinds": itertools.cycle(BAD_EXPECTED)}
    rng, seconds = random.Random(args.seed), args.minutes * 60
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(pid, url, ctx, stop))
    auth = {"authorization": f"Bearer {args.api_key}"}
    admin = httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {args.admin_key}"}, timeout=30)
    phases, counted = [], await server_statuses(admin)
    print(f"soak: {len(PHASES)} phases x {args.minutes:g} min = {len(PHASES) * args.minutes:g} min of load", flush=True)
    for i, clients in enumerate(PHASES):
        name = ctx["phase"] = f"c{clients}"
        start = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] phase {i + 1}/{len(PHASES)}: {clients} clients for {args.minutes:g} min "
              f"(until about {time.strftime('%H:%M:%S', time.localtime(time.time() + seconds))})", flush=True)
        modes = ["mixed"] * (clients - ABANDONERS) + ["abandon"] * ABANDONERS if i == 0 else ["good"] * clients
        rss_start = rss_mb(pid)
        async with httpx.AsyncClient(base_url=url, headers=auth, limits=httpx.Limits(max_connections=clients)) as c:
            await asyncio.gather(*(client(c, args, ctx, name, m, start + seconds, random.Random(rng.random()))
                                   for m in modes))
        end = time.monotonic()
        idle = await wait_idle(admin)
        now = await server_statuses(admin)
        phases.append({"name": name, "clients": clients, "above_queue_limit": clients > args.max_queue,
                       "start": round(start - ctx["t0"], 2), "end": round(end - ctx["t0"], 2), "idle_after_s": idle,
                       "rss_start_mb": rss_start, "server_statuses": diff(now, counted)})
        counted = now
    ctx["phase"] = "after"
    async with httpx.AsyncClient(base_url=url, headers=auth) as c:
        for _ in range(args.after_requests):
            status, latency, tokens, body = await send(c, "/v1/chat/completions",
                                                       {"json": chat(model, f"user{rng.randrange(args.users)}", rng,
                                                                     args.max_tokens)}, args.request_timeout + 30)
            ctx["requests"].append({"t": round(time.monotonic() - ctx["t0"], 3), "phase": "after", "kind": "good",
                                    "status": status, "latency": round(latency, 4), "tokens": tokens,
                                    **({"body": body} if body else {})})
    healthz_after = (await admin.get("/healthz")).status_code
    after_statuses = diff(await server_statuses(admin), counted)
    rss_end = rss_mb(pid)
    await admin.aclose()
    stop.set()
    await sampling
    return {"phases": phases, "requests": ctx["requests"], "samples": ctx["samples"], "rss_end_mb": rss_end,
            "healthz_after": healthz_after,
            "after_server_statuses": after_statuses, "warm_up_t": min(60.0, 0.2 * seconds)}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def summarize(run: dict) -> dict:
    """Per-phase counts and latencies, RSS growth after warm-up, and a verdict per goal."""
    reqs, samples = run["requests"], run["samples"]
    for ph in run["phases"]:
        mine = [r for r in reqs if r["phase"] == ph["name"]]
        by_status, by_kind = {}, {}
        for r in mine:
            by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
            kind = by_kind.setdefault(r["kind"], {})
            kind[str(r["status"])] = kind.get(str(r["status"]), 0) + 1
        good = [r for r in mine if r["kind"] == "good"]
        ok = [r["latency"] for r in good if r["status"] == 200]
        allowed = (200, 429) if ph["above_queue_limit"] else (200,)
        srv = ph["server_statuses"]
        ph.update(requests=len(mine), by_status=by_status, by_kind=by_kind,
                  p50_s=pct(ok, 50), p95_s=pct(ok, 95),
                  tokens_per_s=round(sum(r["tokens"] for r in mine) / max(ph["end"] - ph["start"], 1e-9), 2),
                  n_5xx=sum(isinstance(r["status"], int) and r["status"] >= 500 for r in mine),
                  server_5xx=sum(v for k, v in srv.items() if k.startswith("5")),
                  good_errors=sum(r["status"] not in allowed for r in good),
                  healthz_not_200=sum(s["healthz"] != 200 for s in samples if s["phase"] == ph["name"]),
                  unexpected=[r for r in mine if "body" in r][:10])
    warm_t = run["phases"][0]["start"] + run["warm_up_t"]
    later = [s for s in samples if s["t"] >= warm_t and s["rss_mb"] is not None]
    rss = {"warm_up_t_s": round(warm_t, 2), "warm_up_mb": later[0]["rss_mb"] if later else None,
           "max_after_warm_up_mb": max(s["rss_mb"] for s in later) if later else None, "end_mb": run["rss_end_mb"]}
    rss["growth_after_warm_up_pct"] = (round(100 * (rss["max_after_warm_up_mb"] / rss["warm_up_mb"] - 1), 2)
                                       if later else None)
    bad = {}
    for r in reqs:
        if r["kind"] in BAD_EXPECTED:
            bad.setdefault(r["kind"], {}).setdefault(str(r["status"]), 0)
            bad[r["kind"]][str(r["status"])] += 1
    bad_ok = all(k in bad for k in BAD_EXPECTED) and all(
        all((s == "200") if k == "tiny_top_p" else s.startswith("4") for s in bad[k]) for k in bad)
    below = [p for p in run["phases"] if not p["above_queue_limit"]]
    above = [p for p in run["phases"] if p["above_queue_limit"]]
    after = [r for r in reqs if r["phase"] == "after"]
    gave_up = sum(r["kind"] == "abandoned" and r["status"] == "timeout" for r in reqs)
    first = run["phases"][0]
    goals = {
        "no errors below the queue limit": (all(p["n_5xx"] + p["server_5xx"] + p["good_errors"] == 0 for p in below),
                                            ", ".join(f"{p['name']}: {p['n_5xx']} 5xx seen, {p['server_5xx']} 5xx "
                                                      f"counted by the server, {p['good_errors']} good not 200"
                                                      for p in below)),
        "429 and no 5xx above it": (bool(above) and all(p["by_status"].get("429", 0) > 0 and p["good_errors"] == 0
                                                        and p["n_5xx"] + p["server_5xx"] == 0 for p in above),
                                    ", ".join(f"{p['name']}: {p['by_status'].get('429', 0)} 429, {p['n_5xx']} 5xx seen, "
                                              f"{p['server_5xx']} 5xx counted by the server, {p['good_errors']} other "
                                              "non-200" for p in above)),
        "bad requests answered 4xx (tiny top_p 200)": (bad_ok, "; ".join(f"{k} {v}" for k, v in bad.items())
                                                       + "; missing: " + (", ".join(set(BAD_EXPECTED) - set(bad))
                                                                          or "none")),
        "RSS growth < 10% after warm-up": (rss["growth_after_warm_up_pct"] is not None
                                           and rss["growth_after_warm_up_pct"] < 10,
                                           f"{rss['growth_after_warm_up_pct']}% ({rss['warm_up_mb']:.0f} -> "
                                           f"max {rss['max_after_warm_up_mb']:.0f} MB)" if later else "no samples"),
        "abandoned clients' rows freed (answered 499)": (
            first["server_statuses"].get("499", 0) >= gave_up,
            f"{gave_up} gave up; the server answered {first['server_statuses'].get('499', 0)} with 499 and "
            f"{first['server_5xx']} with 5xx in {first['name']}; idle {first['idle_after_s']}s after it"),
        "normal answers afterwards": (bool(after) and all(r["status"] == 200 for r in after)
                                      and run["healthz_after"] == 200,
                                      f"{sum(r['status'] == 200 for r in after)}/{len(after)} 200, "
                                      f"/healthz {run['healthz_after']}"),
    }
    return {"phases": run["phases"], "bad_requests": bad, "rss": rss,
            "goals": {k: {"pass": bool(v[0]), "detail": v[1]} for k, v in goals.items()}}


def report(summary: dict) -> None:
    head = ("phase", "reqs", "200", "429", "4xx", "5xx", "gave up", "t/o+err", "good err", "srv 5xx", "p50 s", "p95 s",
            "tok/s", "RSS MB", "idle s")
    rows = []
    for p in summary["phases"]:
        st, gave_up = p["by_status"], p["by_kind"].get("abandoned", {}).get("timeout", 0)
        rows.append((p["name"], p["requests"], st.get("200", 0), st.get("429", 0),
                     sum(v for k, v in st.items() if k.startswith("4") and k != "429"), p["n_5xx"], gave_up,
                     st.get("timeout", 0) + st.get("error", 0) - gave_up, p["good_errors"], p["server_5xx"],
                     p["p50_s"], p["p95_s"], p["tokens_per_s"], f"{p['rss_start_mb']:.0f}", p["idle_after_s"]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    rss = summary["rss"]
    print(f"RSS: warm-up {rss['warm_up_mb']:.0f} MB at {rss['warm_up_t_s']}s, max after {rss['max_after_warm_up_mb']:.0f} "
          f"MB, end {rss['end_mb']:.0f} MB: growth {rss['growth_after_warm_up_pct']}%")
    print("bad requests: " + "; ".join(f"{k} {v}" for k, v in summary["bad_requests"].items()))
    print("server-side statuses: " + "; ".join(f"{p['name']} {p['server_statuses']}" for p in summary["phases"]))
    for p in summary["phases"]:
        for r in p["unexpected"]:
            print(f"  {p['name']} {r['kind']} -> {r['status']}: {r.get('body', '')[:300]}")
    for name, g in summary["goals"].items():
        print(f"{'PASS' if g['pass'] else 'FAIL'}  {name}: {g['detail']}")


def timeline(requests: list[dict], end: float) -> dict:
    """Requests/s by outcome and p50 latency of good 200s, in bins of about 1/100 of the run."""
    width = max(2.0, end / 100)
    edges = np.arange(0, end + width, width)
    t = np.array([r["t"] for r in requests])
    out = {"bin_s": width, "t": (edges[:-1] + width / 2).round(2).tolist()}
    groups = {"200": lambda r: r["status"] == 200, "429": lambda r: r["status"] == 429,
              "other 4xx": lambda r: isinstance(r["status"], int) and 400 <= r["status"] < 500 and r["status"] != 429,
              "gave up (abandoned)": lambda r: r["kind"] == "abandoned" and r["status"] == "timeout",
              "5xx / timeout / error": lambda r: r["kind"] != "abandoned" and not (isinstance(r["status"], int)
                                                                                   and r["status"] < 500)}
    for name, pick in groups.items():
        mask = np.array([pick(r) for r in requests], dtype=bool)
        out[name] = (np.histogram(t[mask], edges)[0] / width).round(3).tolist() if len(t) else []
    idx = np.digitize(t, edges) - 1
    lat = [[r["latency"] for r, i in zip(requests, idx) if i == b and r["kind"] == "good" and r["status"] == 200]
           for b in range(len(edges) - 1)]
    out["p50_latency_s"] = [round(float(np.median(x)), 3) if x else None for x in lat]
    return out


def plot(path: str, summary: dict, samples: list[dict], tl: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for ax in (top, bottom):
        for i, p in enumerate(summary["phases"]):
            ax.axvspan(p["start"] / 60, p["end"] / 60, color=("#dde8f5", "#f5e6d3", "#f5d3d3")[i % 3], zorder=0)
    for p in summary["phases"]:
        top.text((p["start"] + p["end"]) / 120, 1.01, f"{p['clients']} clients", transform=top.get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=9)
    rss = summary["rss"]
    top.plot([s["t"] / 60 for s in samples], [s["rss_mb"] for s in samples], color="black", lw=1.5, label="server RSS")
    bad = [s for s in samples if s["healthz"] != 200]
    if bad:
        top.scatter([s["t"] / 60 for s in bad], [s["rss_mb"] for s in bad], color="red", zorder=3,
                    label="/healthz not 200")
    if rss["warm_up_mb"]:
        top.axvline(rss["warm_up_t_s"] / 60, color="grey", ls="--", lw=1, label="warm-up point")
        top.axhline(rss["warm_up_mb"] * 1.1, color="red", ls=":", lw=1, label="warm-up RSS + 10%")
    top.set_ylabel("RSS (MB)")
    top.legend(loc="lower right", fontsize=8)
    x = [t / 60 for t in tl["t"]]
    for name, color in (("200", "tab:green"), ("429", "tab:orange"), ("other 4xx", "tab:blue"),
                        ("gave up (abandoned)", "tab:grey"), ("5xx / timeout / error", "tab:red")):
        if any(tl[name]):
            bottom.plot(x, tl[name], color=color, lw=1.2, label=f"{name} /s")
    bottom.set_ylabel("requests / s")
    bottom.set_xlabel("minutes since the load started")
    lat = bottom.twinx()
    lat.plot(x, [np.nan if v is None else v for v in tl["p50_latency_s"]], color="purple", lw=1, ls="--",
             label="p50 latency, good 200 (s)")
    lat.set_ylabel("latency (s)")
    h1, l1 = bottom.get_legend_handles_labels()
    h2, l2 = lat.get_legend_handles_labels()
    bottom.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.suptitle("e2p serve soak: server memory and traffic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The server this benchmark starts (serve_load.launch reads these) and the users and requests it gets."""
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--projector", default=None, help="default: the shipped one")
    p.add_argument("--backbone", default=None)
    p.add_argument("--api-key", default="soak-key")
    p.add_argument("--admin-key", default="soak-admin")
    p.add_argument("--seed", type=int, default=0)

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of each of the 3 phases")
    add_server_arguments(p)
    p.add_argument("--after-requests", type=int, default=4, help="normal requests that must answer 200 afterwards")
    p.add_argument("--out", default="benchmarks/results/serve_soak.json")
    p.add_argument("--plot", default="benchmarks/results/serve_soak.png")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    proc, url, projector_kind = launch(args)
    try:
        wait_healthy(url, proc)
        startup = round(time.time() - t0, 1)
        model, dim = model_id(url, args.api_key), embedding_dim(args.projector)
        store_users(url, args.admin_key, args.users, dim, args.seed)
        warm_up(url, args.api_key, model)
        print(f"server up in {startup}s (pid {proc.pid}, {model}, projector {projector_kind}); {args.users} users stored",
              flush=True)
        run = asyncio.run(soak(args, url, proc.pid, model, dim))
    finally:
        exit_code = stop_server(proc)
    # uvicorn re-raises SIGTERM after a clean shutdown (exit code -15), so the log tells whether it was graceful
    graceful = "Application shutdown complete" in Path(args.out).with_suffix(".server.log").read_text()
    summary = summarize(run)
    tl = timeline(run["requests"], max(r["t"] for r in run["requests"] + run["samples"]))
    result = {"model": model, "projector": args.projector, "projector_kind": projector_kind, "minutes": args.minutes,
              "users": args.users, "max_tokens": args.max_tokens, "max_queue": args.max_queue,
              "max_batch_size": args.max_batch_size, "server_startup_s": startup, "server_exit_code": exit_code,
              "stopped_gracefully": graceful, "after_server_statuses": run["after_server_statuses"],
              "cpu_threads": os.environ.get("OMP_NUM_THREADS"), **summary, "healthz_after": run["healthz_after"],
              "timeline": tl, "rss_samples": run["samples"]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    with open(Path(args.out).with_suffix(".requests.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in run["requests"])
    plot(args.plot, summary, run["samples"], tl)
    report(summary)
    print(f"server stopped with SIGTERM: exit code {exit_code}, {'graceful' if graceful else 'NOT graceful'} "
          f"(see {Path(args.out).with_suffix('.server.log')}); written {args.out}, {args.plot}")


if __name__ == "__main__":
    main()
