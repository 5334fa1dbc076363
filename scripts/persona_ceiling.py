"""How much can a persona *embedding* tell the frozen backbone about a new person? Ceilings without training a projector.

    python scripts/persona_ceiling.py [--data ../shared/data] [--limit 160] [--people-half 0|1]

On Synthetic-Persona-Chat test replies (the examples `e2p eval --limit N --people-half H` scores), the untrained
backbone reads one of these in its system prompt, once for the person and once for another person (the same
derangement as `shuffled`); the person's share is the perplexity change own vs other:

  text             the persona sentences the embedding was made from (what full text gives)
  words            the 12 vocabulary words whose all-MiniLM-L6-v2 embeddings are nearest the persona embedding:
                   what the embedding says lexically, decoded by nearest neighbours, no training
  nearest_persona  the training persona (of ConvAI2 + Synthetic-Persona-Chat valid + MSC, sharing no sentence with
                   the person) whose embedding is nearest: what a projector that maps embeddings to content it has
                   seen in training could convey at best
"""
import argparse
import math
import random
import re

import torch
from tqdm.auto import tqdm

from e2p.backbone import load_backbone
from e2p.data.persona import normalize_sentence, people_half, persona_split
from e2p.encoders import TextEncoder
from e2p.evaluate import derangement, paired_bootstrap, score_condition
from e2p.model import E2PModel
from e2p.recipe import RecipeConfig, _reply_row
from e2p.train import Item


def unit(encoder, texts: list[str]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(encoder.encode(texts, batch_size=128), dtype=torch.float32), dim=-1)


def nearest_words(backbone, encoder, queries: torch.Tensor, n: int = 12) -> list[str]:
    """The n backbone vocabulary words (whole words, 3+ letters) nearest each query embedding."""
    vocab = backbone.tokenizer.get_vocab()
    words = sorted({t[1:].lower() for t in vocab if t.startswith("Ġ") and re.fullmatch(r"[a-zA-Z]{3,}", t[1:])})
    table = unit(encoder, words)
    return [" ".join(words[j] for j in row) for row in (queries @ table.T).topk(n, dim=-1).indices.tolist()]


def nearest_personas(encoder, queries: torch.Tensor, examples, bank_examples) -> list[str]:
    """For each example, the bank persona nearest its embedding that shares no sentence with it."""
    bank = {}
    for e in bank_examples:
        bank.setdefault(e.persona_text, {normalize_sentence(s) for s in e.persona})
    texts = list(bank)
    table = unit(encoder, texts)
    out = []
    for q, ex in zip(queries, examples):
        own = {normalize_sentence(s) for s in ex.persona}
        out.append(next(texts[i] for i in (table @ q).argsort(descending=True).tolist() if not bank[texts[i]] & own))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--people-half", type=int, choices=[0, 1], default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    backbone, encoder = load_backbone(), TextEncoder()
    train, test = persona_split(args.data, include_msc=True)
    if args.people_half is not None:
        test = people_half(test, args.people_half)
    examples = random.Random(args.seed).sample(test, min(args.limit, len(test)))
    people = [e.person_id for e in examples]
    swap = derangement(people, args.seed)
    queries = unit(encoder, [e.persona_text for e in examples])
    sources = {"text": [e.persona_text for e in examples],
               "words": nearest_words(backbone, encoder, queries),
               "nearest_persona": nearest_personas(encoder, queries, examples, train)}
    for i in range(2):
        print(f"example {i}: " + " | ".join(f"{k}: {v[i]}" for k, v in sources.items()))
    model = E2PModel(backbone)

    def score(texts):
        items = [Item(_reply_row(model, e, RecipeConfig(), t), -1) for e, t in zip(examples, texts)]
        return score_condition(model, items, None, 16)

    bar = tqdm(total=1 + 2 * len(sources), desc="conditions")
    none = score([None] * len(examples))
    bar.update()
    counts = none[1]
    ppl = lambda s: math.exp(s[0].sum() / counts.sum())
    print(f"\n{len(examples)} replies of {len(set(people))} people; none: perplexity {ppl(none):.3f}")
    print("| source | own | another person's | own vs another's (95% CI over people) |\n|---|---|---|---|")
    for name, texts in sources.items():
        own, other = score(texts), score([texts[j] for j in swap])
        bar.update(2)
        lo, hi = paired_bootstrap(own[0], other[0], counts, people)
        print(f"| {name} | {ppl(own):.3f} | {ppl(other):.3f} | {100 * (ppl(own) / ppl(other) - 1):+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}] |",
              flush=True)


if __name__ == "__main__":
    main()
