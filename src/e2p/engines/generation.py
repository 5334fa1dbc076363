"""The one decode loop: a running batch whose rows each have their own user, sampling settings, random stream
and stopping, and which rows may join and leave between steps. an engine's `generate` (e2p.engines.base) runs it to the end; the
server's batcher only admits rows, streams their text and answers them when they finish."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class Decoding:
    """A running batch of generations: the KV cache, attention mask, next positions and last hidden states of B
    rows. Rows are independent (left padding, exact masks), so they can leave (`select`) and new, separately
    prefilled rows can join (`join`) between steps without changing any row's result. `adapter_rows`: which rows get
    the projector's shared LoRA adapter (the rows with a prefix; None: no adapter, or every row)."""

    def __init__(self, lm_config, cache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                 adapter_rows: list[bool] | None = None):
        self.lm_config, self.cache, self.mask, self.positions, self.last = lm_config, cache, mask, positions, last
        self.adapter_rows = adapter_rows

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _rebuild(self, layers, mask, positions, last, adapter_rows) -> "Decoding":
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm_config)
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        for layer in cache.layers:  # a sliding-window layer places its keys by the tokens it has seen: all the columns
            if getattr(layer, "is_sliding", False):
                layer.cumulative_length = mask.shape[1]
        return Decoding(self.lm_config, cache, mask, positions, last, adapter_rows)

    def select(self, rows: list[int]) -> "Decoding":
        """Only these rows (in this order); padding columns no row needs any more are dropped."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        drop = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        width = mask.shape[1] - drop
        # a layer's keys are the mask's last columns (a sliding-window layer, as Gemma's, keeps fewer): keep at most
        # the columns that stay
        layers = [(k[idx][:, :, max(k.shape[2] - width, 0):], v[idx][:, :, max(v.shape[2] - width, 0):])
                  for k, v in self._layers()]
        flags = None if self.adapter_rows is None else [self.adapter_rows[i] for i in rows]
        return self._rebuild(layers, mask[:, drop:], self.positions[idx], self.last[idx], flags)

    def split(self, rows: list[int]) -> tuple["Decoding", "Decoding"]:
        """(these rows, the others), both kept: a row set aside keeps its cache for a later `join`."""
        rows = list(rows)
        others = [i for i in range(len(self.positions)) if i not in set(rows)]
        return self.select(rows), self.select(others)

    def join(self, other: "Decoding") -> "Decoding":
        """This batch's rows, then `other`'s: the shorter history is left-padded (masked) to the longer."""
        T = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int, width: int = T) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        layers = []
        for (k1, v1), (k2, v2) in zip(self._layers(), other._layers()):
            L = max(k1.shape[2], k2.shape[2])  # a layer's keys are the mask's last L columns (sliding windows: fewer)
            layers.append((torch.cat([pad(k1, 2, L), pad(k2.to(k1.dtype), 2, L)]),
                           torch.cat([pad(v1, 2, L), pad(v2.to(v1.dtype), 2, L)])))
        flags = None
        if self.adapter_rows is not None or other.adapter_rows is not None:
            flags = [*(self.adapter_rows or [True] * len(self.positions)), *(other.adapter_rows or [True] * len(other.positions))]
        return self._rebuild(layers, torch.cat([pad(self.mask, 1), pad(other.mask, 1)]),
                             torch.cat([self.positions, other.positions]), torch.cat([self.last, other.last.to(self.last.dtype)]),
                             flags)


def row_generator(do_sample: bool, seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A sampled row's own random stream when a seed is given (None: the global one), on the logits' device."""
    return torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None


