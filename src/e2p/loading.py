"""One call to load and use, in the manner of `SentenceTransformer(name)`:

    model = e2p.load("persona-deep-k1")                       # or a folder `e2p train` wrote; engine="llama-cpp"
    model.generate("What do you do on weekends?", users=["I love hiking.", "I am a chef in Paris.", None])
    model.embed(["I love hiking."])                           # the vectors to store for users

Users are texts (embedded with the projector's own encoder and its live-profile rule, `profile.json`, so a text +
style projector gets its style block too), vectors (what your store holds), or None (the plain backbone for that
row). The CLI's `generate` and `e2p serve` load through here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


class PersonalizedModel:
    """A loaded backbone + projector on an engine, with the projector's encoder for text users."""

    def __init__(self, model, projector_dir: Path | None = None, encoder=None):
        from .data.live_profile import serving_rule

        self.model = model
        self.projector = model.projector
        self.config = self.projector.config if self.projector is not None else None
        reads = self.config is not None and not self.config.is_shared
        self.rule = serving_rule(projector_dir, self.config) if reads and projector_dir is not None else None
        self._encoder = encoder

    @property
    def embedding_dim(self) -> int | None:
        return self.config.embedding_dim if self.config is not None and not self.config.is_shared else None

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """[N, embedding_dim] float32: each text as the user embedding this projector reads."""
        from .data.encoders import encoder_for
        from .errors import ConfigError

        if self.embedding_dim is None:
            raise ConfigError("this model reads no user embedding (no projector, or a shared prefix): nothing to embed")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self._encoder is None:
            self._encoder = encoder_for(self.config)
        vectors = np.asarray(self._encoder.encode(texts), dtype=np.float32)
        if self.rule is not None and self.rule.style:  # a profile with more than the encoder's mean
            vectors = self.rule.each(vectors, texts)
        if vectors.shape[1] != self.embedding_dim:
            raise ConfigError(f"the encoder gives {vectors.shape[1]} values, the projector reads {self.embedding_dim}: "
                              "embed users with the encoder the projector was trained with, or pass vectors")
        return vectors

    def users(self, users: Sequence) -> list:
        """Texts, vectors and None -> one embedding tensor (or None) per row; texts embedded in one batch."""
        import torch

        from .store.vectors import as_vector

        users = list(users)
        texts = [u for u in users if isinstance(u, str)]
        embedded = iter(self.embed(texts)) if texts else iter(())
        out = []
        for u in users:
            if u is None:
                out.append(None)
            elif isinstance(u, str):
                out.append(torch.from_numpy(next(embedded)))
            else:
                out.append(torch.from_numpy(as_vector(u.tolist() if hasattr(u, "tolist") else u, self.embedding_dim)))
        return out

    def generate(self, messages, users: Sequence | None = None, max_new_tokens: int = 64, **kwargs) -> str | list[str]:
        """Replies for one prompt (a string or chat messages) or a list of them; `users`: one per row (a text, a vector
        or None), or one for a single prompt; a single prompt with several users is asked of each. A single prompt
        and user give one string."""
        single = isinstance(messages, str) or (isinstance(messages, list) and messages and isinstance(messages[0], dict))
        if users is not None and not isinstance(users, (list, tuple)):
            users = [users]
        prompts = [messages] * max(len(users or []), 1) if single else list(messages)
        users = list(users) if users is not None else [None] * len(prompts)
        if len(users) != len(prompts):
            from .errors import ConfigError

            raise ConfigError(f"{len(prompts)} prompts and {len(users)} users: give one user (or None) per prompt")
        replies = self.model.generate(prompts, embeddings=self.users(users), max_new_tokens=max_new_tokens, **kwargs)
        return replies[0] if single and len(replies) == 1 else replies


def load(name_or_dir: str | Path | None = None, engine: str = "torch", backbone: str | None = None,
         device: str = "auto", dtype: str = "auto", gguf: str | None = None, max_batch_size: int = 16,
         max_prompt_tokens: int = 1024, max_new_tokens: int = 1024, encoder=None, vllm_args: dict | None = None,
         vllm_url: str | None = None, vllm_dtype: str = "float32") -> PersonalizedModel:
    """A shipped projector's name (persona-deep-k1, persona-input-k1), a folder `e2p train` wrote, or None (the plain
    backbone), on the torch, llama-cpp or vllm engine (`vllm_url`: a running `vllm serve` instead of vLLM in this
    process, its prompt embeddings sent in `vllm_dtype`; `vllm_args`: vLLM engine arguments). An engine that cannot run the projector refuses it before any
    weights load."""
    from .backbone import load_backbone, load_backbone_info
    from .config import E2PConfig, resolve_projector
    from .engines import check_engine
    from .projector import Projector

    folder = resolve_projector(name_or_dir) if name_or_dir is not None else None
    if folder is not None:
        check_engine(engine, E2PConfig.load(folder))
    # llama.cpp and vLLM run the weights themselves: of the torch backbone only the tokenizer and sizes are read
    elsewhere = engine in ("llama-cpp", "vllm")
    loaded = load_backbone_info(backbone) if elsewhere else load_backbone(backbone, device=device, dtype=dtype)
    projector = Projector.from_pretrained(folder, loaded).eval() if folder is not None else None
    model = make_model(loaded, projector, engine=engine, gguf=gguf, n_seq_max=max_batch_size,
                       max_prompt_tokens=max_prompt_tokens, reply_tokens=max_new_tokens, vllm_args=vllm_args,
                       vllm_url=vllm_url, vllm_dtype=vllm_dtype)
    return PersonalizedModel(model, folder, encoder)


def make_model(backbone, projector=None, config=None, engine: str = "torch", gguf: str | None = None,
               n_seq_max: int = 16, max_prompt_tokens: int = 1024, reply_tokens: int = 1024,
               vllm_args: dict | None = None, vllm_url: str | None = None, vllm_dtype: str = "float32"):
    """The model on the chosen engine (e2p.engines.base.Engine): torch's E2PModel on a loaded Backbone; llama.cpp
    on a Backbone or a weightless BackboneInfo (it loads its GGUF here, with KV room per row for a prompt of
    `max_prompt_tokens` and a reply of `reply_tokens`); or vLLM (in this process, or the `vllm serve` at
    `vllm_url`)."""
    if engine == "vllm":
        from .engines.vllm import InProcessVLLM, VLLMModel, check_projector
        from .engines.vllm_gateway import VLLMGateway

        check_projector(projector.config if projector is not None else None)  # before vLLM loads
        k = projector.config.num_prefix_tokens if projector is not None else 0
        import torch

        runner = (VLLMGateway(vllm_url, api_key=os.environ.get("VLLM_API_KEY"), dtype=getattr(torch, vllm_dtype))
                  if vllm_url else
                  InProcessVLLM(backbone.folder, max_model_len=max_prompt_tokens + k + reply_tokens, engine_args=vllm_args))
        return VLLMModel(backbone, projector, config, runner=runner, max_prompt_tokens=max_prompt_tokens)
    if engine == "llama-cpp":
        from .engines.llamacpp import LlamaCppModel

        return LlamaCppModel(backbone, projector, config, gguf=gguf, n_seq_max=n_seq_max,
                             max_prompt_tokens=max_prompt_tokens, reply_tokens=reply_tokens)
    from .model import E2PModel

    return E2PModel(backbone, projector, config, max_prompt_tokens=max_prompt_tokens)
