"""Per-row losses of formatted rows: the one scoring loop behind validation during training and every condition
of the evaluation loop (so evaluation needs nothing from training)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .model import E2PModel, Segments


@dataclass
class Item:
    """One training item: a formatted row and the index of its person's embedding (-1: none)."""

    row: Segments
    person: int
    teacher_row: Segments | None = None  # the same example as the teacher sees it (e.g. with the persona text)


def batch_embeddings(items: Sequence[Item], table: torch.Tensor | None):
    if table is None:
        return None
    return table[torch.tensor([it.person for it in items])]


def shuffled_people(people: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Another person's index for every row (a derangement over distinct people where possible)."""
    n = len(people)
    perm = torch.randperm(n, generator=generator)
    same = people[perm] == people
    if same.any() and n > 1:
        perm[same] = perm.roll(1)[same]
    return perm


def row_losses(model: E2PModel, items: Sequence[Item], table: torch.Tensor | None, batch_size: int = 16,
               shuffle_people: bool = False, seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-item summed NLL and target-token counts, in eval mode (optionally with another person's embedding
    per row): the one scoring loop behind validation during training and every condition of `e2p eval`."""
    nll, cnt = [], []
    gen = torch.Generator().manual_seed(seed)
    was_training = model.projector.training if model.projector is not None else False
    if model.projector is not None:
        model.projector.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                emb = batch_embeddings(chunk, table)
                if shuffle_people and emb is not None:
                    emb = emb[shuffled_people(torch.tensor([it.person for it in chunk]), gen)]
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


def evaluate_loss(model: E2PModel, items: Sequence[Item], table: torch.Tensor | None, batch_size: int = 16,
                  shuffle_people: bool = False, seed: int = 0) -> float:
    """Token-level mean NLL over `items` (optionally with another person's embedding per row)."""
    nll, cnt = row_losses(model, items, table, batch_size, shuffle_people, seed)
    return float(nll.sum()) / max(int(cnt.sum()), 1)
