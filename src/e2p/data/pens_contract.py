"""PENS -> the data contract, as the data set frames its task: a headline for a given news item, written the
way this user writes.

The article texts are not available, but every news item of the PENS test set was rewritten by several users.
So the prompt holds the news item as *another* user's rewrite of it (never the target user's own; items no one
else rewrote are dropped), and the target is the user's own headline. Each user's headlines are split into a
history (their text profile: `profile_text` and a MiniLM profile vector) and targets (the examples).

Written to OUT (`e2p data pens SRC --out OUT`):
  users.npz          behavioural profile: a click encoder (`e2p.data.behaviour`: co-click SVD by default, implicit ALS
                     or item2vec) fitted on the clicks of every user converted (training pool and test users:
                     clicks are behaviour, not targets; no headline ever enters the encoder); each user's vector
                     is folded in from their own clicks alone
  users_text.npz     text profile: mean all-MiniLM-L6-v2 vector of the user's history headlines
  users_text_style.npz  the text profile joined with the history's headline style (e2p.data.headline_style:
                     capitalisation, length, punctuation; z-scored on the training pool)
  *.profile.json     beside users_text.npz and users_text_style.npz: the rule that built them (e2p.data.live_profile),
                     which `e2p train` copies into the projector so a server folds new headlines in the same way
  users_text_slots.npz  with --profile-slots N: the same history as N vectors, the unit means of N clusters of its
                     headline vectors, largest cluster first (`e2p train --embedding-slots N`: one token each)
  examples.jsonl     the training pool's examples (prompts only ever quote training-pool users' headlines)
  test/              with --test-users FILE (or --test-fraction): the test users' examples, with their own
                     users.npz / users_text.npz; they are only evaluated, never trained on. The behavioural
                     encoder may see their clicks, never their headlines.
  data_card.json     counts, settings and where each part came from
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .contract import Example, write_examples, write_users
from .live_profile import ProfileRule, rule_path
from .pens import PensUser, load_pens, split_headlines, split_test_users

SYSTEM = "You write short news headlines in your own style."
HISTORY_IN_PROFILE = 12  # history headlines in profile_text (the text condition's prompt)


PROMPT_LEAD = "Write your headline for this news item. Another reader titled it: "


def prompt_for(other_headline: str) -> str:
    return PROMPT_LEAD + other_headline


def quoted_headline(example: Example) -> str:
    """The other reader's headline an example's prompt quotes: the copy-it baseline's answer."""
    last = example.prompt if isinstance(example.prompt, str) else example.prompt[-1]["content"]
    if not last.startswith(PROMPT_LEAD):
        raise DataError(f"not a PENS headline prompt (expected it to start with {PROMPT_LEAD!r}): {last[:80]!r}")
    return last[len(PROMPT_LEAD):]


def history_slots(vectors: np.ndarray, slots: int, seed: int = 0, rounds: int = 20) -> np.ndarray:
    """[n, d] headline vectors -> [slots * d]: spherical k-means (deterministic in `seed`), each cluster's unit
    mean, largest cluster first; a user with fewer headlines than slots leaves the last slots all zero (unused)."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    n, d = v.shape
    out = np.zeros((slots, d), dtype=np.float32)
    k = min(slots, n)
    rng = np.random.default_rng(seed)
    centres = v[rng.choice(n, size=k, replace=False)]
    for _ in range(rounds):
        assign = np.argmax(v @ centres.T, axis=1)
        for j in range(k):
            members = v[assign == j]
            if len(members):
                c = members.mean(0)
                centres[j] = c / max(float(np.linalg.norm(c)), 1e-12)
    assign = np.argmax(v @ centres.T, axis=1)
    order = sorted(range(k), key=lambda j: (-int((assign == j).sum()), j))
    for slot, j in enumerate(order):
        if (assign == j).any():
            out[slot] = centres[j]
    return out.reshape(-1)


def _examples(users: Sequence[PensUser], quotable: dict[str, list[tuple[str, str]]], history_of: dict, seed: int
              ) -> list[Example]:
    """Each target headline with another user's rewrite of the same news item as its prompt."""
    rng = random.Random(seed)
    out = []
    for u in users:
        profile = "Headlines I wrote before: " + "; ".join(h for _, h in history_of[u.user_id][:HISTORY_IN_PROFILE])
        for news, headline in split_headlines(u, seed=seed)[1]:
            others = [h for who, h in quotable.get(news, []) if who != u.user_id]
            if not others:
                continue  # nobody else rewrote it: no way to say which news it is
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt_for(rng.choice(others))}]
            out.append(Example(u.user_id, messages, headline, profile_text=profile))
    return out


DEFAULT_PROFILE_SET = 100  # items a user's set keeps (every PENS history has 100): the default profile, issue 46


