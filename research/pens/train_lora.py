"""LoRA with the profile as text on a data-contract folder: the fine-tuning reference of the PENS study.

    python research/pens/train_lora.py --users data/pens/users_text.npz --examples data/pens/examples.jsonl \
        --out runs/pens-lora

One adapter for every user (rank 8 on q_proj, v_proj), trained on the training users' examples with each user's
`profile_text` in the system prompt, exactly as the `text` condition formats them; the validation users that
`e2p train` holds out (same seed) are left out too, so the test and validation users are never trained on.
The adapter is `e2p.lora`'s, the one LoRA module the product's `e2p train --lora-rank` trains too; saved in PEFT's
folder format (safetensors) for `Condition(adapter=...)`.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from e2p import E2PModel, load_backbone
from e2p import lora
from e2p.data.contract import load_examples, load_users, split_validation_users


log = logging.getLogger(__name__)

LORA_TARGETS = lora.DEFAULT_TARGETS  # ("q_proj", "v_proj")


class TrainedLoRA:
    """The trained adapter, active on the backbone (as PEFT's in-place injection left it) until `unload()`."""

    def __init__(self, backbone, adapter: lora.Adapter):
        self.backbone, self.adapter = backbone, adapter
        lora.activate(backbone.model, adapter)

    def unload(self):
        """The plain backbone again (its weights were never changed); -> the backbone's model, as PEFT's unload."""
        lora.activate(self.backbone.model, None)
        return self.backbone.model


def train_lora(backbone, rows, *, steps: int = 300, lr: float = 3e-4, rank: int = 8, batch_size: int = 16,
               seed: int = 0, minutes: float | None = None, out_dir: str | Path | None = None, progress: bool = False):
    """LoRA (rank `rank` on q_proj, v_proj) trained on formatted `rows` (loss on target tokens).

    Returns (trained LoRA, info). The adapter stays active on `backbone.model`: call ``.unload()`` to restore the
    plain backbone. With `out_dir` the adapter is saved there (adapter_model.safetensors + adapter_config.json, PEFT's
    format) for `e2p.evaluate.Condition(adapter=...)`."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    adapter = lora.Adapter(lora.find_targets(backbone.model, LORA_TARGETS), rank, 2 * rank).to(backbone.device)
    params = list(adapter.parameters())
    model = E2PModel(backbone, None, training=True)
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    start, losses, step = time.time(), [], 0
    bar = tqdm(total=steps, desc="lora", disable=not progress, dynamic_ncols=True)
    for step in range(1, steps + 1):
        if minutes is not None and time.time() - start > minutes * 60:
            log.info("LoRA: time budget reached at step %d", step - 1)
            step -= 1
            break
        batch = [rows[i] for i in rng.choice(len(rows), size=min(batch_size, len(rows)), replace=False)]
        with lora.active(backbone.model, adapter):  # the backward pass too (recomputed layers see the adapter)
            loss = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    n = sum(p.numel() for p in params)
    info = {"steps": step, "seconds": time.time() - start, "parameters": n, "adapter_bytes": n * 4, "rank": rank,
            "lr": lr, "final_loss": losses[-1] if losses else None}
    if out_dir is not None:
        lora.save_peft(adapter, out_dir, base_model=backbone.name)
    return TrainedLoRA(backbone, adapter), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-target-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    users = load_users(args.users)
    examples = load_examples(args.examples, users)
    ids = sorted({ex.user for ex in examples})
    train_ids, _ = split_validation_users(ids, max(4, min(200, round(0.2 * len(ids)))), args.seed)  # as e2p train
    keep = set(train_ids)
    backbone = load_backbone()
    plain = E2PModel(backbone, None)
    rows = [plain.format(ex.prompt, reply=ex.target, persona_text=ex.profile_text, max_target_tokens=args.max_target_tokens)
            for ex in examples if ex.user in keep]
    out = Path(args.out)
    trained, info = train_lora(backbone, rows, steps=args.steps, lr=args.lr, rank=args.rank, seed=args.seed,
                               out_dir=out, progress=True)
    trained.unload()
    info.update({"train_users": len(keep), "train_examples": len(rows), "examples": args.examples})
    (out / "lora_report.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
