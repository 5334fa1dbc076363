"""Cost per user: E2P stores one embedding per user; a per-user LoRA stores adapter weights per user.

E2P per user: embedding_dim x 4 bytes (float32). Shared by all users: one projector (input or deep).
LoRA per user: rank 8 on q_proj and v_proj of every layer, counted by formula from the model config
and, where peft can build it on the meta device (no memory), checked with peft.
"""
from __future__ import annotations

import torch

from common import Context, make_projector


def lora_params_formula(cfg, rank: int = 8) -> int:
    """r x (in + out) per adapted Linear; q: hidden -> heads*head_dim, v: hidden -> kv_heads*head_dim."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_out = cfg.num_attention_heads * head_dim
    v_out = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim
    return cfg.num_hidden_layers * rank * ((cfg.hidden_size + q_out) + (cfg.hidden_size + v_out))


def lora_params_peft(cfg, rank: int = 8) -> int | None:
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    except Exception as exc:  # peft missing or unable to build on meta: the formula stands alone
        print(f"  (peft count skipped: {exc!r})")
        return None


def run(ctx: Context) -> dict:
    bb = ctx.backbone
    dim = 384
    proj = {inj: make_projector(bb, inj, embedding_dim=dim).num_parameters() for inj in ("input", "deep")}
    formula = lora_params_formula(bb.model.config)
    counted = lora_params_peft(bb.model.config)
    lora = counted if counted is not None else formula
    e2p_bytes = dim * 4
    out = {
        "bytes_per_user": {"e2p_embedding": e2p_bytes, "lora_rank8_q_v": lora * 4,
                           "lora_over_e2p": round(lora * 4 / e2p_bytes, 1)},
        "embedding_dim": dim,
        "lora": {"rank": 8, "targets": ["q_proj", "v_proj"], "params_formula": formula, "params_peft": counted,
                 "formula_matches_peft": None if counted is None else counted == formula},
        "projector_params": proj,
        "projector_bytes_float32": {k: v * 4 for k, v in proj.items()},
        "backbone_params": sum(p.numel() for p in bb.model.parameters()),
        "users_for_lora_to_exceed_deep_projector": round(proj["deep"] * 4 / (lora * 4 - e2p_bytes), 2),
    }
    print(f"  cost: {out}", flush=True)
    return out
