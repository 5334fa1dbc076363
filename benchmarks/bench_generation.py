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

from common import MESSAGES, Context, embeddings, make_model, make_projector, persona_text, ratio, timed


def _rows(model, n: int, with_persona: bool = False):
    return [model.format(MESSAGES[i % len(MESSAGES)], persona_text=persona_text(i) if with_persona else None)
            for i in range(n)]


def _tokens_per_s(ctx: Context, model, rows, emb, new_tokens: int) -> dict:
    seconds, out = timed(lambda: model.generate_tokens(rows, emb, max_new_tokens=new_tokens), ctx.settings["repeats"])
    n = sum(len(t) for t in out)
    return {"seconds": round(seconds, 4), "tokens": n, "tokens_per_s": round(n / seconds, 2)}


def serving_overhead(ctx: Context, plain, e2p_input, e2p_deep) -> dict:
    s = ctx.settings
    B, N = s["batch"], s["new_tokens"]
    emb = embeddings(B)
    res = {
        "plain": _tokens_per_s(ctx, plain, _rows(plain, B), None, N),
        "e2p_input": _tokens_per_s(ctx, e2p_input, _rows(e2p_input, B), emb, N),
        "e2p_deep": _tokens_per_s(ctx, e2p_deep, _rows(e2p_deep, B), emb, N),
    }
    res["input_vs_plain_tokens_per_s"] = ratio(res["e2p_input"]["tokens_per_s"], res["plain"]["tokens_per_s"])
    res["deep_vs_plain_tokens_per_s"] = ratio(res["e2p_deep"]["tokens_per_s"], res["plain"]["tokens_per_s"])
    return res


def _ttft(ctx: Context, model, rows, emb) -> float:
    """Median over requests (batch 1) of the median time of prefill + first token."""
    per_request = []
    for i, row in enumerate(rows):
        e = emb[i:i + 1] if emb is not None else None
        seconds, _ = timed(lambda: model.generate_tokens([row], e, max_new_tokens=1), ctx.settings["repeats"])
        per_request.append(seconds)
    return statistics.median(per_request)


def persona_as_text(ctx: Context, plain, e2p_input) -> dict:
    s = ctx.settings
    B, N, R = s["batch"], s["new_tokens"], s["ttft_requests"]
    emb = embeddings(B)
    e2p_rows, text_rows = _rows(e2p_input, B), _rows(plain, B, with_persona=True)
    prompt_e2p = [len(r.pre) + len(r.post) + e2p_input.num_prefix_tokens for r in e2p_rows]
    prompt_text = [len(r.pre) + len(r.post) for r in text_rows]
    ttft_e2p = _ttft(ctx, e2p_input, e2p_rows[:R], emb)
    ttft_text = _ttft(ctx, plain, text_rows[:R], None)
    res = {
        "ttft_s": {"e2p_input": round(ttft_e2p, 5), "persona_text": round(ttft_text, 5)},
        "ttft_e2p_vs_text": ratio(ttft_e2p, ttft_text),
        "prompt_tokens_mean": {"e2p_input (incl. k prefix)": statistics.mean(prompt_e2p),
                               "persona_text": statistics.mean(prompt_text)},
        "prompt_tokens_saved_per_request": statistics.mean(t - e for t, e in zip(prompt_text, prompt_e2p)),
        "e2p_input": _tokens_per_s(ctx, e2p_input, e2p_rows, emb, N),
        "persona_text": _tokens_per_s(ctx, plain, text_rows, None, N),
    }
    res["e2p_vs_text_tokens_per_s"] = ratio(res["e2p_input"]["tokens_per_s"], res["persona_text"]["tokens_per_s"])
    return res


def mixed_users(ctx: Context, e2p_input) -> dict:
    s = ctx.settings
    U, N = s["mixed_users"], s["mixed_new_tokens"]
    emb = embeddings(U, seed=1)  # U different users
    rows = _rows(e2p_input, U)

    def sequential():
        return [e2p_input.generate_tokens([rows[i]], emb[i:i + 1], max_new_tokens=N)[0] for i in range(U)]

    e2p_input.generate_tokens([rows[0]], emb[:1], max_new_tokens=N)  # warm-up of the batch-1 path
    t_seq, out_seq = timed(sequential, s["mixed_repeats"], warmup=0)
    t_bat, out_bat = timed(lambda: e2p_input.generate_tokens(rows, emb, max_new_tokens=N), s["mixed_repeats"])
    n_seq, n_bat = sum(map(len, out_seq)), sum(map(len, out_bat))
    return {
        "users": U, "new_tokens": N,
        "sequential": {"seconds": round(t_seq, 4), "tokens": n_seq, "tokens_per_s": round(n_seq / t_seq, 2)},
        "batched": {"seconds": round(t_bat, 4), "tokens": n_bat, "tokens_per_s": round(n_bat / t_bat, 2)},
        "batched_vs_sequential_throughput": ratio(n_bat / t_bat, n_seq / t_seq),
        "same_tokens_as_sequential": out_seq == out_bat,
    }


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
