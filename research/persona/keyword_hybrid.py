"""The trained lexical ceiling: what the words nearest a persona embedding give once the model is trained to read them.

    python research/persona/keyword_hybrid.py [--data ../shared/data] [--shared runs/exp1/shared_prefix]
                                     [--text-trained runs/exp2/shared_prefix_text] [--out runs/kwexp/shared_prefix_kw]
                                     [--words nearest|oracle] [--steps 30]

--words oracle puts the persona's own content words there instead (at most 12, stopwords and words common to
many personas removed, as research/persona/persona_ceiling.py's oracle_words): what a *perfect* keyword decoder of the
embedding would give a model trained to read it.

Like `shared_prefix_text` (the shared prefix trained 30 more steps with the persona text in the system prompt),
but the system prompt holds the 12 vocabulary words nearest the persona's all-MiniLM-L6-v2 embedding
(research/persona/persona_ceiling.py: `words`). Then, on each Synthetic-Persona-Chat test half (the 160 replies
`e2p eval --limit 160 --people-half H` scores), the shared prefix, the text-trained prefix with the person's own
and another person's text, and the keyword-trained prefix with own and another person's words.
"""
import argparse
import math
import random

import torch

from e2p.backbone import load_backbone
from e2p.data.persona import people_half, persona_split
from e2p.data.encoders import TextEncoder
from e2p.evaluate import derangement, paired_bootstrap
from e2p.model import E2PModel
from e2p.projector import Projector
from e2p.training.stage_runner import sample_examples
from recipe import PersonaRecipeConfig as RecipeConfig, reply_row, split_people
from e2p.training.loop import TrainConfig, train_projector
from e2p.evaluate.scoring import Item, row_losses
from persona_ceiling import ContentWords, nearest_words, unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--shared", default="runs/exp1/shared_prefix")
    ap.add_argument("--text-trained", default="runs/exp2/shared_prefix_text")
    ap.add_argument("--out", default="runs/kwexp/shared_prefix_kw")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--words", choices=["nearest", "oracle"], default="nearest")
    args = ap.parse_args()
    backbone, encoder = load_backbone(), TextEncoder()
    train, test = persona_split(args.data)
    if args.words == "oracle":
        content = ContentWords(backbone, list({e.persona for e in train}))
        words = lambda texts: [" ".join(content(t)[:12]) for t in texts]
    else:
        words = lambda texts: nearest_words(backbone, encoder, unit(encoder, texts))
    rest, val = split_people(train, 40, 0)  # the recipe's validation people (seed 0)
    model = E2PModel(backbone, Projector.from_pretrained(args.shared, backbone))

    def rows(model, examples, texts):  # the recipe's reply rows (2 turns of history, 32 target tokens)
        return [Item(reply_row(model, e, RecipeConfig(), t), -1) for e, t in zip(examples, texts)]

    tr, vs = sample_examples(rest, args.steps * 16, len("shared_prefix_text")), sample_examples(val, 48, 0)
    train_projector(model, rows(model, tr, words([e.persona_text for e in tr])), None, args.out,
                    TrainConfig(steps=args.steps, batch_size=16, lr=1e-3, eval_every=10, seed=0),
                    val_items=rows(model, vs, words([e.persona_text for e in vs])), name="shared_prefix_kw")
    for half in (0, 1):
        examples = random.Random(0).sample(people_half(test, half), 160)
        people = [e.person_id for e in examples]
        swap = derangement(people, 0)
        texts = [e.persona_text for e in examples]
        kws = words(texts)
        other = lambda xs: [xs[j] for j in swap]
        scores = {}
        for name, folder, persona in [("shared_prefix", args.shared, [None] * len(examples)),
                                      ("text", args.text_trained, texts), ("text_other", args.text_trained, other(texts)),
                                      ("words", args.out, kws), ("words_other", args.out, other(kws))]:
            m = E2PModel(backbone, Projector.from_pretrained(folder, backbone).eval())
            scores[name] = row_losses(m, rows(m, examples, persona), None, 16)
        counts = scores["shared_prefix"][1]
        ppl = {k: math.exp(v[0].sum() / counts.sum()) for k, v in scores.items()}
        print(f"half {half}: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
        for a, b in [("text", "text_other"), ("text", "shared_prefix"), ("words", "words_other"), ("words", "shared_prefix")]:
            lo, hi = paired_bootstrap(scores[a][0], scores[b][0], counts, people)
            print(f"half {half}: {a} vs {b}: {100 * (ppl[a] / ppl[b] - 1):+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]", flush=True)


if __name__ == "__main__":
    main()
