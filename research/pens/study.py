"""The PENS headline study through the one evaluation loop: every condition on the test users' examples.

    python research/pens/study.py --data data/pens-als --behaviour runs/pens-als --text-profile runs/pens-text \
        --lora runs/pens-lora --out runs/pens-study

Conditions (all scored on the same target tokens of users never trained on):
  none, text               the backbone alone; with the user's earlier headlines in the prompt
  shared_prefix            the style-only prefix (no user information)
  shuffled, e2p            E2P with the behavioural profile (another user's / the user's own clicks)
  shuffled_textprofile,    E2P with the text profile (MiniLM of the user's earlier headlines)
  e2p_textprofile
  shared_prefix_text       the style prefix trained with the earlier headlines in the prompt ("text, trained alike")
  e2p_text                 the hybrid: behavioural E2P trained together with the text
  lora_text                LoRA (rank 8) trained with the profile as text
  copy                     generations only: the other reader's headline the prompt quotes (ROUGE reference point)
Per-user prompt tuning for seen users (a free prefix per user, learned on half of each test user's own headlines)
is research/pens/oracle_prefix_ceiling.py: it needs a split of each user's targets, so it reports on its own halves.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e2p import load_backbone
from e2p.data.contract import load_examples, load_users
from e2p.data.pens_contract import quoted_headline
from e2p.evaluate import Condition, evaluate_examples

PAIRS = [("e2p", "shared_prefix"), ("e2p", "shuffled"), ("e2p_textprofile", "shared_prefix"),
         ("e2p_textprofile", "shuffled_textprofile"), ("e2p_text", "text"), ("e2p_text", "shared_prefix_text"),
         ("shared_prefix_text", "text"), ("lora_text", "text"), ("e2p", "lora_text"), ("e2p_text", "lora_text"),
         ("e2p", "none"), ("shared_prefix", "none"), ("text", "none")]


def run_pens_study(backbone, data: str | Path, behaviour: str | Path, out: str | Path, *,
                   text_profile: str | Path | None = None, lora: str | Path | None = None, generate: int = 170,
                   limit: int | None = None, seed: int = 0, encoder=None, progress: bool = True) -> dict:
    test = Path(data) / "test"
    users, text_users = load_users(test / "users.npz"), load_users(test / "users_text.npz")
    examples = load_examples(test / "examples.jsonl", users)
    b = Path(behaviour)
    conds = [Condition("none", None), Condition("text", None, with_text=True), Condition("shared_prefix", b / "shared_prefix"),
             Condition("shuffled", b, embeddings="shuffled"), Condition("e2p", b, embeddings="own")]
    if text_profile:
        t = Path(text_profile)
        conds += [Condition("shuffled_textprofile", t, embeddings="shuffled", users=text_users),
                  Condition("e2p_textprofile", t, embeddings="own", users=text_users)]
    if (b / "shared_prefix_text" / "config.json").is_file():
        conds.append(Condition("shared_prefix_text", b / "shared_prefix_text", with_text=True))
    if (b / "e2p_text" / "config.json").is_file():
        conds.append(Condition("e2p_text", b / "e2p_text", with_text=True, embeddings="own"))
    if lora:
        conds.append(Condition("lora_text", None, with_text=True, adapter=Path(lora)))
    return evaluate_examples(backbone, users, examples, b, out, conditions=conds, limit=limit, generate=generate,
                             seed=seed, encoder=encoder, baselines={"copy": quoted_headline}, pairs=PAIRS,
                             progress=progress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder written by `e2p data pens` (its test/ part is evaluated)")
    ap.add_argument("--behaviour", required=True, help="`e2p train` run on users.npz (with --text-steps for e2p_text)")
    ap.add_argument("--text-profile", default=None, help="`e2p train` run on users_text.npz")
    ap.add_argument("--lora", default=None, help="research/pens/train_lora.py output")
    ap.add_argument("--out", required=True)
    ap.add_argument("--generate", type=int, default=170, help="greedy generations per condition")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = run_pens_study(load_backbone(), args.data, args.behaviour, args.out, text_profile=args.text_profile,
                             lora=args.lora, generate=args.generate, limit=args.limit, seed=args.seed)
    print((Path(args.out) / "REPORT.md").read_text())
    print(results["verdict"]["text"])


if __name__ == "__main__":
    main()
