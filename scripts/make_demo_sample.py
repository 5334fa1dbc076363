"""Build the small sample of unseen people that ships with the package for `e2p demo` (no data folder needed).

    python scripts/make_demo_sample.py ../shared/data/synthetic_persona_chat/Synthetic-Persona-Chat_test.csv

Synthetic-Persona-Chat (Google, CC-BY-4.0) test people are never seen in training (the shipped projector trained
on ConvAI2 valid + Synthetic-Persona-Chat valid). Writes src/e2p/demo_data/spc-test-sample/: users.npz
(all-MiniLM-L6-v2 of each persona), examples.jsonl (the data contract, with `profile_text`) and NOTICE.md.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from e2p.data.contract import Example, write_examples, write_users
from e2p.data.persona import LoadReport, load_persona
from e2p.data.encoders import TextEncoder

OUT = Path(__file__).resolve().parents[1] / "src" / "e2p" / "demo_data" / "spc-test-sample"
NOTICE = """# Synthetic-Persona-Chat test sample

{people} people and {examples} of their replies, taken from the **test** split of Synthetic-Persona-Chat
(Jandaghi et al., "Faithful Persona-based Conversational Dataset Generation with Large Language Models", Google,
2023; https://github.com/google-research-datasets/Synthetic-Persona-Chat), licensed under the Creative Commons
Attribution 4.0 International licence (CC-BY-4.0, https://creativecommons.org/licenses/by/4.0/).

Changes: a seeded sample of people (`scripts/make_demo_sample.py`, seed {seed}), each reply with its two
preceding turns, written in e2p's data contract; `users.npz` holds all-MiniLM-L6-v2 embeddings of each persona.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--people", type=int, default=24)
    ap.add_argument("--replies", type=int, default=4, help="replies per person")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    examples = load_persona(Path(args.csv), "all", LoadReport())
    by_person: dict[str, list] = {}
    for ex in examples:
        if len(ex.history) >= 2 and 4 <= len(ex.reply.split()) <= 40:
            by_person.setdefault(ex.person_id, []).append(ex)
    rng = random.Random(args.seed)
    people = rng.sample(sorted(p for p, v in by_person.items() if len(v) >= args.replies), args.people)
    chosen = [ex for p in people for ex in rng.sample(by_person[p], args.replies)]
    personas = {ex.person_id: ex.persona_text for ex in chosen}
    vectors = TextEncoder().encode([personas[p] for p in people])
    write_users(OUT / "users.npz", people, vectors)
    write_examples(OUT / "examples.jsonl", [Example(ex.person_id, ex.messages(2), ex.reply, ex.persona_text) for ex in chosen])
    (OUT / "NOTICE.md").write_text(NOTICE.format(people=len(people), examples=len(chosen), seed=args.seed))
    print(f"wrote {len(people)} people, {len(chosen)} replies to {OUT}")


if __name__ == "__main__":
    main()
