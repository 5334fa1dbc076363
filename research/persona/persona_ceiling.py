"""How much can a persona *embedding* tell the frozen backbone about a new person? Ceilings without training a projector.

    python research/persona/persona_ceiling.py [--data ../shared/data] [--limit 160] [--people-half 0|1]

On Synthetic-Persona-Chat test replies (the examples `e2p eval --limit N --people-half H` scores), the untrained
backbone reads one of these in its system prompt, once for the person and once for another person (the same
derangement as `shuffled`); the person's share is the perplexity change own vs other:

  text             the persona sentences the embedding was made from (what full text gives)
  words            the 12 vocabulary words whose all-MiniLM-L6-v2 embeddings are nearest the persona embedding:
                   what the embedding says lexically, decoded by nearest neighbours, no training
  nearest_persona  the training persona (of ConvAI2 + Synthetic-Persona-Chat valid + MSC, sharing no sentence with
                   the person) whose embedding is nearest: what a projector that maps embeddings to content it has
                   seen in training could convey at best

With --sources, also (sentence-slot embeddings, one vector per persona sentence, as `--embedding-slots` trains):
  oracle_words       the persona's own content words (no stopwords), at most 12: the best any keyword decoder can do
  bow_words          the 12 words a bag-of-words decoder (an MLP trained here in a few minutes, no backbone, on the
                     training personas and random subsets of them) predicts from the joined-persona embedding
  bow_per_sentence   the same decoder's 3 best words for each sentence's own embedding
  nearest_sentences  for each sentence's embedding, the nearest training persona sentence (not the sentence itself)
"""
import argparse
import math
import random
import re

import torch
from tqdm.auto import tqdm

from e2p.backbone import load_backbone
from e2p.data.persona import normalize_sentence, people_half, persona_split
from e2p.data.encoders import TextEncoder
from e2p.evaluate import derangement, paired_bootstrap
from e2p.model import E2PModel
from recipe import PersonaRecipeConfig as RecipeConfig, reply_row
from e2p.evaluate.scoring import Item, row_losses


def unit(encoder, texts: list[str]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(encoder.encode(texts, batch_size=128), dtype=torch.float32), dim=-1)


def whole_words(backbone) -> set[str]:
    """The backbone vocabulary's whole words (a leading-space token of 3+ letters), lower-cased."""
    return {t[1:].lower() for t in backbone.tokenizer.get_vocab() if t.startswith("Ġ") and re.fullmatch(r"[a-zA-Z]{3,}", t[1:])}


def nearest_words(backbone, encoder, queries: torch.Tensor, n: int = 12) -> list[str]:
    """The n backbone vocabulary words (whole words, 3+ letters) nearest each query embedding."""
    words = sorted(whole_words(backbone))
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


STOPWORDS = set("""the and for are was but not you your our their they them this that these those with from have has had
been being just also very really much many some any all can could would should will did does doing into about than then
there here what when where which who how why its his her hers him she he were out get got one lot lots""".split())


class ContentWords:
    """A text's content words, in order: whole words of the backbone's vocabulary that are neither stopwords nor
    in more than 15% of the training personas (those say nothing about one person)."""

    def __init__(self, backbone, personas: list[tuple[str, ...]]):
        self.vocab = whole_words(backbone)
        counts: dict[str, int] = {}
        for p in personas:
            for w in set(self.tokens(" ".join(p))):
                counts[w] = counts.get(w, 0) + 1
        self.stop = STOPWORDS | {w for w, n in counts.items() if n > 0.15 * len(personas)}

    def tokens(self, text: str) -> list[str]:
        return [w for w in re.findall(r"[a-z]+", text.lower()) if w in self.vocab]

    def __call__(self, text: str) -> list[str]:
        return list(dict.fromkeys(w for w in self.tokens(text) if w not in self.stop))


