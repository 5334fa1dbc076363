"""E2P with a shared LoRA adapter (`e2p train --lora-rank R`) and its controls, trained alike.

One adapter for every user, trained jointly with the projector (e2p.lora; its tensors are the projector's), so per-user
storage stays one embedding. A gain over the plain recipe's controls could then come from the adapter alone, so the
controls get the same adapter training:
  shared_prefix     stage 1 trains the shared prefix and the adapter together (`shared_prefix/start/`); e2p starts from
                    it and trains the person part and the adapter; the control then *continues* stage 1 for as many steps
                    as e2p took (`shared_prefix/`), so it has had exactly as many adapter updates.
  shuffled_trained  the e2p stage again (same initial weights, steps, data order), trained on a derangement of
                    training users -> embedding rows (e2p.evaluate.scoring.derangement), scored with each user's own embedding:
                    the adapter and person part learnt without the person (`shuffled_trained/`; the evaluation's
                    shuffled condition where it exists).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from ..lora import find_targets, parse_targets
from ..projector import Projector
from ..evaluate.scoring import derangement
from .stages import Stage, Start

START = "start"  # shared_prefix/start/: the shared stage as the e2p stage started from it
SHUFFLED = "shuffled_trained"
ADAPTER_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "lora_modules")


def adapter_fields(backbone, cfg) -> dict:
    """The E2PConfig fields of the run's adapter: rank, alpha (default 2 x rank), targets and the layers they name."""
    targets = parse_targets(cfg.lora_targets)
    return {"lora_rank": cfg.lora_rank, "lora_alpha": float(cfg.lora_alpha or 2 * cfg.lora_rank), "lora_targets": targets,
            "lora_modules": find_targets(backbone.model, targets)}


def describe(fields: Mapping) -> str:
    if not fields.get("lora_rank"):
        return "no LoRA adapter"
    return (f"a rank-{fields['lora_rank']} LoRA adapter on {', '.join(fields['lora_targets'])} (alpha "
            f"{fields['lora_alpha']:g}, {len(fields['lora_modules'])} layers)")


def shared_source(shared_dir: str | Path) -> Path:
    """The folder --shared-from DIR means: a LoRA run's stage 1 (DIR/start), or DIR itself."""
    folder = Path(shared_dir)
    return folder / START if (folder / START / "config.json").is_file() else folder


def check_same_adapter(config, base: Mapping, shared_dir) -> None:
    """--shared-from: the reused shared prefix must have been trained with this run's adapter (or none, alike)."""
    theirs = {k: getattr(config, k) for k in ADAPTER_KEYS}
    ours = {k: base.get(k, theirs[k] if k != "lora_rank" else 0) for k in ADAPTER_KEYS}
    if not ours["lora_rank"]:
        ours = {"lora_rank": 0, "lora_alpha": 0.0, "lora_targets": [], "lora_modules": {}}
    same = theirs["lora_rank"] == ours["lora_rank"] == 0 or all(theirs[k] == ours[k] for k in ADAPTER_KEYS)
    if not same:
        raise ConfigError(f"--shared-from {shared_dir} was trained with {describe(theirs)}, and this run asks for "
                          f"{describe(ours)}: give the same --lora-rank and --lora-targets, or leave --shared-from out "
                          "to train the shared prefix (and its adapter) again")


def control_stages(start: Path, out_dir: Path, examples: Sequence, index: Mapping[str, int], table: torch.Tensor, cfg,
                   steps: int, e2p_start: Start) -> list[Stage]:
    """After the e2p stage (`steps` long): the shared control continued for as many steps (into `shared_prefix/`, from
    `start`) and the shuffled control trained alike (`shuffled_trained/`, from the e2p stage's initial projector,
    `e2p_start`, on a derangement of training users to embedding rows). Neither takes a share of the run's minutes."""
    users = sorted({ex.user for ex in examples})
    swap = derangement(users, cfg.seed)
    deranged = {u: index[users[j]] for u, j in zip(users, swap)}  # each training user trains on another's embedding
    return [Stage("shared_prefix_continued", Start(folder=start), out_dir / "shared_prefix", steps,
                  cfg.shared_lr, timed=False),
            Stage(SHUFFLED, e2p_start, out_dir / SHUFFLED, steps, cfg.e2p_lr, table, freeze_shared=cfg.freeze_shared,
                  contrastive=cfg.contrastive_weight, train_index=deranged, timed=False)]


def adapter_report(out_dir: Path, cfg, report: dict) -> dict:
    """The report's `adapter` entry once the controls are trained: the adapter's size, its updates, its controls."""
    steps = report["stages"]["e2p"]["steps"]
    first = report["stages"].get("shared_prefix", {}).get("steps")  # None when reused (--shared-from)
    trained = Projector.from_pretrained(out_dir)
    n = trained.lora.num_parameters()
    return {"rank": trained.config.lora_rank, "alpha": trained.config.lora_alpha, "targets": trained.config.lora_targets,
            "layers": len(trained.config.lora_modules), "parameters": n, "bytes_float32": 4 * n,
            "shared": "one adapter for every user, in the projector's adapter/ folder, PEFT's format (and one per control)",
            "per_user_storage": f"one embedding of {trained.config.embedding_dim} floats "
                                f"({4 * trained.config.embedding_dim} bytes in float32), as without the adapter",
            "lr": cfg.lora_lr,
            "controls": {
                "shared_prefix": {"folder": "shared_prefix", "started_from": f"shared_prefix/{START}",
                                  "stages": ["shared_prefix", "shared_prefix_continued"],
                                  "adapter_updates": None if first is None else first + steps},
                SHUFFLED: {"folder": SHUFFLED, "stages": [SHUFFLED], "adapter_updates": None if first is None else first + steps,
                           "embeddings": f"training users' examples with another training user's embedding "
                                         f"(e2p.evaluate.scoring.derangement, seed {cfg.seed}); scored with users' own"}},
            "e2p_adapter_updates": None if first is None else first + steps}
