"""Continuous batching: one worker thread decodes the requests of different users in one running batch.

Design
------
* Requests wait in a bounded queue (`max_queue`); a full queue is refused at once (HTTP 429) instead of
  letting latency grow without bound.
* Free rows go to tenants in turn: each to the tenant with the fewest rows running, its oldest request first; and a
  tenant with no row running may join a full batch in one of a few guest rows (`guest_rows_for`), so one tenant's
  flood of long requests cannot make another tenant's short one wait behind it. Once in, decode steps go to
  tenants by their fair share of tokens (`serve.fair_share.FairShare`): a light tenant's rows step alone while the
  others' wait with their cache, so its short request costs about what it costs alone.
* The worker takes the oldest request, waits up to `wait_ms` for more requests, up to `max_batch` rows,
  and runs them in the one decode loop (`e2p.engines.generation.Generation`, the same loop as an engine's `generate`):
  this module only admits requests, streams their text and answers them when their rows finish.
* Between steps, rows that are done leave the batch (EOS, their own `max_tokens`, a stop string, a client that
  gave up) and requests that arrived meanwhile are prefilled and join it (`Generation.add`), up to
  `max_batch` rows, so a new request does not wait for the running batch to finish and a short request
  never waits for a long one. Rows are independent (left padding, exact masks): joining or leaving does not
  change any row's text (tested).
* Any requests share a batch: each row picks its token with its own settings (greedy, or sampled with its
  temperature and top_p); a row with a `seed` samples from its own generator, so the same seed gives the
  same text whatever else the server is doing.
* Streaming: every step hands each streamed row's new text to its `on_delta` callback at once. Each token is
  decoded once (`serve.detokenize.Detokenizer`) and stop strings are searched only in the tail it can complete
  (`serve.detokenize.RowText`), so a
  step costs time in its new text, not in the reply so far. A delta is only text that cannot change any more
  (held back: a half-decoded character, a tail that may begin a stop string, and for chat replies trailing
  spaces), so the deltas always add up to the non-streamed text.
* A request whose deadline passed while it waited, or whose client gave up, is dropped before it costs
  compute.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engines.generation import DecodeRow, Generation
from ..engines.base import Engine
from ..formatting import Segments
from .detokenize import Detokenizer, RowText
from .fair_share import FairShare

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The request queue is full."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down and takes no new work."""


class RequestTimeoutError(TimeoutError):
    """The request waited in the queue past its deadline."""


class GenerationError(RuntimeError):
    """This request's generation failed (the others in its batch go on)."""


@dataclass(eq=False)  # identity: the queue removes *this* request (field-wise == would compare tensors)
class GenRequest:
    segments: Segments
    embedding: torch.Tensor | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    trim: bool = True  # leading / trailing whitespace dropped (chat replies); False: the text exactly (completions)
    deadline: float = float("inf")  # time.monotonic() value
    on_delta: Callable[[str], None] | None = None  # streaming: called from the worker with each new piece of text
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the client left: stop generating this row
    tenant: str = "default"  # whose request (the metrics' label; never the user)
    trace: Callable | None = None  # serve.tracing: records (name, monotonic start, end) under the request's span


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    prompt_tokens: int
    batch_size: int
    queue_seconds: float


