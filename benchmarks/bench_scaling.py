"""Scaling curves: training step time and time per generated token vs batch size and sequence length.

Rows are built from random token ids of exact lengths (prompt + reply), so lengths are controlled;
input-injection projector, k = 1. Plot: benchmarks/results/scaling.png (or next to --out).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench_train_step import project_loss, step
from common import Context, embeddings, make_model, make_projector, random_ids, timed
from e2p.formatting import Segments


def _rows(bb, batch: int, prompt: int, reply: int = 0):
    return [Segments(pre=[], post=random_ids(bb, prompt, seed=i), target=random_ids(bb, reply, seed=1000 + i))
            for i in range(batch)]


def train_point(ctx: Context, model, opt, batch: int, length: int) -> dict:
    """length = prompt + reply tokens, half each."""
    rows = _rows(ctx.backbone, batch, length // 2, length - length // 2)
    seconds, _ = timed(lambda: step(model, project_loss, rows, embeddings(batch), opt), ctx.settings["repeats"])
    return {"batch": batch, "seq_len": length, "step_s": round(seconds, 4)}


def gen_point(ctx: Context, model, batch: int, prompt: int) -> dict:
    N = ctx.settings["new_tokens"]
    rows = _rows(ctx.backbone, batch, prompt)
    emb = embeddings(batch)
    with torch.inference_mode():
        seconds, out = timed(lambda: model.generate_tokens(rows, emb, max_new_tokens=N), ctx.settings["repeats"])
    n = sum(map(len, out))
    return {"batch": batch, "prompt_len": prompt, "new_tokens": N, "seconds": round(seconds, 4),
            "ms_per_token": round(1000 * seconds / n, 3), "tokens_per_s": round(n / seconds, 2)}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (ax[0, 0], res["train_vs_batch"], "batch", "step_s", f"train step vs batch (seq {res['fixed']['train_seq_len']})"),
        (ax[0, 1], res["train_vs_seq_len"], "seq_len", "step_s", f"train step vs seq length (batch {res['fixed']['train_batch']})"),
        (ax[1, 0], res["generate_vs_batch"], "batch", "ms_per_token", f"generation vs batch (prompt {res['fixed']['gen_prompt_len']})"),
        (ax[1, 1], res["generate_vs_prompt_len"], "prompt_len", "ms_per_token", f"generation vs prompt length (batch {res['fixed']['gen_batch']})"),
    ]
    for a, pts, x, y, title in panels:
        a.plot([p[x] for p in pts], [p[y] for p in pts], "o-")
        a.set_xlabel(x)
        a.set_ylabel("seconds per step" if y == "step_s" else "ms per generated token")
        a.set_title(title, fontsize=10)
        a.grid(alpha=0.3)
    fig.suptitle(f"E2P scaling ({res['backbone']}, torch threads {torch.get_num_threads()})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(ctx: Context, png: Path) -> dict:
    s = ctx.settings
    bb = ctx.backbone
    model = make_model(bb, make_projector(bb, "input"))
    model.projector.train()
    opt = torch.optim.AdamW(model.projector.parameters(), lr=0.0)
    fixed = {"train_batch": s["train_batch"], "train_seq_len": s["train_seq_len"],
             "gen_batch": s["gen_batch"], "gen_prompt_len": s["gen_prompt_len"]}
    res = {
        "backbone": bb.name, "fixed": fixed,
        "train_vs_batch": [train_point(ctx, model, opt, b, s["train_seq_len"]) for b in s["batches"]],
        "train_vs_seq_len": [train_point(ctx, model, opt, s["train_batch"], n) for n in s["train_seq_lens"]],
        "generate_vs_batch": [gen_point(ctx, model, b, s["gen_prompt_len"]) for b in s["gen_batches"]],
        "generate_vs_prompt_len": [gen_point(ctx, model, s["gen_batch"], n) for n in s["gen_prompt_lens"]],
    }
    plot(res, png)
    res["plot"] = str(png)
    print(f"  scaling: {res}", flush=True)
    return res
