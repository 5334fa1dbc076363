"""`RecipeConfig`: what a user of `e2p train` sets, checked at construction (the one place that refuses combinations
the recipe cannot train), and read from a recipe file (`recipe.json`, as every run writes it: `e2p train --recipe`)."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..config import read_json_object
from ..errors import ConfigError, DataError
from .privacy import PrivacyError


@dataclass
class RecipeConfig:
    """What a user of `e2p train` sets. (The persona experiments' own knobs are in research/persona/recipe.py.)"""

    injection: str = "deep"
    num_prefix_tokens: int = 1
    prefix_position: str = "start"
    hidden_dims: list[int] = field(default_factory=lambda: [1024])  # []: a linear person map
    dropout: float = 0.1
    center_embeddings: bool = True
    history_turns: int = 2
    max_target_tokens: int = 32
    batch_size: int = 16
    shared_steps: int = 80
    shared_lr: float = 3e-3
    e2p_steps: int = 100
    e2p_lr: float = 1e-3
    contrastive_weight: float = 0.0
    margin: float = 0.1
    freeze_shared: bool = True
    embedding_slots: int = 1  # > 1: the embedding is that many blocks, one prefix token each (k = slots)
    set_items: int = 0  # > 0: a set profile of that many item vectors, pooled by attention (`e2p data pens --profile-set`)
    max_train_users: int | None = None  # train on at most this many of the training users (learning curves)
    text_steps: int = 0  # steps for each of shared_prefix_text and e2p_text (0: skip them)
    val_examples: int = 48
    person_scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # calibrated on validation
    eval_every: int = 20
    seed: int = 0
    dp_epsilon: float | None = None  # DP-SGD per user (e2p.training.privacy): the target epsilon over the whole run
    dp_delta: float | None = None  # default 1 / (10 x training users); must be below 1 / training users
    dp_max_grad_norm: float = 1.0  # C: each sampled user's gradient is clipped to this norm
    dp_examples_per_user: int = 4  # at most this many of a sampled user's examples make its gradient in a step
    lora_rank: int = 0  # > 0: one shared LoRA adapter of this rank trained with the projector (e2p.training.lora_controls)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # the backbone's linear layers
    lora_alpha: float | None = None  # default 2 x rank (the update's scale alpha / rank is then 2)
    lora_lr: float = 3e-4  # the adapter's learning rate in every stage (the prefix and person part keep theirs)

    def __post_init__(self):
        self.check()

    @classmethod
    def load(cls, path: str | Path) -> "RecipeConfig":
        """A recipe file (`recipe.json`, as every run writes it, or by hand with only the fields to change): unknown
        fields and bad values are refused with the file and the field named."""
        data = read_json_object(path, "recipe file", "give a recipe.json a run wrote, or write one with the fields to "
                                                     "change (e.g. {\"hidden_dims\": []})")
        known = {f.name for f in fields(cls)}
        _drop_removed(data, path)
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"recipe file {path}: unknown field(s) {', '.join(unknown)}; the fields are "
                            f"{', '.join(sorted(known))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise DataError(f"recipe file {path}: {exc}") from None

    def check(self) -> None:
        """Refuse, by name and before anything loads, the combinations the recipe cannot train."""
        if self.dp_examples_per_user < 1:
            raise PrivacyError(f"--dp-examples-per-user {self.dp_examples_per_user}: give 1 or more (default 4)")
        if self.dp_epsilon is not None and (self.contrastive_weight > 0 or self.text_steps > 0):
            raise PrivacyError("--dp-epsilon covers the shared_prefix and e2p stages only: train without "
                               "--text-steps and with contrastive_weight 0")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be >= 0 (0: no adapter), got {self.lora_rank}")
        if self.lora_rank and self.dp_epsilon is not None:
            raise PrivacyError("--lora-rank is not supported under --dp-epsilon: its shuffled control trains one "
                               "user's examples with another user's embedding, so one user's data enters two users' "
                               "clipped gradients, which the per-user guarantee does not cover. Train without one of "
                               "the two")


# research knobs: they live in `e2p train --recipe FILE` (the recipe.json a run writes); the flags still work, with a
# warning, for one release. flag dest -> RecipeConfig field
RESEARCH_FLAGS = {"hidden_dims": "hidden_dims", "dropout": "dropout",
                  "embedding_slots": "embedding_slots", "max_train_users": "max_train_users",
                  "lora_targets": "lora_targets", "lora_lr": "lora_lr", "prefix_position": "prefix_position",
                  "text_steps": "text_steps", "val_examples": "val_examples"}
PRODUCT_FLAGS = {"injection": "injection", "prefix_tokens": "num_prefix_tokens", "batch_size": "batch_size",
                 "seed": "seed", "lora_rank": "lora_rank"}


def _drop_removed(data: dict, where) -> None:
    """Fields of removed study variants in older recipe files: the default value is dropped (a run of an older
    release wrote it), anything else refused with what to do."""
    person_map = data.pop("person_map", "mlp")
    if person_map != "mlp":
        raise DataError(f"{where}: person_map {person_map!r}: prototype mixing lost its study (docs/studies.md) and "
                        "was removed; leave person_map out (the person MLP)")


def recipe_from_args(args, **overrides):
    """The RecipeConfig a command trains with: `--recipe FILE` (or the defaults), then the research flags given
    (deprecated), then the product flags given, then `overrides` that are not None; `--steps` scales the stages."""
    values = asdict(RecipeConfig.load(args.recipe)) if getattr(args, "recipe", None) else {}
    if getattr(args, "person_map", None) is not None:
        _drop_removed({"person_map": args.person_map}, "--person-map")
        print("warning: --person-map goes in the next release: the person MLP is the only person map",
              file=sys.stderr)
    for dest, name in RESEARCH_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        print(f"warning: {flag} moves into the recipe file: put \"{name}\" in a recipe.json and pass --recipe FILE "
              "(the flag goes in the next release)", file=sys.stderr)
        values[name] = (hidden_dims_of(value) if dest == "hidden_dims" else value.split(",") if dest == "lora_targets"
                        else value)
    for dest, name in PRODUCT_FLAGS.items():
        if getattr(args, dest, None) is not None:
            values[name] = getattr(args, dest)
    slots = values.get("embedding_slots", 1)
    if slots > 1:
        if getattr(args, "prefix_tokens", None) not in (None, 1, slots):
            raise DataError(f"embedding_slots {slots} gives one prefix token per slot: leave --prefix-tokens out")
        values["num_prefix_tokens"] = slots
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RecipeConfig(**values)
    if args.steps is not None:  # --steps N: total over the stages that run, keeping the recipe's proportions
        from .stages import planned_steps

        train_shared = not getattr(args, "shared_from", None)
        stages = ["shared_steps", "e2p_steps"] if train_shared else ["e2p_steps"]
        scale = args.steps / max(sum(planned_steps(cfg, train_shared).values()), 1)
        for s in stages + ["text_steps"]:
            value = getattr(cfg, s)
            setattr(cfg, s, max(1, round(value * scale)) if value else 0)
        cfg.eval_every = max(1, min(cfg.eval_every, cfg.e2p_steps // 2 or 1))
    return cfg


def hidden_dims_of(text: str) -> list[int]:
    """'1024' -> [1024]; '512,512' -> [512, 512]; '' or 'linear' -> [] (a linear person map)."""
    if text.strip().lower() in ("", "linear", "none"):
        return []
    try:
        dims = [int(x) for x in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise DataError(f"--hidden-dims {text!r}: give comma-separated positive sizes (e.g. 1024) or 'linear'")
    return dims


def with_set_items_of(users, cfg: RecipeConfig) -> RecipeConfig:
    """A users table of set profiles (its rule beside it has set_items, `e2p data pens --profile-set`) trains a set
    projector without a recipe saying so; a recipe that says otherwise is refused."""
    from ..data.live_profile import ProfileRule, rule_path

    beside = rule_path(users.source) if getattr(users, "source", None) else None
    if beside is None or not beside.is_file():
        return cfg
    items = ProfileRule.load(beside).set_items or 0
    if items and cfg.set_items not in (0, items):
        raise DataError(f"{users.source} holds sets of {items} items, the recipe says set_items {cfg.set_items}")
    return replace(cfg, set_items=items) if items and not cfg.set_items else cfg
