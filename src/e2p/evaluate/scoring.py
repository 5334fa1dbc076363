"""Per-row losses of formatted rows: the one scoring loop behind validation during training and every condition
of the evaluation loop (so evaluation needs nothing from training), and the one rule for the shuffled control
(`derangement`): the shuffled figure of a training curve is the shuffled figure of `e2p eval` on the same rows."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..engines.base import Engine

from ..formatting import Segments


@dataclass
class Item:
    """One training item: a formatted row and the index of its person's embedding (-1: none)."""

    row: Segments
    person: int


def batch_embeddings(items: Sequence[Item], table: torch.Tensor | None):
    if table is None:
        return None
    return table[torch.tensor([it.person for it in items])]


def derangement(people: Sequence, seed: int) -> list[int]:
    """For each row, the index of a row of a *different* person (fixed by the seed; a row whose person is every
    row's keeps another row of its own person only when no other person exists).

    The one rule for drawing another user: the shuffled condition of `e2p eval` (over user ids) and the shuffled
    validation figure of a training curve (over embedding-table rows) both draw with it, so the same rows and seed
    give the same figure."""
    rng = random.Random(seed)
    n = len(people)
    order = list(range(n))
    rng.shuffle(order)
    target = order[1:] + order[:1]  # cycle over a random order
    out = [0] * n
    for a, b in zip(order, target):
        out[a] = b
    for i in range(n):  # fix rows that landed on the same person
        if people[out[i]] == people[i]:
            for j in rng.sample(range(n), n):
                if people[j] != people[i]:
                    out[i] = j
                    break
    return out


def shuffled(items: Sequence[Item], seed: int = 0) -> list[Item]:
    """The same rows, each with another person's embedding index (`derangement`): the shuffled control."""
    people = [it.person for it in items]
    return [Item(it.row, people[j]) for it, j in zip(items, derangement(people, seed))]


def row_losses(model: Engine, items: Sequence[Item], table: torch.Tensor | None, batch_size: int = 16,
               shuffle_people: bool = False, seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-item summed NLL and target-token counts, in eval mode (optionally with another person's embedding
    per row, drawn by `derangement` with `seed`): the one scoring loop behind validation during training and every
    condition of `e2p eval`."""
    if shuffle_people and table is not None:
        items = shuffled(items, seed)
    nll, cnt = [], []
    was_training = model.projector.training if model.projector is not None else False
    if model.projector is not None:
        model.projector.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                emb = batch_embeddings(chunk, table)
                s, c = model.loss([it.row for it in chunk], emb, reduction="none")
                nll.append(s.cpu().numpy())  # the result leaves for the statistics (intervals over users)
                cnt.append(c.cpu().numpy())
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        if model.projector is not None:
            model.projector.train(was_training)
    if not nll:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(nll), np.concatenate(cnt)


def evaluate_loss(model: Engine, items: Sequence[Item], table: torch.Tensor | None, batch_size: int = 16,
                  shuffle_people: bool = False, seed: int = 0) -> float:
    """Token-level mean NLL over `items` (optionally with another person's embedding per row)."""
    nll, cnt = row_losses(model, items, table, batch_size, shuffle_people, seed)
    return float(nll.sum()) / max(int(cnt.sum()), 1)
