"""LoRA on a frozen backbone: a low-rank update of chosen linear layers, W x + (alpha / r) B A x, made active per call.

One module serves the product and the research reference alike:
  * `e2p train --lora-rank R`: the projector carries one small adapter shared by every user (`Adapter`, the
    projector's `lora` parameters, saved beside it in `adapter/`, PEFT's folder format); `E2PModel` makes it active around each of its
    backbone calls (`active`), so per-user storage stays one embedding.
  * research/pens/train_lora.py: the LoRA-with-the-profile-as-text reference, saved in PEFT's folder format
    (`save_peft`, `load_peft`), scored by the evaluation loop's `Condition(adapter=...)`.

How: `attach(lm, names)` registers a forward hook on each target nn.Linear of the backbone, once (idempotent). A hook
adds nothing while no adapter is active, so the backbone's modules, weights and state_dict stay exactly as they were
(no wrapper replaces a module). `active(lm, adapter, rows)` makes one adapter's A [r, in] and B [out, r] the ones
those hooks add for the calls made inside it, optionally only for some rows of the batch (`rows`: [B] bool; a row
without a user gets the plain backbone, exactly). One adapter is active at a time per backbone; `active` holds the
backbone's lock, so two threads using one backbone take turns.
"""
from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .errors import BackboneMismatchError, ConfigError

DEFAULT_TARGETS = ("q_proj", "v_proj")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def parse_targets(text: str | Sequence[str]) -> list[str]:
    """'q_proj,v_proj' (or a list) -> ['q_proj', 'v_proj']: the last part(s) of linear layers' module names."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise ConfigError("--lora-targets names no layer: give comma-separated linear layer names (e.g. q_proj,v_proj)")
    return names


def module_key(name: str) -> str:
    """A module name as a parameter key ('model.layers.0.self_attn.q_proj' -> 'model__layers__0__self_attn__q_proj')."""
    return name.replace(".", "__")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(lm: nn.Module, targets: Iterable[str]) -> dict[str, list[int]]:
    """{module name: [out_features, in_features]} of every nn.Linear of `lm` whose name ends with a target (the
    output head excepted: it runs outside the decoder stack). Refuses a target that names nothing or a non-linear."""
    targets = list(targets)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    found: dict[str, list[int]] = {}
    linear_leaves: set[str] = set()
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            linear_leaves.add(name.rsplit(".", 1)[-1])
        if not name or not any(_matches(name, t) for t in targets) or module is head:
            continue
        if not isinstance(module, nn.Linear):
            continue  # e.g. a container named like a target; its linear children match on their own names
        found[name] = [module.out_features, module.in_features]
    missing = [t for t in targets if not any(_matches(n, t) for n in found)]
    if missing:
        raise ConfigError(f"no linear layer named {', '.join(missing)} in {type(lm).__name__}: --lora-targets takes "
                          f"names of its linear layers ({', '.join(sorted(linear_leaves)) or 'none'})")
    return found


def module_problems(lm: nn.Module, modules: Mapping[str, Sequence[int]]) -> list[str]:
    """What keeps an adapter made for `modules` ({name: [out, in]}) off `lm`: missing layers or other shapes."""
    named = dict(lm.named_modules())
    problems = []
    for name, shape in modules.items():
        m = named.get(name)
        if not isinstance(m, nn.Linear):
            problems.append(f"LoRA layer {name} {'is missing' if m is None else 'is not linear'}")
        elif [m.out_features, m.in_features] != list(shape):
            problems.append(f"LoRA layer {name} is {m.out_features}x{m.in_features}, the adapter's {shape[0]}x{shape[1]}")
    return problems


def check_modules(lm: nn.Module, modules: Mapping[str, Sequence[int]]) -> None:
    problems = module_problems(lm, modules)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BackboneMismatchError(f"this LoRA adapter does not fit {type(lm).__name__}: {'; '.join(problems[:3])}{more}: "
                                    "load it onto the backbone it was trained with")


class Adapter(nn.Module):
    """A [r, in] and B [out, r] for each target layer (A: kaiming-uniform, as PEFT; B: zero, so a new adapter changes
    nothing); the update is scale * B A x, scale = alpha / r. `targets`: {module name: [out, in]}."""

    def __init__(self, targets: Mapping[str, Sequence[int]], rank: int, alpha: float):
        super().__init__()
        if rank < 1 or not targets:
            raise ConfigError(f"a LoRA adapter needs rank >= 1 and at least one layer, got rank {rank} and {len(targets)} layers")
        self.targets = {name: [int(s) for s in shape] for name, shape in targets.items()}
        self.rank, self.alpha = int(rank), float(alpha)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name, (out_features, in_features) in self.targets.items():
            a = torch.empty(self.rank, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[module_key(name)] = nn.Parameter(a)
            self.B[module_key(name)] = nn.Parameter(torch.zeros(out_features, self.rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def pairs(self):
        """(module name, A, B) per target layer."""
        for name in self.targets:
            yield name, self.A[module_key(name)], self.B[module_key(name)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        return (f"LoRA rank {self.rank} on {', '.join(leaves)} ({len(self.targets)} layers, alpha {self.alpha:g}): "
                f"{self.num_parameters():,} parameters")


class _Slot:
    """The forward hook of one target layer: adds the active adapter's update (if any) to the layer's output."""

    __slots__ = ("state",)

    def __init__(self):
        self.state = None  # (A, B, scale, rows) or None

    def __call__(self, module, args, kwargs, output):
        state = self.state
        if state is None:
            return None
        A, B, scale, rows = state
        x = args[0] if args else kwargs["input"]
        delta = (F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * scale).to(output.dtype)
        if rows is None:
            return output + delta
        return torch.where(rows.view(-1, *([1] * (output.dim() - 1))), output + delta, output)


class _Registry:
    def __init__(self):
        self.slots: dict[str, _Slot] = {}
        self.handles: dict = {}
        self.lock = threading.RLock()


def _registry(lm: nn.Module, create: bool = True) -> _Registry | None:
    reg = lm.__dict__.get("_e2p_lora")
    if reg is None and create:
        reg = _Registry()
        lm.__dict__["_e2p_lora"] = reg
    return reg


def attach(lm: nn.Module, modules: Iterable[str] | Mapping[str, Sequence[int]]) -> None:
    """Hook the named linear layers of `lm` (once each; with shapes given, they are checked first)."""
    if isinstance(modules, Mapping):
        check_modules(lm, modules)
    reg = _registry(lm)
    todo = [n for n in modules if n not in reg.slots]
    if not todo:
        return
    named = dict(lm.named_modules())
    with reg.lock:
        for name in todo:
            if name not in named:
                raise BackboneMismatchError(f"no layer {name} in {type(lm).__name__} for the LoRA adapter")
            slot = _Slot()
            reg.handles[name] = named[name].register_forward_hook(slot, with_kwargs=True)
            reg.slots[name] = slot


def detach(lm: nn.Module) -> None:
    """Remove every hook `attach` put on `lm` (the backbone is then exactly as loaded)."""
    reg = _registry(lm, create=False)
    if reg is None:
        return
    with reg.lock:
        for handle in reg.handles.values():
            handle.remove()
        del lm.__dict__["_e2p_lora"]


def _set(reg: _Registry, adapter: Adapter | None, rows) -> None:
    for slot in reg.slots.values():
        slot.state = None
    if adapter is not None:
        for name, A, B in adapter.pairs():
            reg.slots[name].state = (A, B, adapter.scale, rows)


@contextmanager
def active(lm: nn.Module, adapter: Adapter | None, rows: torch.Tensor | None = None):
    """`adapter` (None: none) is what `lm`'s hooked layers add for the calls inside, for the rows where `rows` ([B]
    bool) is true (None: every row); whatever was active before is active again after."""
    reg = _registry(lm)
    if adapter is not None and any(name not in reg.slots for name in adapter.targets):
        attach(lm, adapter.targets)
    with reg.lock:
        before = {name: slot.state for name, slot in reg.slots.items()}
        _set(reg, adapter, rows)
        try:
            yield
        finally:
            for name, state in before.items():
                reg.slots[name].state = state


def activate(lm: nn.Module, adapter: Adapter | None) -> None:
    """Make `adapter` active for every call from now on (None: none), until the next `activate` (research use)."""
    reg = _registry(lm)
    if adapter is not None and any(name not in reg.slots for name in adapter.targets):
        attach(lm, adapter.targets)
    with reg.lock:
        _set(reg, adapter, None)


# --- PEFT's folder format (the research reference's files, and any PEFT LoRA of q/k/v/o-like layers) --------------
def save_peft(adapter: Adapter, folder: str | Path, base_model: str = "") -> None:
    """adapter_model.safetensors + adapter_config.json as PEFT writes them (PeftModel.from_pretrained reads them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, A, B in adapter.pairs():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapter.targets}), "inference_mode": True,
              "base_model_name_or_path": base_model, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))


