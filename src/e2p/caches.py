"""The backbone's key/value cache as E2P uses it: whether deep injection can write into it, the keys and values of
given tokens (a deep prefix's initial value and the after_sink token), and transformers' name for the cache argument."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from .errors import E2PError


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

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_kwarg(module: nn.Module, cache) -> dict:
    """transformers 5 renamed `past_key_values` to `cache`; accept both."""
    return {_cache_arg_name(type(module)): cache}


def _output_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


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
