"""E2P on vLLM, measured in one run: E2P vs plain on vLLM (one at a time and 16 users batched), vLLM vs the torch engine
vs llama.cpp on this machine, the gateway's own added time per request at 100 and 1,000 prompt tokens, and the bytes
on the wire per request for each request form.

    python benchmarks/vllm_engine.py --out benchmarks/results/vllm_engine.json

Decode speed is generated tokens per second of wall time (greedy; rows end at EOS or --new-tokens). The gateway's
added time is what e2p itself spends before the request leaves (format, projector, embedding rows, base64 + JSON),
and, end to end, a one-token request through `e2p serve --vllm-url` minus the same prompt sent straight to vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from e2p.engines.vllm_gateway import tensor2base64

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, stop_server, wait_healthy  # noqa: E402
from serve_soak import pct  # noqa: E402

PROMPTS = ["Hi, what do you do on weekends?", "What is your favourite food?", "Tell me about yourself.",
           "Do you like music?", "What do you do for work?", "Where would you like to travel?",
           "What did you do yesterday?", "Do you have any pets?", "What book are you reading?",
           "How was your morning?", "Which sport do you follow?", "What is your home town like?",
           "Do you cook often?", "What makes you laugh?", "Which season do you prefer?", "What are you learning now?"]


def users(model, n: int) -> list:
    """n user embeddings of the projector's size (unit vectors, as the encoders give)."""
    g = torch.Generator().manual_seed(0)
    dim = model.embedding_dim
    return [torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0) for _ in range(n)]


def generate(model, rows, embs, new_tokens: int, via_embeds: bool = False) -> list[list[int]]:
    """Greedy tokens; on vLLM every row makes exactly `new_tokens` (ignore_eos), so E2P and plain rows cost alike.
    `via_embeds`: plain rows sent down vLLM's embeddings path (their first token's own embedding marked as one)."""
    engine = model.model
    if not getattr(engine, "own_decode_loop", False):
        return engine.generate_tokens(rows, embs, max_new_tokens=new_tokens)
    jobs = [engine.job(r, e, max_tokens=new_tokens, ignore_eos=True) for r, e in zip(rows, embs)]
    if via_embeds:
        for job in jobs:
            job.is_token[0] = False
    for job in jobs:
        engine.runner.submit(job)
    return [job.future.result() and job.tokens for job in jobs]


def decode_speed(model, rows: int, personalized: bool, new_tokens: int, batched: bool, via_embeds: bool = False) -> dict:
    """Generated tokens per second: `rows` rows (distinct prompts) at once (batched) or one after another."""
    prompts = [model.model.format(PROMPTS[i % len(PROMPTS)]) for i in range(rows)]
    embs = users(model, rows) if personalized else [None] * rows
    generate(model, prompts[:2], embs[:2], 4)  # warm-up
    t = time.perf_counter()
    if batched:
        out = generate(model, prompts, embs, new_tokens, via_embeds)
    else:
        out = [generate(model, [p], [e], new_tokens, via_embeds)[0] for p, e in zip(prompts, embs)]
    seconds = time.perf_counter() - t
    tokens = sum(len(o) for o in out)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}


def engine_table(model, new_tokens: int, rows: int) -> dict:
    out = {}
    for name, personalized in (("e2p", True), ("plain", False)):
        out[name] = {"one_at_a_time": decode_speed(model, 4, personalized, new_tokens, batched=False),
                     f"batched_{rows}": decode_speed(model, rows, personalized, new_tokens, batched=True)}
    out["e2p_over_plain"] = {k: round(out["e2p"][k]["tokens_per_s"] / out["plain"][k]["tokens_per_s"], 3)
                             for k in out["e2p"]}
    if getattr(model.model, "own_decode_loop", False):  # where the gap comes from: vLLM's embeddings path itself
        out["plain_via_embeddings_path"] = {
            "one_at_a_time": decode_speed(model, 4, False, new_tokens, batched=False, via_embeds=True),
            f"batched_{rows}": decode_speed(model, rows, False, new_tokens, batched=True, via_embeds=True)}
    return out


def long_prompt(tokenizer, tokens: int) -> str:
    words = ("tell me more about the places you have seen and the food you liked there , ").split()
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += " ".join(words) + " "
    return text


