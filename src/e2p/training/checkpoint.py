"""Resumable training state in safe formats: optimizer tensors as safetensors, the rest as JSON."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {}
    for idx, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(state["param_groups"]))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        groups = json.loads(path.with_suffix(".json").read_text())
    except Exception as exc:  # corrupt or partial checkpoint
        raise ConfigError(f"cannot resume from {path} ({exc}); delete the checkpoint folder to start over") from exc
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