def guest_rows_for(max_batch: int) -> int:
    """Rows beyond `max_batch` that tenants with no row running may take (an engine must hold that many more)."""
    return max(1, max_batch // 4)


class Batcher:
    """Background worker batching generation requests; see the module doc for the policy."""

    def __init__(self, model: Engine, max_batch: int = 8, wait_ms: float = 10.0, max_queue: int = 64,
                 tokenizer_lock: threading.Lock | None = None, metrics=None, guest_rows: int | None = None,
                 fair_shares: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.guest_rows = guest_rows_for(max_batch) if guest_rows is None else guest_rows
        self.wait_s = wait_ms / 1000.0
        self.max_queue = max_queue
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.metrics = metrics
        self._pending: deque[GenRequest] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self.last_step = time.monotonic()  # when the worker last took a batch or a decoding step (liveness)
        self._thread: threading.Thread | None = None
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for tests and /healthz
        # tokens (see serve.fair_share); off: every row steps every time (a GPU, where a bigger batch costs little)
        self.share = FairShare(window=max_batch, credit=8 * max_batch) if fair_shares else FairShare.off()

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="e2p-batcher", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Stop taking work; with `drain`, finish what is queued first, else fail it."""
        with self._cond:
            self._stopping = True
            if not drain:
                while self._pending:
                    self._pending.popleft().future.set_exception(ShuttingDownError("the server is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._set_depth()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def busy(self) -> bool:
        return self._busy

    def step_age(self) -> float:
        """Seconds since the worker last made progress; 0 while it is idle (waiting is not being stuck)."""
        return time.monotonic() - self.last_step if self._busy else 0.0

    def depth(self) -> int:
        return len(self._pending)

    # --- submission ---------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> concurrent.futures.Future:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are already waiting")
            self._pending.append(req)
            self._cond.notify_all()
        self._set_depth()
        return req.future

    def discard(self, req: GenRequest) -> None:
        """Drop a request whose client timed out or left: freed from the queue, or stopped at the next step."""
        req.cancelled = True
        req.future.cancel()
        with self._cond:
            try:
                self._pending.remove(req)
            except ValueError:
                return  # already taken by the worker, which skips cancelled requests
        self._set_depth()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    # --- worker -------------------------------------------------------------------------------
    def _take(self) -> list[GenRequest] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            until = time.monotonic() + self.wait_s
            while not self._stopping and len(self._pending) < self.max_batch:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._pop_fair(self.max_batch, [])
            self._busy, self.last_step = True, time.monotonic()
        self._set_depth()
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            involved = list(batch)  # and every request that joins the running batch
            try:  # an engine's decoding steps run without autograd themselves
                self._process(batch, involved)
            except Exception:  # never let the worker die; every future gets an answer
                log.exception("batch of %d failed", len(involved))
                for r in involved:
                    if not r.future.done():
                        r.future.set_exception(RuntimeError("generation failed; see the server log"))
            finally:
                self._busy = False

    def _admit(self, requests: list[GenRequest]) -> list[GenRequest]:
        """The requests still worth computing: not cancelled by their client, not past their deadline."""
        now, live = time.monotonic(), []
        for r in requests:
            if not r.future.set_running_or_notify_cancel():
                continue  # the client gave up
            if now > r.deadline:
                r.future.set_exception(RequestTimeoutError("the request waited in the queue past its timeout"))
                continue
            live.append(r)
        return live

    def _pop_fair(self, n: int, running: list[str]) -> list[GenRequest]:
        """Up to `n` queued requests (the caller holds the lock), each free row to the tenant with the fewest rows
        running or picked so far, its oldest request first: one tenant's flood cannot hold every row while another
        tenant waits (first come, first served within a tenant)."""
        counts = collections.Counter(running)
        taken: list[GenRequest] = []
        while len(taken) < n and self._pending:
            pick = min(self._oldest_by_tenant(), key=lambda r: (counts[r.tenant], r.enqueued_at))
            self._pending.remove(pick)
            counts[pick.tenant] += 1
            taken.append(pick)
        return taken

    def _oldest_by_tenant(self) -> list[GenRequest]:
        """Each tenant's oldest waiting request (the caller holds the lock)."""
        firsts: dict[str, GenRequest] = {}
        for r in self._pending:  # queue order
            firsts.setdefault(r.tenant, r)
        return list(firsts.values())

    def _joiners(self, room: int, running: list[str]) -> list[GenRequest]:
        """Queued requests for the running batch's free rows (fair across tenants, `_pop_fair`), without waiting; and
        beyond a full batch, up to `guest_rows` rows for tenants that have none running, so that a tenant arriving
        while another one's long requests fill every row starts at the next step instead of after them."""
        with self._cond:
            take = self._pop_fair(room, running) if room > 0 else []
            guests = self.max_batch + self.guest_rows - len(running) - len(take)
            if guests > 0 and self._pending:
                busy = set(running) | {r.tenant for r in take}
                idle = [r for r in self._oldest_by_tenant() if r.tenant not in busy]
                for r in sorted(idle, key=lambda r: r.enqueued_at)[:guests]:
                    self._pending.remove(r)
                    take.append(r)
        if not take:
            return []
        self._set_depth()
        return self._admit(take)

    def _process(self, batch: list[GenRequest], involved: list[GenRequest]) -> None:
        live = self._admit(batch)
        gen = Generation(self.model)
        self.share.reset()
        self._join(gen, live)
        while gen.rows or gen.waiting:
            self.last_step = time.monotonic()
            self._focus(gen)
            self.share.stepped(row.request.tenant for row in gen.rows)
            for row in gen.step():
                self._complete(row)
            everyone = _tenants(gen)
            joiners = self._joiners(self.max_batch - len(everyone), everyone)
            if joiners:
                involved += joiners
                self._join(gen, joiners)

    def _focus(self, gen: Generation, joining: list[str] = ()) -> None:
        """Only the rows of tenants with their fair share step next (`serve.fair_share`); a gone client's row too, so
        that it ends now."""
        stepping = self.share.stepping(_tenants(gen) + list(joining))
        gen.focus(lambda row: row.request.tenant in stepping or row.request.cancelled)

    def _join(self, gen: Generation, requests: list[GenRequest]) -> None:
        """Prefill `requests` into the running generation (a request the model cannot take fails alone). The rows
        that will wait are set aside first, so a light tenant's row joins no big batch only to leave it again."""
        if not requests:
            return
        size = len(gen.rows) + len(gen.waiting) + len(requests)  # admitted rows, stepping or waiting their turn
        running = _tenants(gen)
        for r in requests:
            self.share.starting(r.tenant, running)
        self._focus(gen, [r.tenant for r in requests])
        rows = [self._new_row(r, size) for r in requests]
        for row in gen.add(rows, [r.segments for r in requests], [r.embedding for r in requests]):
            self._fail(row.request, row.error)
        self._observe_batch(len(gen.rows) + len(gen.waiting))

    def _new_row(self, r: GenRequest, batch_size: int) -> "_Row":
        detok = Detokenizer(self.model.tokenizer, r.segments.post)  # the reply goes on from the prompt's last tokens
        text = RowText(detok.step, r.stops, trim=r.trim, each_step=r.on_delta is not None, flush=detok.flush)
        if self.metrics is not None:
            self.metrics.queue_seconds.labels(r.tenant).observe(time.monotonic() - r.enqueued_at)
        if r.trace is not None:
            r.trace("queue", r.enqueued_at, time.monotonic())
        return _Row(temperature=r.temperature, top_p=r.top_p, seed=r.seed, max_tokens=r.max_tokens, request=r,
                    text=text, batcher=self, batch_size=batch_size)

    def _fail(self, r: GenRequest, exc: Exception) -> None:
        """This request alone failed: it gets the error, the batch goes on without it."""
        log.error("request failed in the batch; the others go on", exc_info=exc)
        if not r.future.done():
            r.future.set_exception(GenerationError("generation failed for this request; see the server log"))

    def _observe_batch(self, size: int) -> None:
        self.batch_sizes.append(size)
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)

    def _feed(self, row: "_Row") -> bool:
        """`row` took one new token (streamed if asked); -> whether the row must stop here."""
        r = row.request
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
            if r.trace is not None:
                r.trace("prefill", row.started, row.first_token_at, prompt_tokens=len(r.segments.pre) + len(r.segments.post))
            if self.metrics is not None:
                self.metrics.time_to_first_token.labels(r.tenant).observe(row.first_token_at - r.enqueued_at)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        if row.text.each_step:  # otherwise the tokens are only collected (in row.tokens): no decoding, no tokenizer
            with self.tokenizer_lock:
                delta = row.text.add(row.tokens)
            if delta and r.on_delta is not None:
                r.on_delta(delta)
        return row.text.stopped or r.cancelled

    def _complete(self, row: "_Row") -> None:
        r = row.request
        if row.finish_reason == "error":
            self._fail(r, row.error)
            return
        if r.future.done():  # failed or cancelled meanwhile
            return
        try:
            with self.tokenizer_lock:
                text, delta = row.text.finish(row.tokens)
            if delta and r.on_delta is not None:
                r.on_delta(delta)
            n = len(row.tokens)
            finish = "stop" if row.text.stopped or n < r.max_tokens else "length"
            elapsed = time.monotonic() - row.started
            if r.trace is not None:
                r.trace("decode", row.first_token_at or row.started, time.monotonic(), completion_tokens=n)
            if self.metrics is not None:
                self.metrics.batch_seconds.observe(elapsed)
                if n > 1 and row.first_token_at is not None:
                    self.metrics.time_per_output_token.labels(r.tenant).observe(
                        (time.monotonic() - row.first_token_at) / (n - 1))
            r.future.set_result(GenResult(
                text=text, finish_reason=finish, completion_tokens=n,
                prompt_tokens=len(r.segments.pre) + len(r.segments.post) + self.model.prefix_length(r.embedding is not None),
                batch_size=row.batch_size, queue_seconds=row.started - r.enqueued_at))
        except Exception as exc:  # a decoding problem of one row must not fail the others
            self._fail(r, exc)


def _tenants(gen: Generation) -> list[str]:
    """The tenant of each admitted row, stepping or waiting its turn."""
    return [row.request.tenant for row in gen.rows + gen.waiting]


@dataclass(eq=False)
class _Row(DecodeRow):
    """A request's row in the decode loop: its text assembler streams and checks stop strings per token."""

    request: GenRequest | None = None
    text: RowText | None = None
    batcher: Batcher | None = None
    batch_size: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def accept(self, token: int) -> bool:
        super().accept(token)
        return self.batcher._feed(self)