def write_pens_contract(src: str | Path, out: str | Path, test_users: str | Path | None = None,
                        test_fraction: float = 0.0, behaviour: str = "coclick", behaviour_dim: int = 64,
                        weighting: str = "bm25", seed: int = 0, text_encoder=None, profile_slots: int = 0,
                        profile_set: int = DEFAULT_PROFILE_SET, **behaviour_settings) -> dict:
    """Convert PENS users (a .tsv file or folder) into the contract under `out`; see the module doc."""
    try:
        from .behaviour import click_encoder
    except ImportError as exc:  # scipy / implicit come with the eval extra
        raise DataError(f"the PENS click encoders need the eval extra ({exc.name} is missing): pip install 'e2p[eval]'") from None
    from .encoders import TextEncoder

    pool = load_pens(src)
    if test_users is not None:
        test = load_pens(test_users)
        clash = {u.user_id for u in pool} & {u.user_id for u in test}
        if clash:
            raise DataError(f"{len(clash)} test users are also in {src} (e.g. {sorted(clash)[:3]}): test users must be new")
    elif test_fraction > 0:
        pool, test = split_test_users(pool, test_fraction, seed)
    else:
        test = []
    everyone = list(pool) + list(test)
    history_of = {u.user_id: list(split_headlines(u, seed=seed)[0]) for u in everyone}
    quotable: dict[str, list[tuple[str, str]]] = {}
    for u in pool:  # only the training pool's headlines are ever quoted in prompts
        for news, headline in u.pairs():
            quotable.setdefault(news, []).append((u.user_id, headline))
    test_quotable = {k: list(v) for k, v in quotable.items()}
    for u in test:  # test users may quote each other's rewrites (never their own)
        for news, headline in u.pairs():
            test_quotable.setdefault(news, []).append((u.user_id, headline))

    clicks = click_encoder(behaviour, dim=behaviour_dim, weighting=weighting, **behaviour_settings)
    clicks.fit([u.clicked for u in sorted(everyone, key=lambda u: u.user_id)])  # the same fit whatever the file order
    encoder = text_encoder or TextEncoder()

    if profile_slots == 1 or profile_slots < 0:
        raise DataError(f"--profile-slots must be 0 (none) or at least 2, got {profile_slots}")
    if profile_set < 0:
        raise DataError(f"--profile-set must be 0 (none) or the most items a user's set keeps, got {profile_set}")

    from .headline_style import StyleScaler, style_features

    style_of = {u.user_id: style_features([h for _, h in history_of[u.user_id]]) for u in pool}
    scaler = StyleScaler(np.stack([style_of[u.user_id] for u in pool]))  # fitted on the training pool only

    # the live profile's rules (e2p.data.live_profile): a server folds a user's new headlines into their vector
    # with exactly the rule that built these tables, so online and batch profiles agree
    encoder_name = getattr(encoder, "name", "all-MiniLM-L6-v2")
    encoder_dim = getattr(encoder, "dim", None) or np.asarray(encoder.encode(["a headline"])).shape[1]
    text_rule = ProfileRule(dim=int(encoder_dim), encoder=encoder_name)
    style_rule = ProfileRule(dim=text_rule.dim, encoder=encoder_name, style=scaler.to_dict())
    set_rule = ProfileRule(dim=text_rule.dim, encoder=encoder_name, style=scaler.to_dict(), set_items=profile_set or None)

    def profiles(users: Sequence[PensUser]):
        vectors = clicks.encode([u.clicked for u in users])
        text, styled, slotted, sets = [], [], [], []
        for u in users:
            texts = [h for _, h in history_of[u.user_id]]
            heads = np.asarray(encoder.encode(texts), dtype=np.float32)
            text.append(text_rule.batch(heads, texts))
            styled.append(style_rule.batch(heads, texts))
            if profile_slots:
                slotted.append(history_slots(heads, profile_slots, seed))
            if profile_set:
                sets.append(set_rule.batch(heads, texts))
        return (vectors, np.stack(text), np.stack(styled), np.stack(slotted) if slotted else None,
                np.stack(sets) if sets else None)

    out = Path(out)
    card = {"source": str(src), "seed": seed, "behaviour": {"encoder": behaviour, "dim": clicks.dim,
                                                              "weighting": weighting, **behaviour_settings,
                                                              "fitted_on_clicks_of_users": len(everyone)},
            "text_profile": "mean all-MiniLM-L6-v2 of the history headlines", "parts": {},
            # the users file `e2p train --users` should get: chosen on validation users (docs/studies.md, issue 46)
            "default_profile": "users_text_set.npz" if profile_set else "users_text_style.npz"}
    card["text_profile_style"] = {"file": "users_text_style.npz", **scaler.to_dict()}
    if profile_slots:
        card["text_profile_slots"] = {"slots": profile_slots, "file": "users_text_slots.npz",
                                      "how": "unit means of spherical k-means clusters of the history headlines' "
                                             "all-MiniLM-L6-v2 vectors, largest first"}
    if profile_set:
        card["text_profile_set"] = {"items": profile_set, "item_dim": style_rule.embedding_dim, "file": "users_text_set.npz",
                                    "how": "each history headline on its own as the text + style profile of one item "
                                           "(the rule of users_text_style.npz), up to `items` of them, the rest all zero; "
                                           "`e2p train --users users_text_set.npz` trains a set projector (the set "
                                           "size comes from the rule beside the table)"}
    for name, users, quotes, folder in (("train_pool", pool, quotable, out), ("test", test, test_quotable, out / "test")):
        if not users:
            continue
        behaviour, text, styled, slotted, sets = profiles(users)
        ids = [u.user_id for u in users]
        write_users(folder / "users.npz", ids, behaviour)
        write_users(folder / "users_text.npz", ids, text)
        write_users(folder / "users_text_style.npz", ids, styled)
        text_rule.save(rule_path(folder / "users_text.npz"))
        style_rule.save(rule_path(folder / "users_text_style.npz"))
        if slotted is not None:
            write_users(folder / "users_text_slots.npz", ids, slotted)
        if sets is not None:
            write_users(folder / "users_text_set.npz", ids, sets)
            set_rule.save(rule_path(folder / "users_text_set.npz"))
        examples = _examples(users, quotes, history_of, seed)
        write_examples(folder / "examples.jsonl", examples)
        card["parts"][name] = {"folder": str(folder), "users": len(ids), "examples": len(examples),
                               "source": str(test_users) if name == "test" and test_users else str(src)}
    clicks.save_pretrained(out / "behaviour_encoder")
    (out / "data_card.json").write_text(json.dumps(card, indent=2))
    return card
