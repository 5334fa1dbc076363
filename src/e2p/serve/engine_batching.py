"""The batcher for an engine that runs its own decode loop (vLLM, in process or behind `vllm serve`): each request goes
to the engine as soon as it arrives, and the engine's scheduler batches the rows (vLLM's continuous batching).

What stays the server's own, exactly as with the torch and llama.cpp engines (`serve.batching.Batcher`, whose row
text, streaming, stop strings, metrics and answers this class reuses): the bounded queue (429 above it), deadlines, a
client that leaves (its row is aborted in the engine), the text of each row from its token ids, and the errors. The
engine's own faults (an unreachable upstream) reach the client as the engine's `UpstreamError` (502 / 503 / 504).
Fair admission across tenants is the engine's scheduling here (vLLM: first come, first served).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

from ..errors import UpstreamError
from .batching import Batcher, GenRequest, QueueFullError, ShuttingDownError, _Row


class EngineLoopBatcher(Batcher):
    """Batcher's interface (submit, discard, start, stop, health) over an engine with `submit(row, embedding,
    on_tokens, **settings) -> job` and a `runner` (alive, abort(job), last_progress)."""

    def __init__(self, model, max_batch: int = 8, wait_ms: float = 10.0, max_queue: int = 64, **kwargs):
        kwargs.pop("fair_shares", None)  # vLLM schedules its own batch
        super().__init__(model, max_batch=max_batch, wait_ms=wait_ms, max_queue=max_queue, **kwargs)
        self._jobs: dict[GenRequest, object] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._started = False

    # --- lifecycle: no worker of our own, the engine's loop runs the rows --------------------------------------
    def start(self) -> None:
        self._started, self._stopping = True, False

    def stop(self, drain: bool = True, timeout: float | None = 60.0) -> None:
        with self._lock:
            self._stopping = True
            if not drain:
                for r, job in list(self._jobs.items()):
                    r.future.set_exception(ShuttingDownError("the server is shutting down"))
                    self.model.runner.abort(job)
            end = time.monotonic() + (timeout if timeout is not None else 1e9)
            while self._jobs and time.monotonic() < end:
                self._idle.wait(max(end - time.monotonic(), 0.01))
        self._set_depth()

    @property
    def alive(self) -> bool:
        return self._started and not self._stopping and self.model.runner.alive

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def step_age(self) -> float:
        return time.monotonic() - self.model.runner.last_progress if self._jobs else 0.0

    def depth(self) -> int:
        return len(self._jobs)

    # --- submission -----------------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> concurrent.futures.Future:
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._jobs) >= self.max_batch + self.max_queue:
                raise QueueFullError(f"{len(self._jobs)} requests are already in the engine")
            req.future.set_running_or_notify_cancel()
            row = self._new_row(req, len(self._jobs) + 1)

            def on_tokens(ids: list[int]) -> bool:
                return any(row.accept(t) for t in ids)  # accept() feeds the text; True: stop this row

            try:
                job = self.model.submit(req.segments, req.embedding, on_tokens=on_tokens, max_tokens=req.max_tokens,
                                        temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                        stops=list(req.stops))
            except Exception as exc:  # refused by the engine: this request alone gets the error
                self._settle_error(req, exc)
                return req.future
            self._jobs[req] = job
        self._observe_batch(len(self._jobs))
        self._set_depth()
        job.future.add_done_callback(lambda f: self._finished(row, f))
        return req.future

    def discard(self, req: GenRequest) -> None:
        req.cancelled = True
        req.future.cancel()
        job = self._jobs.get(req)
        if job is not None:
            self.model.runner.abort(job)

    def _finished(self, row: _Row, done: concurrent.futures.Future) -> None:
        r = row.request
        exc = done.exception()
        if exc is not None:
            self._settle_error(r, exc)
        else:
            self._complete(row)
        with self._lock:
            self._jobs.pop(r, None)
            self._idle.notify_all()
        self._set_depth()

    def _settle_error(self, r: GenRequest, exc: BaseException) -> None:
        """An upstream fault keeps its status (502 / 503 / 504); anything else is this request's generation error."""
        if isinstance(exc, UpstreamError):
            if not r.future.done():
                r.future.set_exception(exc)
        else:
            self._fail(r, exc)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._jobs))
