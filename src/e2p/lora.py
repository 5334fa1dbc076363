"""LoRA on the backbone: the fine-tuning reference E2P is compared against (one adapter shared by every user,
the profile as text). Needs `peft` (``pip install 'e2p[research]'``); adapters are saved as safetensors."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from .model import E2PModel

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "v_proj")


def train_lora(backbone, rows, *, steps: int = 300, lr: float = 3e-4, rank: int = 8, batch_size: int = 16,
               seed: int = 0, minutes: float | None = None, out_dir: str | Path | None = None, progress: bool = False):
    """LoRA (rank `rank` on q_proj, v_proj) trained on formatted `rows` (loss on target tokens).

    Returns (peft model, info). The adapter is injected into `backbone.model` in place: call
    ``peft_model.unload()`` to restore the plain backbone. With `out_dir` the adapter is saved there
    (adapter_model.safetensors + adapter_config.json) for `e2p.evaluate.Condition(adapter=...)`."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
    torch.manual_seed(seed)
    peft_model = get_peft_model(backbone.model, lcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    model = E2PModel(backbone, None, training=True)
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    start, losses, step = time.time(), [], 0
    bar = tqdm(total=steps, desc="lora", disable=not progress, dynamic_ncols=True)
    for step in range(1, steps + 1):
        if minutes is not None and time.time() - start > minutes * 60:
            log.info("LoRA: time budget reached at step %d", step - 1)
            step -= 1
            break
        batch = [rows[i] for i in rng.choice(len(rows), size=min(batch_size, len(rows)), replace=False)]
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    n = sum(p.numel() for p in params)
    info = {"steps": step, "seconds": time.time() - start, "parameters": n, "adapter_bytes": n * 4, "rank": rank,
            "lr": lr, "final_loss": losses[-1] if losses else None}
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return peft_model, info
