"""E2PModel: the one place that builds prefixed inputs, computes the loss and generates."""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .backbone import Backbone
from .devices import autocast as autocast_context, cpu_has_native_bf16
from .config import E2PConfig
from .errors import E2PError
from .engines.base import DecodingEngine
from .formatting import PromptFormat, Segments, eos_ids
from .engines.generation import Decoding
from .projector import Projector, check_backbone

log = logging.getLogger(__name__)

bf16_supported = cpu_has_native_bf16  # the name benchmarks and older scripts import


# --- the backbone's key/value cache as E2P uses it: whether deep injection can write into it, the keys and values of
# given tokens (a deep prefix's initial value and the after_sink token), and transformers' name for the cache argument
class DeepInjectionError(E2PError, ValueError):
    """The backbone does not keep its attention cache as per-layer keys and values."""


def check_deep_injection(lm: nn.Module) -> None:
    """Deep injection writes a prefix into every layer's key/value cache: refuse, by name, an architecture whose
    cache is something else (state-space or recurrent layers, encoder-decoder caches)."""
    arch = type(lm).__name__
    try:
        cache = _output_cache(lm.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=_device(lm)), use_cache=True))
        layers = getattr(cache, "layers", None)
        ok = layers is not None and len(layers) == lm.config.num_hidden_layers and all(
            getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 and layer.keys.shape[2] == 1 for layer in layers)
    except Exception as exc:  # noqa: BLE001 - any failure means the layout is not the one deep injection writes
        raise DeepInjectionError(f"deep injection needs per-layer key/value caches; {arch} failed to build one ({exc}): "
                                 "train with --injection input") from None
    if not ok:
        raise DeepInjectionError(f"deep injection needs per-layer key/value caches, and {arch} keeps its cache as "
                                 f"{type(cache).__name__}: train with --injection input, which works on every causal LM")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@functools.lru_cache(maxsize=None)
def _cache_arg_name(model_class: type) -> str:
    import inspect

    params = inspect.signature(model_class.forward).parameters
    for name in ("cache", "past_key_values", "cache_params"):  # transformers 5.x; state-space models before 5.20
        if name in params:
            return name
    return "past_key_values"


def _cache_kwarg(module: nn.Module, cache) -> dict:
    """transformers 5 renamed `past_key_values` to `cache`; accept both."""
    return {_cache_arg_name(type(module)): cache}


