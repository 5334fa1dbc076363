"""Which projector to ship: the best identification of greedy replies among candidates that do not lose more than
1% perplexity to the style-only prefix, on *validation* people (never trained on, never the test people).

    python research/persona/select_shipped.py --data ../shared/data --projector persona-deep-k1 --out runs/ship

Candidates: the projector with its person part scaled by s (`person_scale`: 0 is the shared prefix itself, 1 as
trained, > 1 says more of what the embedding tells about the person), scored through the one evaluation loop on
the replies of the 40 validation people of the projector's own split (its recipe.json: val_people, seed). Writes
selection.json and the loop's report; prints the choice.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from e2p import E2PConfig, Projector, TextEncoder, load_backbone
from e2p.config import resolve_projector
from e2p.data.persona import persona_split
from e2p.data.persona_contract import persona_contract
from e2p.data.encoders import encoder_for
from e2p.evaluate import Condition, evaluate_examples
from recipe import split_people

SCALES = (0.5, 1.0, 1.5, 2.0, 3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--projector", default="persona-deep-k1")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scales", default=",".join(map(str, SCALES)))
    ap.add_argument("--limit", type=int, default=240, help="validation replies scored")
    ap.add_argument("--generate", type=int, default=120, help="greedy replies per candidate (identification)")
    ap.add_argument("--max-loss", type=float, default=0.01, help="perplexity loss to the shared prefix allowed")
    args = ap.parse_args()
    src, out = resolve_projector(args.projector), Path(args.out)
    recipe = json.loads((src / "recipe.json").read_text())
    train, _ = persona_split(args.data)
    _, val = split_people(train, recipe["val_people"], recipe["seed"])  # the people its checkpoints were chosen on
    val = random.Random(0).sample(val, min(args.limit, len(val)))
    backbone, encoder = load_backbone(), TextEncoder()
    config = E2PConfig.load(src)
    users, examples = persona_contract(val, encoder_for(config, encoder), config.history_turns)
    conds = [Condition("none", None), Condition("text", None, with_text=True),
             Condition("shared_prefix", src / "shared_prefix"), Condition("shuffled", src, embeddings="shuffled")]
    for s in [float(x) for x in args.scales.split(",")]:
        p = Projector.from_pretrained(src)
        p.config.person_scale = s
        folder = out / "candidates" / f"scale{s}"
        p.save_pretrained(folder)
        conds.append(Condition(f"e2p_scale{s}", folder, embeddings="own"))
    r = evaluate_examples(backbone, users, examples, src, out, conditions=conds, generate=args.generate, encoder=encoder,
                          pairs=[(c.name, "shared_prefix") for c in conds if c.name.startswith("e2p")])
    shared = r["conditions"]["shared_prefix"]["perplexity"]
    ok = {n: c for n, c in r["conditions"].items() if n.startswith("e2p") and c["perplexity"] <= shared * (1 + args.max_loss)}
    best = max(ok, key=lambda n: (ok[n]["identification"], -ok[n]["perplexity"])) if ok else "shared_prefix"
    summary = {"validation_people": r["users"], "replies": r["examples"], "chance": r["identification"]["chance"],
               "shared_prefix_perplexity": shared, "chosen": best,
               "candidates": {n: {k: c.get(k) for k in ("perplexity", "identification", "rougeL")}
                              for n, c in r["conditions"].items()}}
    (out / "selection.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
