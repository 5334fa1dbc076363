"""LoRA with the profile as text on a data-contract folder: the fine-tuning reference of the PENS study.

    python research/pens/train_lora.py --users data/pens/users_text.npz --examples data/pens/examples.jsonl \
        --out runs/pens-lora

One adapter for every user (rank 8 on q_proj, v_proj), trained on the training users' examples with each user's
`profile_text` in the system prompt, exactly as the `text` condition formats them; the validation users that
`e2p train` holds out (same seed) are left out too, so the test and validation users are never trained on.
Saved as a PEFT folder (safetensors) for `Condition(adapter=...)`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2p import E2PModel, load_backbone
from e2p.data.contract import load_examples, load_users, split_validation_users
from e2p.lora import train_lora


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
    peft_model, info = train_lora(backbone, rows, steps=args.steps, lr=args.lr, rank=args.rank, seed=args.seed,
                                  out_dir=out, progress=True)
    peft_model.unload()
    info.update({"train_users": len(keep), "train_examples": len(rows), "examples": args.examples})
    (out / "lora_report.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