@dataclass(eq=False)  # identity: a row is this generation, never equal to another with the same tokens
class DecodeRow:
    """One row being generated: its sampling settings (temperature 0: greedy), its own random stream (seeded:
    the same text alone or in any batch) and its tokens. Subclasses add what a caller needs per token (the
    server streams text and checks stop strings) by overriding `accept`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 64
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or `accept` said so) | "length" | "error"
    error: Exception | None = None
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self):
        self.generator = row_generator(self.temperature > 0, self.seed)

    def accept(self, token: int) -> bool:
        """Take one generated (non-EOS) token; -> whether to stop here."""
        self.tokens.append(token)
        return False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Generation:
    """A running batch of `DecodeRow`s on one model: `add` prefills rows (they join between steps), `step`
    gives every row one token and returns the rows that finished. A row the model cannot take (prefill error,
    non-finite logits, a sampling error) finishes alone with `finish_reason="error"`; its neighbours go on."""

    def __init__(self, model):  # an e2p.engines.base.Engine (its start_decoding, next_logits, pick, advance, eos_ids)
        self.model = model
        self.rows: list[DecodeRow] = []
        self.dec: Decoding | None = None
        self.waiting: list[DecodeRow] = []  # rows set aside by `focus`: their cache kept, no steps
        self.waiting_dec: Decoding | None = None

    def add(self, rows: Sequence[DecodeRow], segments: Sequence, embeddings=None) -> list[DecodeRow]:
        """Prefill `rows` together (each alone if that fails) and join them to the batch; -> the rows that failed."""
        embeddings = list(embeddings) if embeddings is not None else [None] * len(rows)
        device = getattr(self.model, "device", torch.device("cpu"))
        for r in rows:
            if r.max_tokens <= 0:
                r.finish_reason = "length"  # nothing to generate: never prefilled
            if r.generator is not None and r.generator.device != device:  # a seed's stream lives beside the logits
                r.generator = row_generator(True, r.seed, device)
        keep = [i for i, r in enumerate(rows) if not r.done]
        rows, segments, embeddings = [rows[i] for i in keep], [segments[i] for i in keep], [embeddings[i] for i in keep]
        failed: list[DecodeRow] = []
        dec = self._prefill(list(rows), list(segments), embeddings, failed)
        if dec is not None:
            joined = [r for r in rows if not r.done]
            self.dec = dec if self.dec is None else self.dec.join(dec)
            self.rows += joined
        return failed

    def focus(self, steps: Callable[[DecodeRow], bool]) -> None:
        """Step only the rows `steps` accepts from now on: the others wait with their cache (no compute) until a later
        call accepts them again. Rows are independent, so no row's tokens change; a step over fewer rows costs less."""
        back = [j for j, r in enumerate(self.waiting) if steps(r)]
        out = [j for j, r in enumerate(self.rows) if not steps(r)]
        if back:
            returning, rest = _split(self.waiting_dec, back)
            self.rows += [self.waiting[j] for j in back]
            self.waiting = [r for j, r in enumerate(self.waiting) if j not in set(back)]
            self.dec, self.waiting_dec = _joined(self.dec, returning), rest
        if out:
            leaving, rest = _split(self.dec, out)
            self.waiting += [self.rows[j] for j in out]
            self.rows = [r for j, r in enumerate(self.rows) if j not in set(out)]
            self.waiting_dec, self.dec = _joined(self.waiting_dec, leaving), rest

    def _prefill(self, rows, segments, embeddings, failed) -> Decoding | None:
        if not rows:
            return None
        try:
            return self.model.start_decoding(segments, embeddings)
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows[0], exc)
                failed.append(rows[0])
                return None
        decs = [self._prefill([r], [s], [e], failed) for r, s, e in zip(rows, segments, embeddings)]
        decs = [d for d in decs if d is not None]
        return functools.reduce(lambda a, b: a.join(b), decs) if decs else None

    @staticmethod
    def _fail(row: DecodeRow, exc: Exception) -> None:
        log.debug("row failed: %s", exc)
        row.finish_reason, row.error = "error", exc

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Every row's token with its own settings: greedy rows together, each sampled row from its own stream."""
        nxt = logits.argmax(-1)
        finite = torch.isfinite(logits).all(-1).tolist()  # one transfer per step, not one per row
        for j, row in enumerate(self.rows):
            try:
                if not finite[j]:
                    raise FloatingPointError("the model produced non-finite logits for this row")
                if row.temperature > 0:
                    nxt[j] = self.model.pick(logits[j:j + 1], True, row.temperature, row.top_p, row.generator)[0]
            except Exception as exc:
                self._fail(row, exc)
        return nxt

    @torch.no_grad()
    def step(self) -> list[DecodeRow]:
        """One token for every row; finished rows (EOS, `accept` said stop, max_tokens, error) leave the batch
        and are returned. No compute is spent on a row after it finishes."""
        if not self.rows:
            return []
        nxt = self._pick(self.model.next_logits(self.dec))
        tokens = nxt.tolist()  # the ids leave the device once per step (the text is decoded on the host)
        for j, row in enumerate(self.rows):
            if row.done:
                continue
            t = tokens[j]
            if t in self.model.eos_ids:
                row.finish_reason = "stop"
            elif row.accept(t):
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"
        keep = [j for j, row in enumerate(self.rows) if not row.done]
        finished = [row for row in self.rows if row.done]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[j] for j in keep]
            if not self.rows:
                self.dec = None
                return finished
            self.dec, nxt = self.dec.select(keep), nxt[keep]
        self.model.advance(self.dec, nxt)
        return finished


def _split(dec, rows: list[int]):
    """(these rows, the rest) of a running batch (torch's Decoding or llama.cpp's), None for an empty part."""
    n = len(dec.positions)
    if len(rows) == n:
        return dec, None
    return dec.split(rows) if rows else (None, dec)


def _joined(a, b):
    return b if a is None else a if b is None else a.join(b)
