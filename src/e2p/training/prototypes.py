"""Prototype mixing: a new user's prefix as a similarity-weighted mix of training users' own learned prefixes.

Why: with tens of training users an MLP from embedding to prefix has little to learn its map from, while each
training user's *own* free prefix (per-user prompt tuning) is easy to learn from their own examples. A new user
then borrows from the training users whose embeddings are like theirs; the temperature (how sharply it borrows)
and the person scale are set on validation users. Stored per user: still only the embedding; the projector holds
the training users' (centred, unit) embeddings and their person parts, so it is as private as its training users'
embeddings are (docs/privacy.md).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.contract import Example, UserTable
from .distributed import is_main_process
from ..errors import DataError
from ..model import new_config
from ..projector import Projector, unit_rows
from .stages import Stage, Start


TEMPERATURES = (0.02, 0.05, 0.1, 0.2, 0.5)  # the grid calibration picks from (with the person scales)


def split_own_examples(examples: Sequence[Example], held_fraction: float, seed: int) -> tuple[list, list]:
    """(fit, held) of each training user's own examples: the per-user prefixes pick their checkpoint on held-out
    examples of the same users (validation users have no prefix of their own to validate)."""
    by_user: dict[str, list[Example]] = {}
    for ex in examples:
        by_user.setdefault(ex.user, []).append(ex)
    rng = random.Random(seed)
    fit, held = [], []
    for user in sorted(by_user):
        mine = list(by_user[user])
        rng.shuffle(mine)
        n_held = int(len(mine) * held_fraction) if len(mine) > 2 else 0
        held += mine[:n_held]
        fit += mine[n_held:]
    rng.shuffle(fit)
    return fit, held


def prototype_stage(backbone, examples: Sequence[Example], users: UserTable, shared: Projector, out_dir: Path,
                    base: dict, cfg) -> tuple[Stage, UserTable]:
    """The stage that learns each training user's own person part: a one-hot user id through an MLP on top of the frozen
    shared prefix, on each user's own examples (a tenth held out to pick the checkpoint). -> (stage, the one-hot table)."""
    ids = sorted({ex.user for ex in examples})
    missing = [u for u in ids if u not in users.index]
    if missing:
        raise DataError(f"{len(missing)} training users have no embedding (e.g. {missing[:3]})")
    onehot = UserTable(ids, np.eye(len(ids), dtype=np.float32), "one-hot training user ids")
    fit, held = split_own_examples(examples, 0.1, cfg.seed)

    start = Start(config=new_config(backbone, embedding_dim=len(ids), embedding_mean=None, **base), shared_from=shared)
    return Stage("prototypes", start, out_dir / "prototypes", cfg.e2p_steps, cfg.e2p_lr, onehot.tensor(),
                 freeze_shared=True, train=fit, val=held, index=onehot.index), onehot


def save_prototypes(backbone, own: Projector, onehot: UserTable, users: UserTable, shared: Projector, out_dir: Path,
                    base: dict, mean: torch.Tensor | None) -> Projector:
    """The prototype projector saved to `out_dir`: keys are the training users' centred unit embeddings, values their
    own person parts (the trained `own`)."""
    ids = onehot.ids
    own.eval()
    with torch.no_grad():
        values = (own(onehot.tensor()) - own.shared.unsqueeze(0)).reshape(len(ids), -1)
        table = users.subset(ids).tensor()
        keys = unit_rows(table - (mean if mean is not None else torch.zeros(table.shape[1])))
    mixed = Projector(new_config(backbone, embedding_dim=users.dim, prototypes=len(ids),
                                 embedding_mean=mean.tolist() if mean is not None else None, **base))
    mixed.shared.data.copy_(shared.shared.data)
    mixed.prototype_keys.copy_(keys)
    mixed.prototype_values.copy_(values)
    if is_main_process():
        mixed.save_pretrained(out_dir)
    return mixed