def load_peft(folder: str | Path, lm: nn.Module | None = None) -> Adapter:
    """A PEFT LoRA folder as an Adapter (checked against `lm` when given). Plain LoRA only: DoRA, rsLoRA, trained
    biases, per-layer ranks and extra trained modules are refused by name."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file() or not (folder / PEFT_WEIGHTS).is_file():
        raise ConfigError(f"{folder} is not a LoRA adapter folder (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    config = json.loads((folder / PEFT_CONFIG).read_text())
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "rank_pattern",
                               "alpha_pattern") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise ConfigError(f"{folder}: only plain LoRA adapters are supported (found {config.get('peft_type')}, bias "
                          f"{config.get('bias')!r}{', ' + ', '.join(unsupported) if unsupported else ''})")
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    a = {k[len(_PEFT_PREFIX):-len(".lora_A.weight")]: v for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    b = {k[len(_PEFT_PREFIX):-len(".lora_B.weight")]: v for k, v in tensors.items() if k.endswith(".lora_B.weight")}
    if not a or set(a) != set(b) or len(a) + len(b) != len(tensors):
        raise ConfigError(f"{folder / PEFT_WEIGHTS} holds other tensors than LoRA A/B pairs: restore the adapter")
    rank = int(config.get("r", next(iter(a.values())).shape[0]))
    adapter = Adapter({name: [b[name].shape[0], a[name].shape[1]] for name in a}, rank, float(config.get("lora_alpha", rank)))
    if lm is not None:
        check_modules(lm, adapter.targets)
    with torch.no_grad():
        for name, A, B in adapter.pairs():
            A.copy_(a[name])
            B.copy_(b[name])
    return adapter
