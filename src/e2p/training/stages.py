"""A recipe's stages as data: each `Stage` says what trains (its initial projector, a `Start`), on which examples and
embedding rows, for how many steps and at which learning rate, and where it is saved. The recipe builds the list and
the stage runner runs it (`e2p.training.stage_runner.run_stage`); the shared adapter's controls hand back stages of
their own, never a function to call back. `planned_steps` counts a run's steps once, for
`--steps`, `--minutes` and DP.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Start:
    """How a stage's initial projector is made, as data (it is made when the stage runs, after the stages before):
    `projector` as it is; or loaded from `folder`; or new from `config` (after seeding torch with `seed`, where
    given). Then it takes the shared prefix of `shared_from` and the shared adapter of `adapter_from`, where given."""

    projector: Any = None  # a Projector
    folder: Path | None = None
    config: Any = None  # an E2PConfig
    seed: int | None = None
    shared_from: Any = None  # a Projector
    adapter_from: Any = None  # a Projector


@dataclass
class Stage:
    name: str
    start: Start
    folder: Path
    steps: int
    lr: float
    table: torch.Tensor | None = None  # the embedding rows its person part reads (None: no person, a shared prefix)
    freeze_shared: bool = False
    contrastive: float = 0.0
    train: Sequence | None = None  # its training examples (None: the run's)
    val: Sequence | None = None  # its validation examples (None: the run's)
    index: Mapping[str, int] | None = None  # user -> row of `table` (None: the run's table index)
    train_index: Mapping[str, int] | None = None  # the training examples' own rows (a control trained on other users')
    timed: bool = True  # takes its share of the run's minutes (a control matching another stage's steps: not)
    with_text: bool = False  # the profile text in the prompt (the text conditions, trained as hybrids)


def planned_steps(cfg, train_shared: bool = True, with_users: bool = True, text: bool = True) -> dict[str, int]:
    """The optimizer steps of every stage a run of `cfg` trains, by stage: the shared prefix (unless reused), e2p (and,
    with a shared adapter, its two controls, as many steps as e2p), the text stages."""
    steps = {"shared_prefix": cfg.shared_steps if train_shared else 0}
    if with_users:
        steps["e2p"] = cfg.e2p_steps
        if cfg.lora_rank:
            steps["shared_prefix_continued"] = steps["shuffled_trained"] = cfg.e2p_steps
    if text:
        steps["shared_prefix_text"] = steps["e2p_text"] = cfg.text_steps
    return steps
