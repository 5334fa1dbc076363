"""PENS personalized headlines as an E2P task: user / headline splits, text and behavioural profiles.

- users are split into train users and unseen users (:func:`~e2p.data.pens.split_users`);
- within a user, headlines are split into a history pool and targets (:func:`~e2p.data.pens.split_headlines`);
- seen users: a few train users whose first ``eval_targets`` targets are held out of training and scored;
- text profile: mean of the encoder's (MiniLM) embeddings of the history headlines, L2-normalized;
- behavioural profile: :class:`~e2p.behaviour.CoClickEncoder` fitted on the train users' clicks (fold-in for
  unseen users);
- drift: the text profile recomputed from each half of the history pool (:func:`~e2p.data.pens.other_half`).

The task prompt is :data:`PENS_PROMPT`; the reply is the user's headline. The `text` condition puts the user's
history headlines, truncated to a token budget, in front of the same prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .behaviour import CoClickEncoder
from .data.pens import PensUser, headlines, other_half, split_headlines, split_users
from .errors import DataError

log = logging.getLogger(__name__)

PENS_SYSTEM_PROMPT = "You write short news headlines."
PENS_PROMPT = "Write a news headline."


def text_prompt(profile: str) -> str:
    return f"Headlines you wrote before: {profile}\n\n{PENS_PROMPT}"


def _unit_mean(vectors: np.ndarray) -> np.ndarray:
    v = vectors.mean(0)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


@dataclass
class PensTask:
    train_ids: list[str]
    unseen_ids: list[str]
    seen_eval_ids: list[str]
    history: dict[str, list[str]]
    train_targets: dict[str, list[str]]  # train users: targets used for training
    eval_targets: dict[str, list[str]]  # evaluated users (seen and unseen): held-out targets
    profile_text: dict[str, str]  # history headlines as text, truncated to the token budget
    index: dict[str, int]  # user id -> row of the embedding tables
    text_table: torch.Tensor
    half_tables: tuple[torch.Tensor, torch.Tensor]  # text profiles from each half of the history pool
    behaviour_table: torch.Tensor | None
    info: dict = field(default_factory=dict)

    @property
    def eval_ids(self) -> list[str]:
        return self.seen_eval_ids + self.unseen_ids

    def eval_rows(self) -> list[tuple[str, str, bool]]:
        """(user id, target headline, seen in training) for every scored example, seen users first."""
        return [(u, t, u in set(self.seen_eval_ids)) for u in self.eval_ids for t in self.eval_targets[u]]

    def train_tuples(self, with_text: bool = False) -> list[tuple[str, str, int]]:
        """(prompt, reply, person index) training items of the train users."""
        out = []
        for u in self.train_ids:
            prompt = text_prompt(self.profile_text[u]) if with_text else PENS_PROMPT
            out += [(prompt, t, self.index[u]) for t in self.train_targets[u]]
        return out


def _truncate(tokenizer, texts: Sequence[str], budget: int, sep: str = "; ") -> str:
    """As many of `texts` as fit in `budget` tokens, joined by `sep`."""
    kept, used = [], 0
    for t in texts:
        n = len(tokenizer(t + sep, add_special_tokens=False)["input_ids"])
        if used + n > budget:
            break
        kept.append(t)
        used += n
    return sep.join(kept)


def build_pens_task(users: Sequence[PensUser], encoder, tokenizer, *, seed: int = 0, max_users: int | None = None,
                    unseen_fraction: float = 0.2, seen_eval_users: int = 10, unseen_eval_users: int | None = None,
                    eval_targets: int = 10, train_targets: int | None = None, history_token_budget: int = 256,
                    behaviour_dim: int = 64) -> PensTask:
    rng = np.random.default_rng(seed)
    skipped = {}
    ok = [u for u in users if len(u.headlines) >= 4]
    if len(ok) < len(users):
        skipped["PENS users with fewer than 4 headlines"] = len(users) - len(ok)
    users = ok
    if max_users is not None and len(users) > max_users:
        keep = set(rng.permutation(sorted(u.user_id for u in users))[:max_users].tolist())
        users = [u for u in users if u.user_id in keep]
    if len(users) < 3:
        raise DataError(f"the PENS part needs at least 3 users with 4+ headlines, got {len(users)}")
    train, unseen = split_users(users, unseen_fraction, seed)
    if unseen_eval_users is not None:
        unseen = unseen[:unseen_eval_users]
    unseen_set = {u.user_id for u in unseen}
    order = [train[i] for i in rng.permutation(len(train))]
    seen_eval = {u.user_id for u in order[:max(1, min(seen_eval_users, len(train) - 1))]}
    history, train_t, eval_t, halves = {}, {}, {}, {}
    for u in train + unseen:
        hist, targets = split_headlines(u, seed=seed)
        history[u.user_id] = headlines(hist)
        targets = headlines(targets)
        if u.user_id in unseen_set or u.user_id in seen_eval:
            n = max(1, min(eval_targets, len(targets) - (1 if u.user_id in seen_eval else 0)))
            eval_t[u.user_id] = targets[:n]
            targets = targets[n:]
            halves[u.user_id] = (headlines(split_headlines(u, seed=seed, half=0)[0]),
                                 headlines(other_half(u, seed=seed, half=0)[0]))
        if u.user_id not in unseen_set:
            train_t[u.user_id] = targets[:train_targets] if train_targets else targets
    ids = [u.user_id for u in train + unseen]
    index = {uid: i for i, uid in enumerate(ids)}
    texts = sorted({h for uid in ids for h in history[uid]})
    vectors = np.asarray(encoder.encode(texts), dtype=np.float32)
    pos = {t: i for i, t in enumerate(texts)}

    def profile(hs: Sequence[str]) -> np.ndarray:
        return _unit_mean(vectors[[pos[h] for h in hs]])

    text_table = torch.tensor(np.stack([profile(history[uid]) for uid in ids]), dtype=torch.float32)
    half_tables = []
    for h in (0, 1):
        rows = [profile(halves[uid][h]) if uid in halves else profile(history[uid]) for uid in ids]
        half_tables.append(torch.tensor(np.stack(rows), dtype=torch.float32))
    info = {"users": len(users), "train_users": len(train), "unseen_users": len(unseen), "seen_eval_users": len(seen_eval),
            "history_headlines_per_user": float(np.mean([len(history[u]) for u in ids])),
            "train_targets": sum(len(v) for v in train_t.values()), "eval_targets": sum(len(v) for v in eval_t.values()),
            "history_token_budget": history_token_budget, "skipped": skipped}
    behaviour = None
    try:
        enc = CoClickEncoder(dim=behaviour_dim).fit([u.clicked for u in train])
        behaviour = torch.tensor(enc.encode([u.clicked for u in train + unseen]), dtype=torch.float32)
        info["behaviour"] = {"dim": enc.dim, "news_ids": len(enc.item_ids),
                             "unseen_click_coverage": float(enc.coverage([u.clicked for u in unseen]).mean()) if unseen else None}
    except DataError as exc:
        log.warning("no behavioural profiles: %s", exc)
        info["behaviour"] = {"error": str(exc)}
    return PensTask(
        train_ids=[u.user_id for u in train], unseen_ids=[u.user_id for u in unseen],
        seen_eval_ids=[u.user_id for u in train if u.user_id in seen_eval], history=history,
        train_targets=train_t, eval_targets=eval_t,
        profile_text={uid: _truncate(tokenizer, history[uid], history_token_budget) for uid in ids},
        index=index, text_table=text_table, half_tables=(half_tables[0], half_tables[1]), behaviour_table=behaviour,
        info=info,
    )
