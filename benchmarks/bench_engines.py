"""Engines side by side on one GGUF: plain llama.cpp, e2p on llama.cpp, e2p on torch; one at a time and 16 batched.

    python benchmarks/run_all.py --only engines          # writes the ratios into benchmarks/results/results.json

plain llama.cpp is what a user runs without e2p: llama-cpp-python's `Llama.generate` on the bundled SmolLM2 GGUF,
greedy, the same prompt token ids. e2p on llama.cpp: `LlamaCppModel` with an input-injection projector, the
prefix fed through `llama_batch.embd`; batched also on the Q8_0 GGUF (`--gguf q8_0`: the bundled weights
converted once), the type llama.cpp's batched CPU kernels cover. e2p on torch: `E2PModel` on the same weights de-quantized. Every row
generates exactly `new_tokens` tokens (EOS off), tokens/s from the counts; each figure is the median over rounds
that alternate the paths (common.interleaved).
"""
from __future__ import annotations

import time

import torch

from common import Context, embeddings, interleaved, make_projector, ratio_median

PROMPTS = ["What do you do on weekends?", "Tell me about yourself.", "What is your favourite food?",
           "Do you have any pets?"]


def run(ctx: Context) -> dict:
    import os

    from llama_cpp import Llama

    from e2p.backbone import default_gguf
    from e2p.engines.gguf_convert import resolve_gguf
    from e2p.engines.llamacpp import LlamaCppModel
    from e2p.model import E2PModel

    s = ctx.settings
    n_new, users, rounds = s.get("new_tokens", 32), s.get("users", 16), s.get("rounds", 3)
    bb = ctx.backbone
    gguf = default_gguf(bb.name)
    threads = torch.get_num_threads()
    projector = make_projector(bb, "input")
    e2p_llama = LlamaCppModel(bb, projector, gguf=gguf, n_seq_max=users)
    e2p_llama_q8 = LlamaCppModel(bb, projector, gguf=resolve_gguf(bb.name, "q8_0"), n_seq_max=users)
    e2p_torch = E2PModel(bb, projector)
    for m in (e2p_llama, e2p_llama_q8, e2p_torch):
        m.eos_ids = [-1]  # every row makes exactly n_new tokens
    plain = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    rows = [e2p_torch.format(PROMPTS[i % len(PROMPTS)]) for i in range(users)]
    emb = embeddings(users)
    one = rows[0]

    def plain_one():
        plain.reset()
        ids = one.pre + one.post
        out = []
        for t in plain.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(t)
            if len(out) >= n_new:
                break
        return [out]

    fns = {
        "plain_llamacpp_one": plain_one,
        "e2p_llamacpp_one": lambda: e2p_llama.generate_tokens([one], emb[:1], max_new_tokens=n_new),
        "e2p_torch_one": lambda: e2p_torch.generate_tokens([one], emb[:1], max_new_tokens=n_new),
        "e2p_llamacpp_batched": lambda: e2p_llama.generate_tokens(rows, emb, max_new_tokens=n_new),
        "e2p_llamacpp_q8_0_batched": lambda: e2p_llama_q8.generate_tokens(rows, emb, max_new_tokens=n_new),
        "e2p_torch_batched": lambda: e2p_torch.generate_tokens(rows, emb, max_new_tokens=n_new),
    }
    t0 = time.time()
    with torch.inference_mode():
        res = interleaved(fns, rounds)
    out = {"gguf": str(gguf), "threads": threads, "os_cpus": os.cpu_count(), "new_tokens": n_new, "users": users,
           "rounds": len(res["plain_llamacpp_one"]["times"])}
    for name in fns:
        tokens = sum(len(t) for t in res[name]["result"])
        out[name] = {"seconds": round(res[name]["seconds"], 4), "tokens": tokens,
                     "tokens_per_s": round(tokens / res[name]["seconds"], 2)}
    # interleaved's ratio: time(a) / time(b) per round, median; the same token counts make it a tokens/s ratio
    out["llamacpp_e2p_vs_plain_tokens_per_s"] = ratio_median(res, "plain_llamacpp_one", "e2p_llamacpp_one")
    # batched on llama.cpp: the Q8_0 GGUF (--gguf q8_0), the type its batched CPU kernels cover; the bundled Q4_1 too
    out["llamacpp_batched_vs_torch_batched_tokens_per_s"] = ratio_median(res, "e2p_torch_batched",
                                                                         "e2p_llamacpp_q8_0_batched")
    out["llamacpp_bundled_gguf_batched_vs_torch_batched_tokens_per_s"] = ratio_median(res, "e2p_torch_batched",
                                                                                      "e2p_llamacpp_batched")
    out["llamacpp_one_vs_torch_one_tokens_per_s"] = ratio_median(res, "e2p_torch_one", "e2p_llamacpp_one")
    out["bench_wall_s"] = round(time.time() - t0, 1)
    print(f"  engines: {out}", flush=True)
    return out
