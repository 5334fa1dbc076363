"""The training loop: only the projector learns; progress bar, validation, best checkpoint, resume, curves."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import load_optimizer, save_optimizer
from ..model import E2PModel
from .privacy import DPPlan, PrivacyError, sample_users
from ..projector import Projector
from ..evaluate.scoring import Item, derangement, evaluate_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 300
    minutes: float | None = None  # stop earlier when this much wall time is spent
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    eval_every: int = 50
    seed: int = 0
    contrastive_weight: float = 0.0  # weight of the margin term (own person vs another person)
    margin: float = 0.1  # nats per token the own embedding must beat another person's by
    freeze_shared: bool = False  # keep the shared (style) prefix fixed, learn only the person part
    dp: DPPlan | None = None  # DP-SGD per user (e2p.training.privacy): sampled users, each user's gradient clipped, noise
    lora_lr: float | None = None  # the projector's shared LoRA adapter's learning rate (None: `lr`, like the rest)


Objective = Callable[[E2PModel, Sequence[Item], "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]


def nll_objective(model: E2PModel, items: Sequence[Item], embeddings: torch.Tensor | None):
    """The product's loss: per row, the summed NLL of its target tokens and the number of target tokens."""
    return model.loss([it.row for it in items], embeddings, reduction="none")


def train_projector(model: E2PModel, items: Sequence[Item], table: torch.Tensor | None, out_dir: str | Path,
                    cfg: TrainConfig, val_items: Sequence[Item] = (), resume: bool = False,
                    progress: bool = True, name: str = "train",
                    on_step: Callable[[int, float], None] | None = None, objective: Objective | None = None,
                    item_users: Sequence | None = None) -> dict:
    """Train `model.projector` on `items`; write the best projector to `out_dir` and a resumable
    checkpoint to `out_dir/checkpoint`. Returns the history (also saved as curves.json / curves.png).

    `objective(model, items, embeddings) -> (per-row summed loss, per-row target-token count)`: what each step
    minimises, as the summed loss over all target tokens of the global batch divided by their count (default
    `nll_objective`, the product's loss). `items` are this process's rows of the batch, the Items given here (a
    research objective may read fields of its own Item subclass), `embeddings` their users' rows of `table`.
    Validation always scores the NLL. With `cfg.contrastive_weight`, the margin compares the objective's own
    per-row sums with the NLL under another user's embedding.

    With `cfg.dp` (a `e2p.training.privacy.DPPlan`) each step is a DP-SGD step per user instead: `item_users` (each item's
    user) groups the items; users are Poisson-sampled, each sampled user's gradient (its mean per-token loss over at
    most `examples_per_user` of its items) is computed alone, and Opacus's DPOptimizer clips each to
    `max_grad_norm`, adds the calibrated Gaussian noise and averages. The training loss is then not recorded (it is
    a statistic of training users outside the guarantee); validation losses are on validation users."""
    from tqdm.auto import tqdm

    objective = objective or nll_objective
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    rank, world = _rank_world()
    progress = progress and rank == 0
    projector: Projector = model.projector
    if cfg.freeze_shared:
        projector.shared.requires_grad_(False)
    params = [p for p in projector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(projector, params, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dp_opt, by_user = None, None
    if cfg.dp is not None:
        dp_opt, by_user = _dp_setup(cfg, optimizer, items, item_users, world)
    schedule = lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / max(cfg.steps, 1), 1.0)))
    state = {"step": 0, "elapsed_s": 0.0, "best_val": None, "history": {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "val_shuffled": []}}
    if resume and (ckpt / "trainer_state.json").is_file():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        projector.load_state_dict(Projector.from_pretrained(ckpt).state_dict())
        load_optimizer(optimizer, ckpt / "optimizer.safetensors")
        log.info("resumed %s at step %d", name, state["step"])
    hist = state["history"]
    n = len(items)
    rng_epoch = lambda epoch: np.random.default_rng([cfg.seed, epoch]).permutation(n)
    start = time.time() - state["elapsed_s"]
    projector.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=name, disable=not progress, dynamic_ncols=True)

    def validate(step: int) -> None:
        if not val_items or rank != 0:  # only rank 0 validates and writes
            return
        val = evaluate_loss(model, val_items, table, cfg.batch_size)
        shuf = evaluate_loss(model, val_items, table, cfg.batch_size, shuffle_people=True) if table is not None else val
        hist["val_step"].append(step)
        hist["val_loss"].append(val)
        hist["val_shuffled"].append(shuf)
        bar.write(f"[{name}] step {step}: val loss {val:.4f}" + (f", shuffled {shuf:.4f}" if table is not None else ""))
        if state["best_val"] is None or val < state["best_val"]:
            state["best_val"] = val
            if rank == 0:
                projector.save_pretrained(out_dir)

    if state["step"] == 0:
        validate(0)  # the starting point counts: a stage never ends worse than it began on validation
    while state["step"] < cfg.steps:
        if cfg.minutes is not None and _rank0_says(time.time() - start > cfg.minutes * 60, world):
            bar.write(f"[{name}] time budget of {cfg.minutes} min reached at step {state['step']}")
            break
        step = state["step"]
        for g in optimizer.param_groups:
            g["lr"] = g.get("base_lr", cfg.lr) * schedule(step)
        if dp_opt is not None:  # the training loss is a statistic of training users: not recorded under DP
            _dp_step(model, items, table, by_user, params, dp_opt, cfg.dp, step, objective)
        else:
            epoch, offset = divmod(step * cfg.batch_size, n)
            order = rng_epoch(epoch)
            batch = [items[order[(offset + j) % n]] for j in range(cfg.batch_size)]
            torch.manual_seed(cfg.seed * 100003 + step)
            loss = _sgd_step(model, batch, table, params, optimizer, cfg, step, rank, world, objective)
            hist["step"].append(step + 1)
            hist["train_loss"].append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
        state["step"] = step + 1
        bar.update(1)
        if on_step:
            on_step(step + 1, float("nan") if dp_opt is not None else loss)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            validate(step + 1)
            state["elapsed_s"] = time.time() - start
            if rank == 0:
                _save_checkpoint(projector, optimizer, state, ckpt)
    bar.close()
    if not hist["val_step"] or hist["val_step"][-1] != state["step"]:
        validate(state["step"])
    state["elapsed_s"] = time.time() - start
    if rank == 0:
        if not val_items:
            projector.save_pretrained(out_dir)
        _save_checkpoint(projector, optimizer, state, ckpt)
        save_curves(hist, out_dir, name, asdict(cfg))
    _barrier(world)
    if world > 1:  # only rank 0 validated: give every rank its best_val, so all return the same state
        best = torch.tensor(float("nan") if state["best_val"] is None else state["best_val"], dtype=torch.float64)
        torch.distributed.broadcast(best, 0)
        state["best_val"] = None if math.isnan(float(best)) else float(best)
    return state


