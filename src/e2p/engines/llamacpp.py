"""E2P on llama.cpp: the GGUF is the backbone, a projector's k vectors enter through `llama_batch.embd`.

One llama.cpp context holds up to `n_seq_max` sequences (one per row), so rows of different users decode in one
batch, join and leave between steps, exactly like the torch path: `LlamaCppModel` is an engine (e2p.engines.base)
whose forward passes run in llama.cpp (`llamacpp_backend`), so the one decode loop (`e2p.engines.generation.Generation`),
the evaluation loop and the server's batcher use it unchanged. Formatting is e2p.formatting's, as for torch: both
engines feed the same ids. No torch weights of the backbone are loaded: only its tokenizer and sizes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..formatting import Segments
from .base import DecodingEngine, input_injection_only
from .llamacpp_backend import LlamaCppBackend, LlamaCppError, LlamaDecoding  # noqa: F401 (re-exported)


def check_projector(config) -> None:
    """Refuse, before llama.cpp loads anything, a projector (config) this engine cannot run as it was trained."""
    input_injection_only(config, "llama-cpp", "llama.cpp takes no input there", "llama.cpp runs the GGUF's weights as they are")


class LlamaCppModel(DecodingEngine):
    """An engine whose forward passes run in llama.cpp. No torch backbone weights are loaded: the tokenizer and the
    backbone's sizes format the prompts (`BackboneInfo`, e2p.backbone.load_backbone_info); the projector runs in
    torch on the CPU and its k vectors go in through `llama_batch.embd`. Input injection only: a deep projector's
    keys and values live inside the layers, where llama.cpp takes no input. Scoring runs without autograd."""

    can_train = False

    def __init__(self, backbone, projector=None, config=None, gguf: str | Path | None = None, n_seq_max: int = 16,
                 max_prompt_tokens: int = 1024, reply_tokens: int = 1024, backend: LlamaCppBackend | None = None):
        """`backbone`: a BackboneInfo (or a loaded Backbone, whose weights are then left alone). Each of the
        `n_seq_max` rows gets its own KV cells: its prompt (at most `max_prompt_tokens`), its k prefix vectors and up
        to `reply_tokens` reply (or scored target) tokens."""
        from ..backbone import BackboneInfo
        from ..config import E2PConfig
        from ..formatting import PromptFormat, eos_ids
        from ..projector import check_backbone

        check_projector(projector.config if projector is not None else None)
        info = backbone if isinstance(backbone, BackboneInfo) else backbone.info()
        if projector is not None:
            check_backbone(projector.config, info)
            projector.to("cpu")
        self.info, self.projector, self.device = info, projector, torch.device("cpu")
        self.config = projector.config if projector is not None else (config or E2PConfig())
        self.tokenizer, self.backbone_name, self.softcap = info.tokenizer, info.name, info.softcap
        self.formatter = PromptFormat(self.tokenizer, self.config, projector is not None, max_prompt_tokens)
        self.eos_ids = eos_ids(self.tokenizer, info.generation_eos)
        from .gguf_convert import resolve_gguf

        k = projector.config.num_prefix_tokens if projector is not None else 0
        self.engine = backend or LlamaCppBackend(resolve_gguf(info.name, gguf), n_seq_max=n_seq_max,
                                                 n_ctx_seq=max_prompt_tokens + k + reply_tokens)
        if self.engine.n_embd != info.hidden_size:
            raise ConfigError(f"{self.engine.path} has hidden size {self.engine.n_embd}, the backbone "
                              f"{info.name} {info.hidden_size}: pass the GGUF of the same model")

    def memory(self) -> dict:
        """What this engine holds: the GGUF's size on disk (mapped by llama.cpp), its KV cells, the projector's
        parameters in torch, and the process's resident memory."""
        from ..devices import rss_bytes

        return {"gguf_bytes": self.engine.path.stat().st_size, "kv_cells": self.engine.n_ctx,
                "projector_parameters": self.projector.num_parameters() if self.projector is not None else 0,
                "rss_bytes": rss_bytes()}

    @classmethod
    def factory(cls, backend: LlamaCppBackend, max_prompt_tokens: int = 1024):
        """`(backbone, projector, config) -> LlamaCppModel` on one loaded GGUF (the evaluation loop's `engine`)."""
        return lambda backbone, projector=None, config=None: cls(backbone, projector, config, backend=backend,
                                                                 max_prompt_tokens=max_prompt_tokens)

    def _prefix_vectors(self, n: int, embeddings) -> list[np.ndarray | None]:
        prefix, has = self.prefixes(embeddings, n)
        if prefix is None:
            return [None] * n
        vecs = prefix.detach().float().cpu().numpy()
        return [vecs[i] if bool(has[i]) else None for i in range(n)]

    @torch.no_grad()
    def loss(self, rows: Sequence[Segments], embeddings=None, reduction: str = "mean", batch_size: int | None = None):
        """Cross-entropy on target tokens only, as E2PModel.loss (no gradients: llama.cpp runs inference only)."""
        rows = list(rows)
        embeddings = list(embeddings) if embeddings is not None else None
        nll, count = [], []
        step = min(batch_size or self.engine.n_seq_max, self.engine.n_seq_max)
        for i in range(0, len(rows), step):
            part = rows[i:i + step]
            prefixes = self._prefix_vectors(len(part), None if embeddings is None else embeddings[i:i + step])
            seqs = self.engine.take_seqs(len(part))
            try:
                logits, _ = self.engine.prefill(part, prefixes, seqs, score=True)
            finally:
                self.engine.release(seqs)
            for r, lg in zip(part, logits):
                logp = torch.log_softmax(self.soft_cap(torch.from_numpy(lg).double()), dim=-1)
                nll.append(float(-logp[torch.arange(len(r.target)), torch.tensor(r.target)].sum()))
                count.append(len(r.target))
        nll_t, count_t = torch.tensor(nll, dtype=torch.float32), torch.tensor(count)
        return nll_t.sum() / count_t.sum() if reduction == "mean" else (nll_t, count_t)

    # --- the decode loop's three calls (e2p.engines.generation.Generation) ----------------------------------
    @torch.no_grad()
    def start_decoding(self, rows: Sequence[Segments], embeddings=None) -> LlamaDecoding:
        prefixes = self._prefix_vectors(len(rows), embeddings)
        seqs = self.engine.take_seqs(len(rows))
        try:
            logits, positions = self.engine.prefill(rows, prefixes, seqs)
        except Exception:
            self.engine.release(seqs)
            raise
        return LlamaDecoding(self.engine, seqs, positions, np.concatenate(logits))

    def next_logits(self, dec: LlamaDecoding) -> torch.Tensor:
        return self.soft_cap(torch.from_numpy(dec.logits))

    def advance(self, dec: LlamaDecoding, tokens: torch.Tensor) -> None:
        entries = [(int(t), pos, s, True) for t, pos, s in zip(tokens.tolist(), dec.positions, dec.seqs)]
        logits = self.engine.decode(entries)
        dec.logits = np.stack([logits[i] for i in range(len(entries))])
        dec.positions = [p + 1 for p in dec.positions]