class BagOfWords:
    """Embedding -> the persona's content words: an MLP over the backbone's whole-word vocabulary, trained on the
    training personas (whole, and two random subsets each) with a cross-entropy to the uniform distribution over
    the words the text contains. What a small learned decoder can read lexically out of one embedding."""

    def __init__(self, backbone, encoder, personas: list[tuple[str, ...]], seed: int = 0, epochs: int = 12):
        self.content = ContentWords(backbone, personas)
        rng = random.Random(seed)
        texts = []
        for p in personas:
            texts.append(" ".join(p))
            for _ in range(2):
                texts.append(" ".join(rng.sample(list(p), rng.randint(1, max(1, len(p) - 1)))))
        texts = [t for t in dict.fromkeys(texts) if self.content(t)]
        self.words = sorted({w for t in texts for w in self.content(t)})
        index = {w: i for i, w in enumerate(self.words)}
        x = unit(encoder, texts)
        self.mean = x.mean(0)
        y = torch.zeros(len(texts), len(self.words))
        for i, t in enumerate(texts):
            c = self.content(t)
            y[i, [index[w] for w in c]] = 1.0 / len(c)
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1024), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(1024, len(self.words)))
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=0.01)
        held_out = torch.randperm(len(texts))[:500]  # watched, not trained on
        train_rows = torch.tensor(sorted(set(range(len(texts))) - set(held_out.tolist())))
        loss_of = lambda idx: -(y[idx] * torch.log_softmax(self.net(x[idx] - self.mean), -1)).sum(-1).mean()
        bar = tqdm(range(epochs), desc="bag-of-words decoder")
        for _ in bar:
            self.net.train()
            order = train_rows[torch.randperm(len(train_rows))]
            for b in range(0, len(order), 256):
                loss = loss_of(order[b:b + 256])
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.net.eval()
            with torch.no_grad():
                bar.set_postfix(held_out_loss=f"{loss_of(held_out).item():.3f}")

    def decode(self, queries: torch.Tensor, n: int) -> list[list[str]]:
        with torch.no_grad():
            return [[self.words[j] for j in row] for row in self.net(queries - self.mean).topk(n, dim=-1).indices.tolist()]


def nearest_sentences(encoder, examples, bank_examples) -> list[str]:
    """Each persona sentence replaced by the nearest training persona sentence other than itself."""
    bank = sorted({normalize_sentence(s): s for p in sorted({e.persona for e in bank_examples}) for s in p}.items())
    norms, texts = [n for n, _ in bank], [t for _, t in bank]
    table = unit(encoder, texts)
    out = []
    for ex in examples:
        own = {normalize_sentence(s) for s in ex.persona}
        ranked = (unit(encoder, list(ex.persona)) @ table.T).argsort(dim=-1, descending=True).tolist()
        out.append(" ".join(next(texts[i] for i in row if norms[i] not in own) for row in ranked))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--people-half", type=int, choices=[0, 1], default=None)
    ap.add_argument("--seed", type=int, default=0)
    more = ["oracle_words", "bow_words", "bow_per_sentence", "nearest_sentences"]
    ap.add_argument("--sources", nargs="+", choices=["text", "words", "nearest_persona"] + more,
                    default=["text", "words", "nearest_persona"])
    args = ap.parse_args()
    backbone, encoder = load_backbone(), TextEncoder()
    train, test = persona_split(args.data, include_msc=True)
    if args.people_half is not None:
        test = people_half(test, args.people_half)
    examples = random.Random(args.seed).sample(test, min(args.limit, len(test)))
    people = [e.person_id for e in examples]
    swap = derangement(people, args.seed)
    queries = unit(encoder, [e.persona_text for e in examples])
    make = {"text": lambda: [e.persona_text for e in examples],
            "words": lambda: nearest_words(backbone, encoder, queries),
            "nearest_persona": lambda: nearest_personas(encoder, queries, examples, train),
            "nearest_sentences": lambda: nearest_sentences(encoder, examples, train)}
    if {"oracle_words", "bow_words", "bow_per_sentence"} & set(args.sources):
        bow = BagOfWords(backbone, encoder, sorted({e.persona for e in train}), args.seed)
        make["oracle_words"] = lambda: [" ".join(bow.content(e.persona_text)[:12]) for e in examples]
        make["bow_words"] = lambda: [" ".join(w) for w in bow.decode(queries, 12)]
        make["bow_per_sentence"] = lambda: [" ".join(dict.fromkeys(w for ws in bow.decode(unit(encoder, list(e.persona)), 3)
                                                                   for w in ws)) for e in examples]
    sources = {name: make[name]() for name in args.sources}
    for name in ("bow_words", "bow_per_sentence"):
        if name in sources:
            hits = [len(set(t.split()) & set(bow.content(e.persona_text))) for t, e in zip(sources[name], examples)]
            print(f"{name}: {sum(len(t.split()) for t in sources[name]) / len(examples):.1f} words per person, "
                  f"{sum(hits) / len(hits):.2f} of them the persona's own content words "
                  f"(it has {sum(len(bow.content(e.persona_text)) for e in examples) / len(examples):.1f})")
    for i in range(2):
        print(f"example {i}: " + " | ".join(f"{k}: {v[i]}" for k, v in sources.items()))
    model = E2PModel(backbone)

    def score(texts):
        items = [Item(reply_row(model, e, RecipeConfig(), t), -1) for e, t in zip(examples, texts)]
        return row_losses(model, items, None, 16)

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
