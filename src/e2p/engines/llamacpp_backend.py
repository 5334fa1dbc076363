"""llama.cpp through llama-cpp-python's C API, with no torch: a GGUF, one context whose KV cache holds up to
`n_seq_max` sequences (one per row), token and vector (`llama_batch.embd`) inputs at any position, logits out.
`e2p.engines.llamacpp.LlamaCppModel` puts it behind the engine interface; docs/edge.md uses it alone with `e2p.engines.numpy_projector`."""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, E2PError

log = logging.getLogger(__name__)


def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("--engine llama-cpp needs llama-cpp-python: pip install 'e2p[llamacpp]'") from None
    return llama_cpp


_LOG_CALLBACK = None


def _quiet(L) -> None:
    """llama.cpp prints every tensor it loads to stderr; keep warnings and errors only (e2p -v shows all)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        verbose = log.isEnabledFor(logging.DEBUG)

        @L.llama_log_callback
        def callback(level, text, user_data):
            if verbose or level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR (5 continues the last line)
                msg = text.decode("utf-8", "replace").rstrip()
                if msg:
                    log.warning("llama.cpp: %s", msg)

        _LOG_CALLBACK = callback
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaCppError(E2PError, RuntimeError):
    """llama.cpp refused a batch (out of KV cache, a context too short, a bad GGUF)."""


class LlamaCppBackend:
    """A GGUF loaded once through llama.cpp's C API, with one context of `n_seq_max` sequences, each in its own KV
    stream of `n_ctx_seq` cells (prompt, prefix and reply of one row must fit in it).

    Own streams, not one unified cache (`kv_unified=True`), for two measured reasons (docs/performance.md): a row
    attends to its own cells only instead of every row's (batched decoding 22% faster on Q8_0), and a row's greedy
    tokens depend far less on which rows share its batch (Q8_0, 80 rows of 32 tokens: 76 equal the row decoded
    alone, against 23 with a unified cache; on f32 all do either way)."""

    def __init__(self, gguf: str | Path, n_ctx_seq: int = 2048, n_seq_max: int = 16, n_batch: int = 2048,
                 n_threads: int | None = None, kv_unified: bool = False):
        L = self.L = _llama()
        path = Path(gguf)
        if not path.is_file():
            raise ConfigError(f"no GGUF file at {path}: pass --gguf FILE (any quantization llama.cpp reads)")
        if n_ctx_seq < 1 or n_seq_max < 1:
            raise ConfigError(f"n_ctx_seq ({n_ctx_seq}) and n_seq_max ({n_seq_max}) must be at least 1")
        _quiet(L)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise ConfigError(f"llama.cpp cannot load {path}: is it a GGUF file of a causal LM?")
        n_ctx = n_ctx_seq * n_seq_max
        n_batch = min(n_batch, n_ctx)  # llama.cpp aborts (not errs) on a batch above the context's n_batch
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, min(n_batch, 512), n_seq_max
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        params.kv_unified, params.no_perf, params.embeddings = kv_unified, True, False
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise ConfigError(f"llama.cpp cannot make a context of {n_seq_max} x {n_ctx_seq} cells for {path}")
        self.path, self.n_ctx, self.n_batch, self.n_seq_max = path, L.llama_n_ctx(self.ctx), n_batch, n_seq_max
        self.n_ctx_seq = self.n_ctx if kv_unified else self.n_ctx // n_seq_max
        self.memory = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_embd = L.llama_model_n_embd(self.model)
        self.free_seqs = list(range(n_seq_max))
        self._tokens = L.llama_batch_init(n_batch, 0, 1)
        self._embd = L.llama_batch_init(n_batch, self.n_embd, 1)

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            L = self.L
            L.llama_batch_free(self._tokens)
            L.llama_batch_free(self._embd)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
        except Exception:
            pass

    # --- sequences ------------------------------------------------------------------------------
    def take_seqs(self, n: int) -> list[int]:
        if n > len(self.free_seqs):
            raise LlamaCppError(f"{n} more rows than the {len(self.free_seqs)} free sequences of this context "
                                f"(n_seq_max {self.n_seq_max}): use a smaller batch")
        seqs, self.free_seqs = self.free_seqs[:n], self.free_seqs[n:]
        return seqs

    def release(self, seqs: Sequence[int]) -> None:
        for s in seqs:
            self.L.llama_memory_seq_rm(self.memory, s, -1, -1)
        self.free_seqs = sorted(set(self.free_seqs) | set(seqs))

    # --- forward passes ---------------------------------------------------------------------------
    def decode(self, entries: list[tuple], embd: bool = False) -> dict[int, np.ndarray]:
        """Feed `entries` = (token id or [n_embd] vector, position, sequence, want_logits), in chunks of n_batch;
        -> {entry index: float32 logits} for the entries that want logits."""
        out: dict[int, np.ndarray] = {}
        batch = self._embd if embd else self._tokens
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            for i, (item, pos, seq, want) in enumerate(chunk):
                if embd:
                    ctypes.memmove(ctypes.addressof(batch.embd.contents) + i * self.n_embd * 4,
                                   np.ascontiguousarray(item, dtype=np.float32).ctypes.data, self.n_embd * 4)
                else:
                    batch.token[i] = int(item)
                batch.pos[i], batch.n_seq_id[i], batch.logits[i] = pos, 1, 1 if want else 0
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(chunk)
            code = self.L.llama_decode(self.ctx, batch)
            if code != 0:
                raise LlamaCppError(f"llama_decode failed ({code}): a row's prompt and reply outgrew its "
                                    f"{self.n_ctx_seq} KV cells, or the batch is invalid; shorten the prompt or "
                                    "max_tokens, or raise n_ctx_seq")
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    ptr = self.L.llama_get_logits_ith(self.ctx, i)
                    out[start + i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    def prefill(self, rows: Sequence, prefixes: Sequence[np.ndarray | None], seqs: Sequence[int],
                score: bool = False) -> tuple[list[np.ndarray], list[int]]:
        """`pre` tokens, then the prefix vectors, then `post` (+ `target` when scoring) of every row, each in its own
        sequence. -> (per row: logits of its last position, or with `score` of every position that predicts a target
        token; per row: the next free position)."""
        pre, vec, post, want_at, nxt = [], [], [], [], []
        for r, p, s in zip(rows, prefixes, seqs):
            pos = 0
            for t in r.pre:
                pre.append((t, pos, s, False))
                pos += 1
            for v in ([] if p is None else p):
                vec.append((v, pos, s, False))
                pos += 1
            tail = list(r.post) + (list(r.target) if score else [])
            # logits where a target token is predicted (the last prompt token and every target but the last),
            # else at the last prompt token only
            wanted = range(len(r.post) - 1, len(tail) - 1) if score else range(len(tail) - 1, len(tail))
            first = len(post)
            for j, t in enumerate(tail):
                post.append((t, pos, s, j in wanted))
                pos += 1
            want_at.append([first + j for j in wanted])
            nxt.append(pos)
        if pre:
            self.decode(pre)
        if vec:
            self.decode(vec, embd=True)
        logits = self.decode(post)
        return [np.stack([logits[i] for i in idx]) for idx in want_at], nxt


class LlamaDecoding:
    """The running batch of a `LlamaCppModel`: each row's sequence id, next position and last logits. Owns its
    sequences: `select` and `join` hand them to the new batch, and the KV cells of rows that leave are freed."""

    def __init__(self, backend: LlamaCppBackend, seqs: list[int], positions: list[int], logits: np.ndarray):
        self.backend, self.seqs, self.positions, self.logits = backend, seqs, positions, logits

    def select(self, rows: list[int]) -> "LlamaDecoding":
        keep = [self.seqs[i] for i in rows]
        self.backend.release([s for s in self.seqs if s not in keep])
        new = LlamaDecoding(self.backend, keep, [self.positions[i] for i in rows], self.logits[rows])
        self.seqs = []
        return new

    def split(self, rows: list[int]) -> tuple["LlamaDecoding", "LlamaDecoding"]:
        """(these rows, the others), both kept (no KV cell freed): a row set aside resumes after a later `join`."""
        rows = list(rows)
        others = [i for i in range(len(self.seqs)) if i not in set(rows)]
        parts = tuple(LlamaDecoding(self.backend, [self.seqs[i] for i in idx], [self.positions[i] for i in idx],
                                    self.logits[idx]) for idx in (rows, others))
        self.seqs = []
        return parts

    def join(self, other: "LlamaDecoding") -> "LlamaDecoding":
        new = LlamaDecoding(self.backend, self.seqs + other.seqs, self.positions + other.positions,
                            np.concatenate([self.logits, other.logits]))
        self.seqs, other.seqs = [], []
        return new

    def __del__(self):
        if self.seqs:
            self.backend.release(self.seqs)
            self.seqs = []


class Prompt:
    """One row for `LlamaCppBackend.prefill` without torch: tokens before the prefix, after it, and targets."""

    def __init__(self, pre: Sequence[int], post: Sequence[int], target: Sequence[int] = ()):
        self.pre, self.post, self.target = list(pre), list(post), list(target)


def tokenize(backend: LlamaCppBackend, text: str) -> list[int]:
    """llama.cpp's own tokenizer (control tokens in `text`, such as a chat template's, are parsed as such)."""
    L = backend.L
    vocab = L.llama_model_get_vocab(backend.model)
    data = text.encode("utf-8")
    buf = (L.llama_token * (len(data) + 8))()
    n = L.llama_tokenize(vocab, data, len(data), buf, len(buf), False, True)
    if n < 0:
        raise LlamaCppError(f"llama_tokenize needs {-n} tokens")
    return list(buf[:n])


def detokenize(backend: LlamaCppBackend, tokens: Sequence[int]) -> str:
    """Token ids -> text (control tokens left out)."""
    L = backend.L
    vocab = L.llama_model_get_vocab(backend.model)
    out, buf = b"", ctypes.create_string_buffer(256)
    for t in tokens:
        n = L.llama_token_to_piece(vocab, int(t), buf, len(buf), 0, False)
        out += buf.raw[:max(n, 0)]
    return out.decode("utf-8", "replace")


def generate_greedy(backend: LlamaCppBackend, prompt: Prompt, prefix: np.ndarray | None, max_new_tokens: int = 48) -> list[int]:
    """One row, greedy: `prompt.pre`, the prefix vectors ([k, n_embd] or None), `prompt.post`, then tokens until an
    end-of-generation token. The edge path (docs/edge.md): no torch, no batching."""
    L = backend.L
    vocab = L.llama_model_get_vocab(backend.model)
    seqs = backend.take_seqs(1)
    try:
        logits, positions = backend.prefill([prompt], [prefix], seqs)
        last, pos, out = logits[0][-1], positions[0], []
        for _ in range(max_new_tokens):
            token = int(np.argmax(last))
            if L.llama_vocab_is_eog(vocab, token):
                break
            out.append(token)
            last = backend.decode([(token, pos, seqs[0], True)])[0]
            pos += 1
        return out
    finally:
        backend.release(seqs)
