"""The engine interface: what the one decode loop (`e2p.engines.generation.Generation`), the server's batcher, `e2p eval`
and the CLI ask of whatever runs the backbone's forward passes (torch: `e2p.model.E2PModel`; llama.cpp:
`e2p.engines.llamacpp.LlamaCppModel`). They take an `Engine`, never a concrete class.

`DecodingEngine` is the half every engine shares: formatting through one `PromptFormat` (e2p.formatting), the
projector's prefix vectors for a batch of users, token picking, and `generate` (the decode loop run to the end).
An engine adds the three decoding steps (`start_decoding`, `next_logits`, `advance`) and `loss`; one that cannot
train says so with `can_train = False` (its loss runs without autograd).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch.nn import functional as F

from ..formatting import Messages, PromptFormat, Segments
from .generation import DecodeRow, Generation


@runtime_checkable
class Engine(Protocol):
    projector: object  # e2p.projector.Projector or None (the plain backbone)
    config: object  # the projector's E2PConfig (formatting settings for a plain backbone)
    tokenizer: object
    eos_ids: list[int]
    backbone_name: str
    can_train: bool

    def format(self, messages: Messages | str, reply: str | None = None, persona_text: str | None = None,
               system_prompt: str | None = None, max_target_tokens: int | None = None) -> Segments: ...

    def format_raw(self, prompt: str) -> Segments: ...

    def start_decoding(self, rows: Sequence[Segments], embeddings=None): ...

    def next_logits(self, dec) -> torch.Tensor: ...

    def advance(self, dec, tokens: torch.Tensor) -> None: ...

    def loss(self, rows: Sequence[Segments], embeddings=None, reduction: str = "mean", batch_size: int | None = None): ...

    def generate(self, prompts, embeddings=None, max_new_tokens: int = 64, **kwargs) -> list[str]: ...


def input_injection_only(config, engine: str, why_not_deep: str, why_not_lora: str) -> None:
    """Refuse a projector (its E2PConfig; None: the plain backbone) that an engine running only the backbone's own
    weights on input embeddings (llama.cpp, vLLM) cannot run as it was trained: deep injection or a shared LoRA."""
    from ..errors import ConfigError

    if config is None:
        return
    if config.injection != "input":
        raise ConfigError(f"the {engine} engine takes input-injection projectors only: a deep projector's keys and "
                          f"values live inside every layer, where {why_not_deep}. Use --engine torch, or an input "
                          "projector (e2p train --injection input; shipped: persona-input-k1)")
    if config.lora_rank:
        raise ConfigError(f"the {engine} engine cannot run this projector: it carries a shared LoRA adapter (rank "
                          f"{config.lora_rank} on {', '.join(config.lora_targets) or 'the backbone'}, e2p train "
                          f"--lora-rank) that changes the backbone's layers, and {why_not_lora}. Use --engine torch, or "
                          "a projector trained without --lora-rank")


class DecodingEngine:
    """What every engine shares; the subclass sets `projector`, `config`, `tokenizer`, `device`, `eos_ids`,
    `backbone_name`, `softcap` (None: none) and `formatter` (a PromptFormat)."""

    can_train = True
    formatter: PromptFormat

    # --- formatting (e2p.formatting) -------------------------------------------------------------
    def format(self, messages: Messages | str, reply: str | None = None, persona_text: str | None = None,
               system_prompt: str | None = None, max_target_tokens: int | None = None) -> Segments:
        """Chat messages (or one user message) -> Segments, older turns dropped until the prompt fits."""
        return self.formatter.format(messages, reply, persona_text, system_prompt, max_target_tokens)

    def format_raw(self, prompt: str) -> Segments:
        """A raw prompt (no template) with the prefix where training put it."""
        return self.formatter.format_raw(prompt)

    @property
    def max_prompt_tokens(self) -> int:
        return self.formatter.max_prompt_tokens

    @max_prompt_tokens.setter
    def max_prompt_tokens(self, value: int) -> None:
        self.formatter.max_prompt_tokens = value

    @property
    def num_prefix_tokens(self) -> int:
        return self.projector.config.num_prefix_tokens if self.projector is not None else 0

    def prefix_length(self, has_embedding: bool) -> int:
        """Soft tokens a row gets (they occupy context positions like text tokens): k with a user embedding or a
        shared prefix, else 0."""
        if self.projector is None:
            return 0
        return self.num_prefix_tokens if (has_embedding or self.projector.config.is_shared) else 0

    # --- prefixes -----------------------------------------------------------------------------
    def prefixes(self, embeddings, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> ([B, k, D] prefix vectors or None, [B] bool: which rows have a prefix).

        `embeddings`: a [B, E] tensor, or a list whose None entries mean "no user" (plain backbone row).
        A shared projector (embedding_dim 0) gives every row its prefix.
        """
        dev = self.device
        if self.projector is None:
            return None, torch.zeros(batch_size, dtype=torch.bool, device=dev)
        if self.projector.config.is_shared:
            return self.projector(batch_size=batch_size), torch.ones(batch_size, dtype=torch.bool, device=dev)
        if embeddings is None:
            return None, torch.zeros(batch_size, dtype=torch.bool, device=dev)
        if isinstance(embeddings, torch.Tensor) or (len(embeddings) and all(e is not None for e in embeddings)):
            e = embeddings if isinstance(embeddings, torch.Tensor) else torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in embeddings])
            if len(e) != batch_size:
                raise ValueError(f"{len(e)} embeddings for a batch of {batch_size}")
            return self.projector(e), torch.ones(batch_size, dtype=torch.bool, device=dev)
        has = torch.tensor([e is not None for e in embeddings], dtype=torch.bool, device=dev)
        out = torch.zeros(batch_size, self.projector.config.num_prefix_tokens, self.projector.config.prefix_dim, device=dev)
        if has.any():
            rows = torch.stack([torch.as_tensor(embeddings[i], dtype=torch.float32) for i in range(batch_size) if has[i]])
            out = out.to(self.projector.shared.dtype)
            out[has] = self.projector(rows)
        return out, has

    # --- generation: the one decode loop run to the end ------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Messages | str], embeddings=None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 persona_texts: Sequence[str | None] | None = None, seed: int | None = None,
                 batch_size: int | None = None) -> list[str]:
        """Generate for a batch where every row may be a different user (or none: embedding None); at most
        `batch_size` rows decode at once (None: all), a waiting row joining as soon as another finishes."""
        rows = [self.format(p, persona_text=(persona_texts[i] if persona_texts else None)) for i, p in enumerate(prompts)]
        tokens = self.generate_tokens(rows, embeddings, max_new_tokens, do_sample, temperature, top_p, seed, batch_size)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    @torch.no_grad()
    def generate_tokens(self, rows: Sequence[Segments], embeddings=None, max_new_tokens: int = 64,
                        do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                        seed: int | None = None, batch_size: int | None = None) -> list[list[int]]:
        """Token-level batched decoding: the one decode loop (`Generation`) run to the end, at most `batch_size`
        rows at once (continuous batching: a waiting row joins when another finishes).

        With `seed`, every sampled row draws from its own generator seeded with it, as the server does for a
        request's `seed`: a row's text is the same alone, in any batch, from the CLI, the API or the server."""
        settings = [DecodeRow(temperature=temperature if do_sample else 0.0, top_p=top_p, seed=seed,
                              max_tokens=max_new_tokens) for _ in rows]
        embeddings = list(embeddings) if embeddings is not None else [None] * len(rows)
        room, waiting = batch_size or max(len(rows), 1), 0
        gen = Generation(self)
        while waiting < len(rows) or gen.rows:
            take = min(room - len(gen.rows), len(rows) - waiting)
            if take > 0:
                gen.add(settings[waiting:waiting + take], rows[waiting:waiting + take], embeddings[waiting:waiting + take])
                waiting += take
            gen.step()
        failed = next((r.error for r in settings if r.error is not None), None)
        if failed is not None:
            raise failed
        return [r.tokens for r in settings]

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit soft-capping (Gemma 2/3: cap * tanh(x / cap), `self.softcap`); unchanged for models
        without it."""
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    @staticmethod
    def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen=None) -> torch.Tensor:
        """Greedy (argmax) or sampled (temperature, nucleus top_p, optional generator) tokens from [B, vocab]."""
        if not do_sample:
            return logits.argmax(-1)
        probs = F.softmax(logits / max(temperature, 1e-5), dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            keep[..., 0] = True  # the likeliest token always stays (a tiny top_p rounds to 0 in float32)
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(1)
