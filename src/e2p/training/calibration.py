"""Calibration on validation users: set a trained projector's free settings (the person share) to the grid point with the lowest loss on people never trained on. One grid search serves every
projector kind; scale 0 (the shared prefix) is always a candidate, so calibration can only move E2P toward its
control, never past it."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..model import E2PModel
from ..projector import Projector
from ..evaluate.scoring import Item, evaluate_loss

log = logging.getLogger(__name__)


def calibrate_grid(backbone, projector: Projector, items: list[Item], table: torch.Tensor,
                   grid: Sequence[dict]) -> tuple[dict, dict[str, float]]:
    """Try each point of `grid` ({config field: value}) on `items`; leave projector.config at the best (the first
    of equals). -> (best point, {label: validation loss}), labels the values joined by "/" in the points' order."""
    if not grid:
        raise ValueError("calibrate_grid needs at least one grid point")
    model = E2PModel(backbone, projector)
    losses: dict[str, float] = {}
    best, best_loss = grid[0], float("inf")
    for point in grid:
        for name, value in point.items():
            setattr(projector.config, name, value)
        loss = evaluate_loss(model, items, table)
        losses["/".join(str(v) for v in point.values())] = loss
        if loss < best_loss:
            best, best_loss = point, loss
    for name, value in best.items():
        setattr(projector.config, name, value)
    log.info("calibrated %s (validation loss %.4f)", best, best_loss)
    return best, losses


def calibrate_person_scale(backbone, projector: Projector, items: list[Item], table: torch.Tensor,
                           scales: Sequence[float]) -> dict:
    """Set projector.config.person_scale to the scale with the lowest loss on `items` (validation people)."""
    best, losses = calibrate_grid(backbone, projector, items, table,
                                  [{"person_scale": s} for s in sorted({0.0, *scales})])
    return {"chosen": best["person_scale"], "validation_loss": losses, "items": len(items)}