def _output_cache(out):
    for name in ("cache", "past_key_values", "cache_params"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


@torch.no_grad()
def token_keys_values(lm: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """[t, L*2*kv]: every layer's keys and values of `ids` (from position 0), laid out as a deep prefix."""
    return _token_keys_values(lm, ids)


def _token_keys_values(lm: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    cache = _output_cache(lm.base_model(input_ids=torch.tensor([list(ids)], device=_device(lm)), use_cache=True))
    layers = [torch.stack([cache.layers[i].keys[0].permute(1, 0, 2).flatten(1),  # [n_kv, t, hd] -> [t, n_kv*hd]
                           cache.layers[i].values[0].permute(1, 0, 2).flatten(1)], dim=1)
              for i in range(lm.config.num_hidden_layers)]
    return torch.stack(layers, dim=1).reshape(len(ids), -1)


def new_config(backbone: Backbone, **overrides) -> E2PConfig:
    """An E2PConfig filled in with the backbone's sizes and name."""
    values = dict(
        backbone_name=backbone.name,
        backbone_hidden_size=backbone.hidden_size,
        backbone_num_layers=backbone.num_layers,
        backbone_kv_dim=backbone.kv_dim,
        token_embedding_norm=backbone.token_embedding_norm(),
    )
    values.update(overrides)
    return E2PConfig(**values)


class E2PModel(nn.Module, DecodingEngine):
    """A frozen backbone plus (optionally) a projector; rows of a batch may belong to different users.

    With `projector=None` it is the plain backbone (the `none` / `text` conditions), using the
    formatting settings of `config` (or the defaults). Everything runs on the backbone's device; `autocast`
    None takes the backbone's precision for `training` or inference (e2p.devices.resolve_dtype), False turns it
    off, True or a dtype forces bf16 / that dtype.
    """

    def __init__(self, backbone: Backbone, projector: Projector | None = None, config: E2PConfig | None = None,
                 autocast: bool | torch.dtype | None = None, max_prompt_tokens: int = 1024, training: bool = False):
        super().__init__()
        if projector is not None:
            if projector.config.injection == "deep":
                check_deep_injection(backbone.model)
                if getattr(backbone.model, "is_gradient_checkpointing", False):
                    # transformers' checkpointed layers drop the cache, and with it a deep prefix's keys and values
                    raise DeepInjectionError("gradient checkpointing works with --injection input only: transformers "
                                             "drops the key/value cache, where a deep prefix lives, in checkpointed layers")
            check_backbone(projector.config, backbone)
            projector.to(backbone.device)
            if projector.lora is not None:  # hooks on the target layers, once per backbone; inactive outside `adapter`
                from . import lora

                lora.attach(backbone.model, projector.config.lora_modules)
        self.backbone = backbone
        self.lm = backbone.model
        self.base = backbone.model.base_model  # the decoder stack: .model (Llama, Qwen2, Gemma), .gpt_neox, ...
        self.device = backbone.device
        self.tokenizer = backbone.tokenizer
        self.projector = projector
        self.config = projector.config if projector is not None else (config or E2PConfig())
        if autocast is None:
            autocast = backbone.precision(training).autocast if hasattr(backbone, "precision") else None
        elif autocast is True:
            autocast = torch.bfloat16
        self.autocast = autocast or None  # the autocast dtype, None: compute in the weights' dtype
        self.softcap = getattr(self.lm.config, "final_logit_softcapping", None)
        self.backbone_name = backbone.name
        self.formatter = PromptFormat(self.tokenizer, self.config, projector is not None, max_prompt_tokens)
        self.eos_ids = eos_ids(self.tokenizer, getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None))

    @property
    def has_adapter(self) -> bool:
        return self.projector is not None and self.projector.lora is not None

    def adapter(self, rows: list[bool] | None = None):
        """The projector's shared LoRA adapter active on the backbone for the calls inside (`rows`: which rows of the
        batch get it, None: all); a no-op without one. Every backbone call of this model runs inside it."""
        if not self.has_adapter:
            return contextlib.nullcontext()
        from .lora import active

        mask = None if rows is None or all(rows) else torch.tensor(rows, dtype=torch.bool, device=self.device)
        return active(self.lm, self.projector.lora, mask)

    # --- batch building ---------------------------------------------------------------------
    def build(self, rows: Sequence[Segments], embeddings=None) -> dict:
        """Left-padded batch: inputs_embeds, attention_mask, position_ids, (deep) past_key_values, targets."""
        B = len(rows)
        prefix, has = self.prefixes(embeddings, B)
        k = self.num_prefix_tokens
        deep = self.config.injection == "deep"
        n_inline = [k if (has[i] and not deep) else 0 for i in range(B)]
        lengths = [len(r.pre) + n_inline[i] + len(r.post) + len(r.target) for i, r in enumerate(rows)]
        T = max(lengths)
        pad_id = self.tokenizer.pad_token_id
        # built on the host (many small writes), then moved in one copy each
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        is_prefix = torch.zeros(B, T, dtype=torch.bool)
        is_target = torch.zeros(B, T, dtype=torch.bool)
        for i, r in enumerate(rows):
            s = T - lengths[i]
            seq = r.pre + [pad_id] * n_inline[i] + r.post + r.target
            ids[i, s:] = torch.tensor(seq, dtype=torch.long)
            mask[i, s:] = 1
            is_prefix[i, s + len(r.pre): s + len(r.pre) + n_inline[i]] = True
            if r.target:
                is_target[i, T - len(r.target):] = True
        dev = self.device
        ids, mask, is_prefix, is_target = ids.to(dev), mask.to(dev), is_prefix.to(dev), is_target.to(dev)
        embeds = self.lm.get_input_embeddings()(ids)
        if prefix is not None and not deep and is_prefix.any():
            embeds = embeds.masked_scatter(is_prefix.unsqueeze(-1), prefix[has].to(embeds.dtype).reshape(-1))
        if deep and prefix is not None and self.config.prefix_position == "after_sink":
            prefix = torch.cat([self._sink_kv(rows).to(prefix.dtype), prefix], dim=1)
        n_cache = prefix.shape[1] if deep and prefix is not None else 0
        offset = (has.long() * n_cache).unsqueeze(1) if deep else 0
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0) + offset
        batch = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, ids=ids, is_target=is_target)
        if self.has_adapter:  # the shared adapter goes with the prefix: a row without a user gets the plain backbone
            batch["adapter_rows"] = has.tolist()
        if deep and prefix is not None:
            batch["past_key_values"] = self._deep_cache(prefix)
            batch["attention_mask"] = torch.cat([has.long().unsqueeze(1).expand(B, n_cache), mask], dim=1)
        return batch

    def _sink_kv(self, rows: Sequence[Segments]) -> torch.Tensor:
        """[B, 1, L*2*kv]: every layer's key/value of each row's first token at position 0 (frozen, cached),
        so that with "after_sink" the model's attention sink stays a real token and the prefix sits behind it."""
        firsts = [tuple((r.pre or r.post)[:1]) for r in rows]  # each row its own first token, as it was trained
        if self.has_adapter:  # the sink as the adapted backbone computes it (and trains it): never cached
            with self.adapter():
                kv = {first: _token_keys_values(self.lm, list(first)) for first in set(firsts)}
            return torch.stack([kv[first] for first in firsts])
        sinks = self.__dict__.setdefault("_sinks", {})
        if len(sinks) > 256:
            sinks.clear()
        for first in set(firsts) - set(sinks):
            sinks[first] = token_keys_values(self.lm, list(first))
        return torch.stack([sinks[first] for first in firsts])

    def _deep_cache(self, prefix: torch.Tensor):
        """[B, k, L*2*kv] -> a DynamicCache holding each layer's prefix keys and values."""
        from transformers import DynamicCache

        cfg = self.lm.config
        B, k, _ = prefix.shape
        n_kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = self.backbone.kv_dim // n_kv
        kv = prefix.view(B, k, cfg.num_hidden_layers, 2, n_kv, head_dim).permute(2, 3, 0, 4, 1, 5)
        kv = kv.to(self.backbone.dtype)  # the weights' dtype (bf16 on a GPU in bf16)
        cache = DynamicCache(config=cfg)
        for layer in range(cfg.num_hidden_layers):
            cache.update(kv[layer, 0].contiguous(), kv[layer, 1].contiguous(), layer)
        return cache

    def _autocast(self):
        return autocast_context(self.device, self.autocast)

    def _hidden(self, batch: dict, use_cache: bool = False):
        with self._autocast(), self.adapter(batch.get("adapter_rows")):
            return self.base(
                inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=use_cache, **_cache_kwarg(self.base, batch.get("past_key_values")),
            )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits from last hidden states, as the model's own head computes them (Gemma's soft-capping too)."""
        with self._autocast():
            return self.soft_cap(self.lm.get_output_embeddings()(hidden).float())

    # --- loss -----------------------------------------------------------------------------------
    def target_logits(self, rows: Sequence[Segments], embeddings=None):
        """Float logits only where a target token is predicted: ([N, vocab], labels [N], row index [N]).

        Rows are flattened in order, so two models scoring the same targets (e.g. a teacher that sees the
        persona text and a student that sees the embedding) give aligned tensors."""
        batch = self.build(rows, embeddings)
        hidden = self._hidden(batch).last_hidden_state
        predicts = batch["is_target"][:, 1:]  # position t predicts token t+1
        h = hidden[:, :-1][predicts]
        labels = batch["ids"][:, 1:][predicts]
        row = torch.arange(len(rows), device=self.device).unsqueeze(1).expand_as(predicts)[predicts]
        return self.logits(h), labels, row

    def loss(self, rows: Sequence[Segments], embeddings=None, reduction: str = "mean",
             batch_size: int | None = None) -> torch.Tensor:
        """Cross-entropy on target tokens only, logits computed only where a target is predicted.

        reduction "mean": mean over all target tokens; "none": ([B] summed NLL, [B] token counts).
        `batch_size`: at most this many rows per forward pass (the result is the same).
        """
        if batch_size and len(rows) > batch_size:
            parts = [self.loss(rows[i:i + batch_size], None if embeddings is None else embeddings[i:i + batch_size],
                               "none") for i in range(0, len(rows), batch_size)]
            nll, count = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            return nll.sum() / count.sum() if reduction == "mean" else (nll, count)
        logits, labels, row = self.target_logits(rows, embeddings)
        nll = F.cross_entropy(logits, labels, reduction="none")
        if reduction == "mean":
            return nll.mean()
        return per_row_sum(nll, row, len(rows)), per_row_sum(torch.ones_like(row), row, len(rows))

    # --- step-level decoding (rows may join and leave between steps: the server's continuous batching) -----
    # Always without autograd: the projector's parameters require grad, so a step taken with grad enabled keeps
    # every step's activations alive for as long as the batch runs (measured: 4 GB for one personalized request).
    @torch.no_grad()
    def start_decoding(self, rows: Sequence[Segments], embeddings=None) -> "Decoding":
        """Prefill `rows` (each with its own user, or none) and return the running batch."""
        from transformers import DynamicCache

        batch = self.build(rows, embeddings)
        if "past_key_values" not in batch:
            batch["past_key_values"] = DynamicCache(config=self.lm.config)
        out = self._hidden(batch, use_cache=True)
        return Decoding(self.lm.config, _output_cache(out), batch["attention_mask"], batch["position_ids"][:, -1:],
                        out.last_hidden_state[:, -1], adapter_rows=batch.get("adapter_rows"))

    @torch.no_grad()
    def next_logits(self, dec: "Decoding") -> torch.Tensor:
        """[B, vocab] float logits of every row's next token."""
        return self.logits(dec.last)

    @torch.no_grad()
    def advance(self, dec: "Decoding", tokens: torch.Tensor) -> None:
        """Feed each row its token: one forward step of the whole batch."""
        B = len(tokens)
        dec.mask = torch.cat([dec.mask, torch.ones(B, 1, dtype=dec.mask.dtype, device=dec.mask.device)], dim=1)
        dec.positions = dec.positions + 1
        step = dict(inputs_embeds=self.lm.get_input_embeddings()(tokens.unsqueeze(1)), attention_mask=dec.mask,
                    position_ids=dec.positions, past_key_values=dec.cache, adapter_rows=dec.adapter_rows)
        out = self._hidden(step, use_cache=True)
        dec.cache, dec.last = _output_cache(out), out.last_hidden_state[:, -1]


def per_row_sum(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum flattened per-token `values` back into their rows (`row` from :meth:`E2PModel.target_logits`)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, row, values)
