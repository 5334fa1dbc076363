"""Training throughput: the project's step (E2PModel.loss) vs a naive full-vocabulary step.

project: E2PModel.loss -> hidden states of the backbone body, logits only at positions that predict
         a reply token, cross-entropy; backward reaches only the projector (the backbone is frozen).
naive:   the same inputs (E2PModel.build) through the CausalLM forward with `labels` (logits for every
         position over the whole vocabulary, float32), the usual Hugging Face recipe.

Both run in float32 here unless the CPU has native bf16 (E2PModel turns bf16 autocast on only then),
so on an AVX2-only CPU the speedup comes from target-only logits alone.
Peak memory: each path runs a short training run in a fresh child process and reports ru_maxrss.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import (MESSAGES, REPLIES, Context, current_rss_mb, embeddings, get_backbone, make_model, make_projector,
                    peak_rss_mb, ratio, timed)


def make_rows(model, batch: int):
    return [model.format(MESSAGES[i % len(MESSAGES)], reply=REPLIES[i % len(REPLIES)]) for i in range(batch)]


def naive_loss(model, rows, emb) -> torch.Tensor:
    """Full-vocabulary logits via the CausalLM forward with labels (float32)."""
    batch = model.build(rows, emb)
    labels = batch["ids"].masked_fill(~batch["is_target"], -100)
    out = model.lm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], labels=labels)
    return out.loss


def project_loss(model, rows, emb) -> torch.Tensor:
    return model.loss(rows, emb)


def step(model, loss_fn, rows, emb, optimizer) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, rows, emb)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def setup(backbone, batch: int):
    model = make_model(backbone, make_projector(backbone, "input"), fixed_length=False, training=True)
    model.projector.train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    return model, opt, make_rows(model, batch), embeddings(batch)


def run(ctx: Context) -> dict:
    s = ctx.settings
    model, opt, rows, emb = setup(ctx.backbone, s["batch"])
    model.projector.eval()  # no dropout: the two losses must match
    with torch.no_grad():
        l_proj, l_naive = float(project_loss(model, rows, emb)), float(naive_loss(model, rows, emb))
    model.projector.train()
    reply_tokens = sum(len(r.target) for r in rows)
    total_tokens = sum(len(r.pre) + len(r.post) + len(r.target) + model.num_prefix_tokens for r in rows)
    t_proj, _ = timed(lambda: step(model, project_loss, rows, emb, opt), s["repeats"])
    t_naive, _ = timed(lambda: step(model, naive_loss, rows, emb, opt), s["repeats"])
    out = {
        "batch": s["batch"], "reply_tokens_per_step": reply_tokens, "tokens_per_step": total_tokens,
        "autocast_bf16": model.autocast,
        "project": {"step_s": round(t_proj, 4), "reply_tokens_per_s": round(reply_tokens / t_proj, 2)},
        "naive": {"step_s": round(t_naive, 4), "reply_tokens_per_s": round(reply_tokens / t_naive, 2)},
        "train_step_speedup_vs_naive": ratio(t_naive, t_proj),
        "loss": {"project": l_proj, "naive": l_naive, "abs_diff": abs(l_proj - l_naive),
                 "identical_within_1e-4": abs(l_proj - l_naive) <= 1e-4 * max(1.0, abs(l_naive))},
        "peak_rss_mb": {path: _child_peak(ctx, path) for path in ("project", "naive")},
        "note": ("no native bf16 on this CPU: both paths float32, the speedup is from target-only logits alone"
                 if not model.autocast else "bf16 autocast on for the project step; the naive step is float32"),
    }
    print(f"  train_step: {out}", flush=True)
    return out


def _child_peak(ctx: Context, path: str) -> dict:
    """A short training run in a fresh process; ru_maxrss before (after loading) and after."""
    cmd = [sys.executable, __file__, "--child", path, "--batch", str(ctx.settings["batch"]),
           "--steps", str(ctx.settings["rss_steps"])] + (["--tiny"] if ctx.tiny else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(path: str, batch: int, steps: int, tiny: bool) -> None:
    backbone = get_backbone(tiny)
    model, opt, rows, emb = setup(backbone, batch)
    before, current = peak_rss_mb(), current_rss_mb()
    loss_fn = project_loss if path == "project" else naive_loss
    for _ in range(steps):
        step(model, loss_fn, rows, emb, opt)
    after = peak_rss_mb()
    # ru_maxrss is a high-water mark: loading the backbone may already have set it, so the growth
    # over the resident size just before training is reported as well
    print(json.dumps({"steps": steps, "peak_after_load": round(before, 1), "rss_before_training": round(current, 1),
                      "peak": round(after, 1), "growth_over_rss_before_training": round(after - current, 1)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["project", "naive"], required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    child(a.child, a.batch, a.steps, a.tiny)