def _sgd_step(model: E2PModel, batch: list[Item], table, params, optimizer, cfg: TrainConfig, step: int, rank: int,
              world: int, objective: Objective) -> float:
    """One optimizer step on the global `batch` (this process's rows of it): the objective over all target tokens,
    plus the contrastive margin; gradients summed across processes. -> the step's loss."""
    emb = None if table is None else table[torch.tensor([it.person for it in batch])]
    other = None
    if cfg.contrastive_weight > 0 and emb is not None:  # another user's embedding, by the shuffled control's rule
        other = emb[derangement([it.person for it in batch], step)]
    mine = slice(rank, None, world)  # data parallel: this process's rows of the global batch
    emb = emb[mine] if emb is not None else None
    own_s, own_c = objective(model, batch[mine], emb)
    loss = own_s.sum() / _all_sum(own_c.sum().float(), world)
    if other is not None:
        shuf_s, _ = model.loss([it.row for it in batch[mine]], other[mine], reduction="none")
        gap = (shuf_s - own_s) / own_c
        loss = loss + cfg.contrastive_weight * torch.relu(cfg.margin - gap).sum() / cfg.batch_size
    optimizer.zero_grad(set_to_none=True)
    with model.adapter():  # gradient checkpointing recomputes the backbone's layers here: with the shared adapter
        loss.backward()
    if world > 1:
        for p in params:
            torch.distributed.all_reduce(p.grad)
        loss = _all_sum(loss.detach(), world)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(loss.detach())


