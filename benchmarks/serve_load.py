"""Load benchmark for `e2p serve`: many concurrent clients of different users against a server on loopback.

    python benchmarks/serve_load.py                       # real backbone, shipped or random-init projector
    python benchmarks/serve_load.py --projector DIR --requests 400 --concurrency 32 --users 100
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key K --admin-key A   # a running server
    python benchmarks/serve_load.py --stream              # streamed requests: also time to first text

Starts `e2p serve` as a subprocess on a free loopback port (unless --url), stores random embeddings for
--users users, then drives it with --concurrency clients, each request from a random user (a share of
them without a user, and a share with an inline embedding). Prints throughput, p50/p99 latency, errors
and the server's batch sizes, and writes everything as JSON (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

MESSAGES = [
    "Hi! Tell me a bit about yourself.",
    "What do you do for fun?",
    "Do you have any pets?",
    "What kind of music do you like?",
    "What do you do for work?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_projector(backbone: str | None) -> tuple[str, str]:
    """The shipped projector if there is one, else a random-init one for the backbone (fine for load, not quality)."""
    from e2p.evaluate.demo import SHIPPED

    if (SHIPPED / "config.json").is_file():
        return str(SHIPPED), "shipped"
    import torch

    from e2p.backbone import load_backbone
    from e2p.model import new_config
    from e2p.projector import Projector

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="e2p-bench-projector-"))
    Projector(new_config(load_backbone(backbone), embedding_dim=384, injection="deep")).save_pretrained(out)
    return str(out), "random-init (no shipped projector found)"


def start_server(args, port: int, store: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "e2p.cli", "serve", "--store", store, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue", str(args.max_queue), "--request-timeout", str(args.request_timeout)]
    if args.projector:
        cmd += ["--projector", args.projector]
    if args.backbone:
        cmd += ["--backbone", args.backbone]
    if getattr(args, "keys", None):  # a key file beside the env keys (e.g. a rate-limited key)
        cmd += ["--keys", args.keys]
    env = {**os.environ, "E2P_API_KEY": args.api_key, "E2P_ADMIN_KEY": args.admin_key}
    log = open(Path(args.out).with_suffix(".server.log"), "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def launch(args) -> tuple[subprocess.Popen, str, str]:
    """Start `e2p serve` on a free loopback port with a fresh SQLite store: (process, url, projector kind)."""
    if args.projector is None:
        args.projector, projector_kind = default_projector(args.backbone)
    else:
        projector_kind = "given"
    port = free_port()
    store = os.path.join(tempfile.mkdtemp(prefix="e2p-bench-store-"), "users.db")
    return start_server(args, port, store), f"http://127.0.0.1:{port}", projector_kind


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM is graceful: the server finishes in-flight requests before it exits."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def embedding_dim(projector: str | None) -> int:
    """The user-embedding size the projector reads (384 when unknown: a server configured elsewhere)."""
    if not projector:
        return 384
    return json.loads((Path(projector) / "config.json").read_text())["embedding_dim"] or 384


def store_users(url: str, admin_key: str, users: int, dim: int, seed: int) -> float:
    """PUT a random embedding for user0..user{users-1}; returns the seconds it took."""
    rng = np.random.default_rng(seed)
    admin = {"authorization": f"Bearer {admin_key}"}
    t0 = time.time()
    for u in range(users):
        r = httpx.put(f"{url}/v1/users/user{u}/embedding", json={"embedding": rng.standard_normal(dim).tolist()},
                      headers=admin)
        r.raise_for_status()
    return time.time() - t0


def model_id(url: str, api_key: str) -> str:
    return httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {api_key}"}).json()["data"][0]["id"]


def warm_up(url: str, api_key: str, model: str) -> None:
    """One short request, so the first measured batch does not carry one-off costs."""
    httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"}, timeout=300,
               json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see the .server.log next to --out")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not become healthy within {timeout:.0f}s")


def batch_stats(metrics_text: str) -> dict:
    def value(name):
        m = re.search(rf"^{name} ([0-9.e+]+)$", metrics_text, re.M)
        return float(m.group(1)) if m else 0.0

    count, total = value("e2p_batch_size_count"), value("e2p_batch_size_sum")
    return {"batches": int(count), "mean_batch_size": round(total / count, 2) if count else 0.0}


async def drive(args, url: str, dim: int, model: str) -> dict:
    rng = random.Random(args.seed)
    headers = {"authorization": f"Bearer {args.api_key}"}
    latencies, firsts, errors, tokens = [], [], {}, 0
    todo = list(range(args.requests))

    async def client(c: httpx.AsyncClient):
        nonlocal tokens
        while todo:
            todo.pop()
            body = {"model": model, "messages": [{"role": "user", "content": rng.choice(MESSAGES)}],
                    "max_tokens": args.max_tokens, "temperature": args.temperature}
            r = rng.random()
            if r < args.no_user_share:
                pass
            elif r < args.no_user_share + args.inline_share:
                body["e2p"] = {"embedding": np.random.default_rng(rng.randrange(1 << 30)).standard_normal(dim).tolist()}
            else:
                body["user"] = f"user{rng.randrange(args.users)}"
            started = time.perf_counter()
            try:
                if args.stream:
                    body.update(stream=True, stream_options={"include_usage": True})
                    async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                        if resp.status_code != 200:
                            await resp.aread()
                            key = f"{resp.status_code} {resp.json().get('error', {}).get('code')}"
                            errors[key] = errors.get(key, 0) + 1
                            continue
                        first = None
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            event = json.loads(line[6:])
                            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                                first = time.perf_counter() - started
                            if event.get("usage"):
                                tokens += event["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - started)
                    if first is not None:
                        firsts.append(first)
                    continue
                resp = await c.post("/v1/chat/completions", json=body)
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    tokens += resp.json()["usage"]["completion_tokens"]
                else:
                    key = f"{resp.status_code} {resp.json().get('error', {}).get('code')}"
                    errors[key] = errors.get(key, 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.request_timeout + 30, limits=limits) as c:
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    ttft = np.array(firsts) if firsts else np.array([float("nan")])
    return {
        "stream": args.stream,
        "time_to_first_text_s": {"p50": round(float(np.percentile(ttft, 50)), 4),
                                 "p90": round(float(np.percentile(ttft, 90)), 4)} if args.stream else None,
        "requests": args.requests, "ok": len(latencies), "errors": errors, "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
        "completion_tokens": tokens,
        "latency_s": {"p50": round(float(np.percentile(lat, 50)), 4), "p90": round(float(np.percentile(lat, 90)), 4),
                      "p99": round(float(np.percentile(lat, 99)), 4), "mean": round(float(lat.mean()), 4),
                      "max": round(float(lat.max()), 4)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--projector", default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="stream every request; also measures time to first text")
    p.add_argument("--no-user-share", type=float, default=0.1, help="share of requests without a user")
    p.add_argument("--inline-share", type=float, default=0.1, help="share of requests with an inline embedding")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--api-key", default=os.environ.get("E2P_API_KEY", "bench-key"))
    p.add_argument("--admin-key", default=os.environ.get("E2P_ADMIN_KEY", "bench-admin"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    proc, projector_kind = None, "as configured on the server"
    url = args.url
    if url is None:
        proc, url, projector_kind = launch(args)
    try:
        t0 = time.time()
        wait_healthy(url, proc)
        startup = time.time() - t0
        model = model_id(url, args.api_key)
        dim = embedding_dim(args.projector)
        store_s = store_users(url, args.admin_key, args.users, dim, args.seed)
        warm_up(url, args.api_key, model)
        result = asyncio.run(drive(args, url, dim, model))
        result.update(batch_stats(httpx.get(url + "/metrics").text))
        result.update({"model": model, "projector": args.projector, "projector_kind": projector_kind,
                       "concurrency": args.concurrency, "users": args.users, "max_tokens": args.max_tokens,
                       "temperature": args.temperature, "max_batch_size": args.max_batch_size,
                       "batch_wait_ms": args.batch_wait_ms, "server_startup_s": round(startup, 2),
                       "store_puts_per_s": round(args.users / store_s, 1) if store_s else None,
                       "cpu_threads": os.environ.get("OMP_NUM_THREADS")})
    finally:
        if proc is not None:
            stop_server(proc)
    Path(args.out).write_text(json.dumps(result, indent=2))
    lat = result["latency_s"]
    print(f"{result['ok']}/{result['requests']} ok in {result['wall_s']}s with {args.concurrency} clients, "
          f"{args.users} users: {result['throughput_rps']} req/s, {result['tokens_per_s']} tokens/s")
    print(f"latency p50 {lat['p50']}s  p90 {lat['p90']}s  p99 {lat['p99']}s  max {lat['max']}s")
    if result["time_to_first_text_s"]:
        print(f"streamed: first text after p50 {result['time_to_first_text_s']['p50']}s, "
              f"p90 {result['time_to_first_text_s']['p90']}s")
    print(f"batches: {result['batches']}, mean size {result['mean_batch_size']}; errors: {result['errors'] or 'none'}")
    print(f"projector: {projector_kind}; written to {args.out}")


if __name__ == "__main__":
    main()