def gateway_costs(gateway, e2p_url: str, vllm_url: str, reps: int) -> dict:
    """e2p's own time per request before it leaves (p50 / p95), end-to-end added time, and bytes per request form."""
    model, runner = gateway.model, gateway.model.runner
    user = users(gateway, 1)[0]
    out = {}
    for size in (100, 1000):
        text = long_prompt(model.tokenizer, size - 30)  # the template adds ~30 tokens
        row = model.format(text)
        n_prompt = len(row.pre) + len(row.post) + model.num_prefix_tokens
        own, fmt = [], []
        for _ in range(reps):
            t = time.perf_counter()
            formatted = model.format(text)  # the templating and tokenizing vLLM does itself for a text prompt
            t1 = time.perf_counter()
            runner.payload(model.job(formatted, user, max_tokens=1))
            own.append((time.perf_counter() - t) * 1000)
            fmt.append((t1 - t) * 1000)
        job = model.job(row, user, max_tokens=1)
        sizes = {}
        for name, dtype in (("prompt_embeds_float32", torch.float32), ("prompt_embeds_bfloat16", torch.bfloat16)):
            runner.dtype = dtype
            sizes[name] = len(runner.payload(job))
        runner.dtype = torch.float32
        sizes["plain_token_ids"] = len(runner.payload(model.job(row, None, max_tokens=1)))
        # the form vLLM 0.32 cannot take (a chat content part of the k vectors alone), for comparison
        sizes["k_prefix_vectors_only"] = len(json.dumps({"prompt_embeds": tensor2base64(job.embeds[~torch.tensor(job.is_token)])}))
        sizes["in_process"] = 0
        # end to end: through e2p's gateway (a stored user) vs the same body straight to vLLM, one token each
        direct_body = {**runner.body(job), "stream": False, "max_tokens": 1}
        direct_body.pop("return_token_ids", None)
        via, direct = [], []
        with httpx.Client(timeout=120) as client:
            for i in range(reps // 5 + 2):
                t = time.perf_counter()
                r = client.post(vllm_url + "/v1/completions", json=direct_body)
                direct.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
                t = time.perf_counter()
                r = client.post(e2p_url + "/v1/completions", json={"model": "e2p", "prompt": text, "max_tokens": 1,
                                                                   "temperature": 0, "user": "u0"},
                                headers={"Authorization": "Bearer admin"})
                via.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
        direct, via = direct[2:], via[2:]  # warm-up
        out[f"{size}_tokens"] = {
            "prompt_tokens": n_prompt, "e2p_own_ms": {"p50": round(pct(own, 50), 3), "p95": round(pct(own, 95), 3)},
            "of_which_template_and_tokenizer_ms": {"p50": round(pct(fmt, 50), 3), "p95": round(pct(fmt, 95), 3)},
            "end_to_end_ms": {"direct_p50": round(pct(direct, 50), 2), "via_e2p_p50": round(pct(via, 50), 2),
                              "added_p50": round(pct(via, 50) - pct(direct, 50), 2)},
            "bytes_per_request": sizes}
    return out


def start_vllm_serve(folder: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--enable-prompt-embeds",
           "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vllm serve did not start; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--projector", default="persona-input-k1")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50, help="gateway timing repetitions per prompt size")
    ap.add_argument("--engines", default="vllm,torch,llama-cpp", help="which engines to time (comma separated)")
    ap.add_argument("--no-gateway", action="store_true", help="skip the gateway's part")
    ap.add_argument("--out", default="benchmarks/results/vllm_engine.json")
    args = ap.parse_args()
    import e2p
    from e2p.backbone import load_backbone_info

    results: dict = {"command": "python benchmarks/vllm_engine.py " + " ".join(sys.argv[1:]),
                     "cpu": os.cpu_count(), "new_tokens": args.new_tokens}
    engines = {}
    for name in args.engines.split(","):
        model = e2p.load(args.projector, engine=name, max_batch_size=args.rows, max_new_tokens=args.new_tokens,
                         max_prompt_tokens=1100)
        engines[name] = engine_table(model, args.new_tokens, args.rows)
        if hasattr(model.model, "close"):
            model.model.close()
        del model
    results["engines"] = engines
    print(json.dumps(engines, indent=1), flush=True)
    if args.no_gateway:
        Path(args.out).write_text(json.dumps(results, indent=1))
        return

    # the gateway: a real vllm serve, and e2p serve --vllm-url in front of it
    folder = Path(tempfile.mkdtemp(prefix="e2p-vllm-bench-"))
    vport, eport = free_port(), free_port()
    vllm_url, e2p_url = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{eport}"
    vproc = start_vllm_serve(load_backbone_info().folder, vport, Path(args.out).with_suffix(".vllm.log"))
    eproc = None
    try:
        cmd = [sys.executable, "-m", "e2p.cli", "serve", "--projector", args.projector, "--store", str(folder / "u.db"),
               "--port", str(eport), "--vllm-url", vllm_url, "--model-name", "e2p", "--max-prompt-tokens", "1100",
               "--admin-key", "admin"]
        with open(Path(args.out).with_suffix(".server.log"), "w") as log:
            eproc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(e2p_url, eproc)
        gateway = e2p.load(args.projector, engine="vllm", vllm_url=vllm_url, max_prompt_tokens=1100)
        r = httpx.put(e2p_url + "/v1/users/u0/embedding", json={"embedding": users(gateway, 1)[0].tolist()},
                      headers={"Authorization": "Bearer admin"})
        assert r.status_code == 200, r.text
        results["gateway"] = gateway_costs(gateway, e2p_url, vllm_url, args.reps)
    finally:
        if eproc is not None:
            stop_server(eproc)
        os.killpg(vproc.pid, 15)
        vproc.wait(60)
    print(json.dumps(results["gateway"], indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