def _param_groups(projector: Projector, params: list, cfg: TrainConfig):
    """The optimizer's parameters: one group, or with `cfg.lora_lr` the shared adapter's in a group of its own (each
    group's `base_lr` follows the one schedule)."""
    if cfg.lora_lr is None or projector.lora is None:
        return params
    mine = {id(p) for p in projector.lora.parameters()}
    groups = [{"params": [p for p in params if id(p) not in mine], "base_lr": cfg.lr},
              {"params": [p for p in params if id(p) in mine], "lr": cfg.lora_lr, "base_lr": cfg.lora_lr}]
    return [g for g in groups if g["params"]]


def _dp_setup(cfg: TrainConfig, optimizer, items: Sequence[Item], item_users: Sequence | None, world: int):
    """Opacus's DPOptimizer around `optimizer`, and the items' indices grouped by user (sorted user order)."""
    from opacus.optimizers import DPOptimizer

    if world > 1:
        raise PrivacyError("--dp-epsilon trains in one process: run it without torchrun / accelerate launch")
    if cfg.contrastive_weight > 0:
        raise PrivacyError("the contrastive margin mixes two users' data in one gradient, which per-user clipping "
                           "cannot bound: train with contrastive_weight 0 under --dp-epsilon")
    if item_users is None or len(item_users) != len(items):
        raise PrivacyError("DP training needs each item's user (item_users) to sample and clip per user")
    groups: dict = {}
    for i, u in enumerate(item_users):
        groups.setdefault(u, []).append(i)
    by_user = [groups[u] for u in sorted(groups)]
    dp = cfg.dp
    dp_opt = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                         expected_batch_size=max(dp.expected_users, 1e-9), loss_reduction="mean",
                         generator=torch.Generator().manual_seed(dp.seed * 1000003 + cfg.seed))
    return dp_opt, by_user


def _dp_step(model: E2PModel, items: Sequence[Item], table: torch.Tensor | None, by_user: list[list[int]], params, dp_opt, dp: DPPlan,
             step: int, objective: Objective) -> None:
    """One DP-SGD step: Poisson-sampled users, one gradient per user (their mean per-token loss over at most
    `examples_per_user` of their items), handed to Opacus as per-sample gradients to clip, noise and average."""
    picked = sample_users(len(by_user), dp.sample_rate, dp.seed, step)
    rng = np.random.default_rng([dp.seed, 104729, step])
    per_user: list[list[torch.Tensor]] = []
    torch.manual_seed(dp.seed * 100003 + step)
    for u in picked:
        rows = by_user[u]
        rows = list(rng.choice(rows, dp.examples_per_user, replace=False)) if len(rows) > dp.examples_per_user else rows
        batch = [items[i] for i in rows]
        emb = None if table is None else table[torch.tensor([it.person for it in batch])]
        s, c = objective(model, batch, emb)
        loss = s.sum() / c.sum().clamp_min(1).float()
        with model.adapter():  # as in _sgd_step: a recomputed layer sees the adapter it was run with
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        per_user.append([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)])
    for j, p in enumerate(params):  # [users, *shape]; an empty step still adds the noise
        p.grad_sample = torch.stack([g[j] for g in per_user]) if per_user else torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    dp_opt.step()
    dp_opt.zero_grad(set_to_none=True)


def _rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def _rank0_says(flag: bool, world: int) -> bool:
    """Rank 0's decision for every rank: ranks stopping at different steps would hang in all_reduce."""
    if world <= 1:
        return flag
    x = torch.tensor(1.0 if flag else 0.0)
    torch.distributed.broadcast(x, 0)
    return bool(x.item())


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _save_checkpoint(projector: Projector, optimizer, state: dict, ckpt: Path) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    projector.save_pretrained(ckpt)
    save_optimizer(optimizer, ckpt / "optimizer.safetensors")
    tmp = ckpt / "trainer_state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(ckpt / "trainer_state.json")


def save_curves(hist: dict, out_dir: Path, name: str, cfg: dict) -> None:
    """Loss curves as JSON and as a PNG plot."""
    (out_dir / "curves.json").write_text(json.dumps({"name": name, "config": cfg, **hist}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if hist["step"]:
        losses = np.array(hist["train_loss"])
        w = max(1, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(hist["step"][w - 1:], smooth, label="train (smoothed)")
    if hist["val_step"]:
        ax.plot(hist["val_step"], hist["val_loss"], "o-", label="val")
        if any(a != b for a, b in zip(hist["val_loss"], hist["val_shuffled"])):
            ax.plot(hist["val_step"], hist["val_shuffled"], "s--", label="val, other people's embeddings")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
