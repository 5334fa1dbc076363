"""Generation benchmarks: serving overhead of E2P, E2P vs persona-as-text, mixed-user batching.

1. Serving overhead: one batch of greedy requests (one user each) through the plain backbone,
   an input-injection projector and a deep-injection projector (k = 1, random init). tokens/s from
   the actual generated token counts; EOS is switched off on the model instances so every row makes
   exactly `max_new_tokens` tokens.
2. Persona as text: the same requests carrying ~5 persona sentences in the system prompt instead of a
   prefix. Time to first token (prefill + first token, batch 1) and batched tokens/s; prompt tokens saved.
3. Mixed-user batching: `mixed_users` requests of as many different users in one batch vs one at a time.
"""
from __future__ import annotations

import statistics
import time

import torch

from common import MESSAGES, Context, embeddings, interleaved, make_model, make_projector, persona_text, ratio_median


def _rows(model, n: int, with_persona: bool = False):
    return [model.format(MESSAGES[i % len(MESSAGES)], persona_text=persona_text(i) if with_persona else None)
            for i in range(n)]


def _summary(res: dict, name: str) -> dict:
    n = sum(len(t) for t in res[name]["result"])
    sec = res[name]["seconds"]
    return {"seconds": round(sec, 4), "tokens": n, "tokens_per_s": round(n / sec, 2)}


def serving_overhead(ctx: Context, plain, e2p_input, e2p_deep) -> dict:
    """Plain, input and deep timed in alternating rounds; the ratios are medians of per-round ratios
    (every row generates the same number of tokens, so the time ratio is the tokens/s ratio). The plain
    batch runs twice per round: their ratio is the noise floor of the machine."""
    s = ctx.settings
    B, N = s["batch"], s["new_tokens"]
    emb = embeddings(B)
    rows = {"plain": _rows(plain, B), "e2p_input": _rows(e2p_input, B), "e2p_deep": _rows(e2p_deep, B)}
    rows["plain_again"] = rows["plain"]
    models = {"plain": (plain, None), "e2p_input": (e2p_input, emb), "e2p_deep": (e2p_deep, emb),
              "plain_again": (plain, None)}
    fns = {k: (lambda m=m, e=e, r=rows[k]: m.generate_tokens(r, e, max_new_tokens=N)) for k, (m, e) in models.items()}
    res = interleaved(fns, s.get("overhead_rounds", s["repeats"]))
    out = {k: _summary(res, k) for k in fns}
    out["input_vs_plain_tokens_per_s"] = ratio_median(res, "plain", "e2p_input")
    out["deep_vs_plain_tokens_per_s"] = ratio_median(res, "plain", "e2p_deep")
    # the same plain batch timed twice per round: how far a ratio moves from 1.0 by noise alone
    out["plain_vs_plain_tokens_per_s"] = ratio_median(res, "plain", "plain_again")
    out["rounds"] = len(res["plain"]["times"])
    return out


def _ttft(ctx: Context, e2p_input, e2p_rows, emb, plain, text_rows) -> tuple[float, float, float]:
    """Prefill + first token at batch 1, E2P and persona text in alternating rounds per request.
    -> (median E2P seconds, median text seconds, median over requests of the per-round ratio E2P / text)."""
    t_e2p, t_text, ratios = [], [], []
    for i in range(len(e2p_rows)):
        res = interleaved({"e2p": lambda i=i: e2p_input.generate_tokens([e2p_rows[i]], emb[i:i + 1], max_new_tokens=1),
                           "text": lambda i=i: plain.generate_tokens([text_rows[i]], None, max_new_tokens=1)},
                          ctx.settings["repeats"])
        t_e2p.append(res["e2p"]["seconds"])
        t_text.append(res["text"]["seconds"])
        ratios.append(1 / ratio_median(res, "text", "e2p"))
    return statistics.median(t_e2p), statistics.median(t_text), statistics.median(ratios)


def persona_as_text(ctx: Context, plain, e2p_input) -> dict:
    s = ctx.settings
    B, N, R = s["batch"], s["new_tokens"], s["ttft_requests"]
    emb = embeddings(B)
    e2p_rows, text_rows = _rows(e2p_input, B), _rows(plain, B, with_persona=True)
    prompt_e2p = [len(r.pre) + len(r.post) + e2p_input.num_prefix_tokens for r in e2p_rows]
    prompt_text = [len(r.pre) + len(r.post) for r in text_rows]
    ttft_e2p, ttft_text, ttft_ratio = _ttft(ctx, e2p_input, e2p_rows[:R], emb, plain, text_rows[:R])
    res_tps = interleaved({"e2p_input": lambda: e2p_input.generate_tokens(e2p_rows, emb, max_new_tokens=N),
                           "persona_text": lambda: plain.generate_tokens(text_rows, None, max_new_tokens=N)},
                          s["repeats"])
    res = {
        "ttft_s": {"e2p_input": round(ttft_e2p, 5), "persona_text": round(ttft_text, 5)},
        "ttft_e2p_vs_text": round(ttft_ratio, 4),
        "prompt_tokens_mean": {"e2p_input (incl. k prefix)": statistics.mean(prompt_e2p),
                               "persona_text": statistics.mean(prompt_text)},
        "prompt_tokens_saved_per_request": statistics.mean(t - e for t, e in zip(prompt_text, prompt_e2p)),
        "e2p_input": _summary(res_tps, "e2p_input"),
        "persona_text": _summary(res_tps, "persona_text"),
    }
    res["e2p_vs_text_tokens_per_s"] = ratio_median(res_tps, "persona_text", "e2p_input")
    return res


def mixed_users(ctx: Context, e2p_input) -> dict:
    s = ctx.settings
    U, N = s["mixed_users"], s["mixed_new_tokens"]
    emb = embeddings(U, seed=1)  # U different users
    rows = _rows(e2p_input, U)

    def sequential():
        return [e2p_input.generate_tokens([rows[i]], emb[i:i + 1], max_new_tokens=N)[0] for i in range(U)]

    e2p_input.generate_tokens([rows[0]], emb[:1], max_new_tokens=N)  # warm-up of the batch-1 path
    res = interleaved({"sequential": sequential,
                       "batched": lambda: e2p_input.generate_tokens(rows, emb, max_new_tokens=N)}, s["mixed_repeats"])
    out = {"users": U, "new_tokens": N, "sequential": _summary(res, "sequential"), "batched": _summary(res, "batched")}
    out["batched_vs_sequential_throughput"] = ratio_median(res, "sequential", "batched")
    out["same_tokens_as_sequential"] = res["sequential"]["result"] == res["batched"]["result"]
    out["rounds"] = len(res["batched"]["times"])
    return out


def run(ctx: Context) -> dict:
    bb = ctx.backbone
    plain = make_model(bb)
    e2p_input = make_model(bb, make_projector(bb, "input"))
    e2p_deep = make_model(bb, make_projector(bb, "deep"))
    out = {}
    with torch.inference_mode():
        for name, fn in [("serving_overhead", lambda: serving_overhead(ctx, plain, e2p_input, e2p_deep)),
                         ("persona_as_text", lambda: persona_as_text(ctx, plain, e2p_input)),
                         ("mixed_users", lambda: mixed_users(ctx, e2p_input))]:
            t0 = time.time()
            out[name] = fn()
            out[name]["bench_wall_s"] = round(time.time() - t0, 1)
            print(f"  {name}: {out[name]}", flush=True)
    return out
